"""Connection reuse: many messages per verified, authenticated session.

A TLS handshake and AUTH cost far more than a 2 KB message, so programs that
send a lot (the relay first) keep sessions open. ``ConnectionPool`` keeps up
to ``max_connections`` sessions to one upstream, hands an idle one to each
delivery, opens a new one when all are busy and the cap allows, and otherwise
queues the delivery. A session that failed, timed out, sent its quota or sat
idle too long is closed and never reused.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from txstarttls.client import Transcript
from txstarttls.errors import ConnectionFailed, ConnectionLost, Phase
from txstarttls.message import MessageInput, PreparedMessage, prepare
from txstarttls.session import (
    Envelope,
    SendResult,
    Session,
    cancel_deadline,
    start_deadline,
)
from txstarttls.tls import ClientTLS
from txstarttls.upstream import Upstream, connect_client, prepare_tls

_log = Logger()

# Phases in which a lost connection means nothing of the message was accepted.
_SAFE_TO_RETRY = frozenset({Phase.RSET, Phase.MAIL, None})


async def open_session(
    reactor: IReactorTime,
    upstream: Upstream,
    tls: ClientTLS | None,
    *,
    transcript: Transcript | None = None,
) -> Session:
    """Connect and run greeting, EHLO, STARTTLS, AUTH: ready for MAIL."""
    client = await connect_client(reactor, upstream, tls, transcript=transcript)
    session = Session(client, upstream, tls)
    deadline = start_deadline(client, upstream.timeouts.overall)
    try:
        await session.open()
    except BaseException:
        session.close()
        raise
    finally:
        cancel_deadline(deadline)
    return session


@dataclass(frozen=True, slots=True)
class PoolLimits:
    """How hard one upstream may be used."""

    max_connections: int = 8
    max_messages_per_connection: int = 100
    idle_timeout: float = 30.0


class _Pooled:
    """A session with its idle timer."""

    __slots__ = ("idle_timer", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.idle_timer: IDelayedCall | None = None


class ConnectionPool:
    """Sessions to one upstream, reused across deliveries."""

    def __init__(
        self,
        reactor: IReactorTime,
        upstream: Upstream,
        limits: PoolLimits | None = None,
        *,
        trust_root: object | None = None,
    ) -> None:
        self._reactor = reactor
        self.upstream = upstream
        self.limits = limits or PoolLimits()
        self._tls = prepare_tls(upstream, trust_root)
        self._idle: deque[_Pooled] = deque()
        self._waiting: deque[Deferred[None]] = deque()
        self._open = 0
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    async def deliver(
        self, envelope: Envelope, message: MessageInput | PreparedMessage
    ) -> SendResult:
        """Deliver one message over a pooled session; raise a typed SMTPError."""
        prepared = prepare(message)
        started = self._reactor.seconds()
        pooled, reused = await self._acquire()
        setup = 0.0 if reused else self._reactor.seconds() - started
        try:
            result = await pooled.session.send(envelope, prepared)
            return dataclasses.replace(result, setup_seconds=setup) if setup else result
        except ConnectionLost as error:
            if not reused or error.phase not in _SAFE_TO_RETRY:
                raise
            # The upstream closed an idle session under us before anything of
            # this message was accepted: one fresh session is safe to try.
        finally:
            self._release(pooled)
        pooled, _ = await self._acquire(fresh=True)
        try:
            result = await pooled.session.send(envelope, prepared)
            return dataclasses.replace(
                result, setup_seconds=self._reactor.seconds() - started
            )
        finally:
            self._release(pooled)

    async def _acquire(self, *, fresh: bool = False) -> tuple[_Pooled, bool]:
        while True:
            if self._closed:
                raise ConnectionFailed("connection pool is closed", phase=Phase.CONNECT)
            while self._idle and not fresh:
                pooled = self._idle.pop()
                if pooled.session.usable:
                    return pooled, True
                self._discard(pooled)
            if self._open < self.limits.max_connections:
                self._open += 1
                try:
                    session = await open_session(
                        self._reactor, self.upstream, self._tls
                    )
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
                return _Pooled(session), False
            waiter: Deferred[None] = Deferred()
            self._waiting.append(waiter)
            await waiter

    def _release(self, pooled: _Pooled) -> None:
        session = pooled.session
        if (
            self._closed
            or not session.usable
            or session.messages_sent >= self.limits.max_messages_per_connection
        ):
            self._discard(pooled)
            return
        # One timer per session, pushed back on every release rather than
        # scheduled and cancelled around every message.
        timer = pooled.idle_timer
        if timer is not None and timer.active():
            timer.reset(self.limits.idle_timeout)
        else:
            pooled.idle_timer = self._reactor.callLater(
                self.limits.idle_timeout, self._expire, pooled
            )
        self._idle.append(pooled)
        self._wake_one()

    def _expire(self, pooled: _Pooled) -> None:
        if pooled in self._idle:
            self._idle.remove(pooled)
            self._discard(pooled)

    def _discard(self, pooled: _Pooled) -> None:
        if pooled.idle_timer is not None and pooled.idle_timer.active():
            pooled.idle_timer.cancel()
        pooled.session.close()
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        if self._waiting:
            self._waiting.popleft().callback(None)

    async def close(self) -> None:
        """Close idle sessions now and busy ones when their delivery ends."""
        self._closed = True
        while self._idle:
            pooled = self._idle.pop()
            if pooled.idle_timer is not None and pooled.idle_timer.active():
                pooled.idle_timer.cancel()
            self._discard(pooled)
        while self._waiting:
            self._waiting.popleft().callback(None)
