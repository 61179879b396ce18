"""The ESMTP client protocol: one method per command, each a Deferred[Reply].

Replies are paired first-in, first-out with the commands sent; a reply that no
command waits for is the peer's protocol violation and ends the connection.
The protocol enforces the rules that must hold whatever the caller does:

* only a final 220 to STARTTLS starts TLS, and bytes already buffered behind
  it are response injection (RFC 3207 4.2): the connection is aborted;
* after STARTTLS nothing is sent until the handshake has completed and the
  certificate and host name have been verified again here;
* everything learned before TLS is forgotten, and STARTTLS is never sent twice;
* AUTH is refused locally before verified TLS unless plaintext was opted into;
* every command argument is validated before a byte of it is written.

The session (which commands to send, in what order) lives in ``session.py``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from txstarttls.address import (
    needs_smtputf8,
    validate_address,
    validate_hostname_argument,
    validate_parameter,
)
from txstarttls.errors import (
    CertificateVerificationFailed,
    ConnectionLost,
    ExtensionRequired,
    InvalidArgument,
    LocalError,
    OutcomeUnknown,
    Phase,
    ProtocolViolation,
    ResponseInjection,
    SMTPError,
    Timeout,
    TLSHandshakeFailed,
    TLSRequired,
    TransientReplyError,
)
from txstarttls.message import PreparedMessage
from txstarttls.reply import (
    MAX_LINE_LENGTH,
    Capabilities,
    Reply,
    ReplyParser,
    parse_ehlo,
)
from txstarttls.sasl import Mechanism
from txstarttls.tls import ClientTLS, TLSInfo
from txstarttls.write_now import write_now

Transcript = Callable[[str, bytes], None]
"""Receives ("C", line) and ("S", line) for every line, AUTH data redacted."""

_REDACTED = b"<redacted>"
_CACHE_LIMIT = 1024
_BODY_SHOWN = b"<message body>"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds allowed per phase; defaults from RFC 5321 section 4.5.3.2."""

    connect: float = 60.0
    greeting: float = 300.0
    command: float = 300.0
    """EHLO, HELO, STARTTLS, AUTH, RSET, NOOP, QUIT."""
    tls_handshake: float = 60.0
    mail: float = 300.0
    rcpt: float = 300.0
    data: float = 120.0
    data_block: float = 180.0
    end_of_data: float = 600.0
    overall: float | None = 3600.0
    """A deadline for a whole send(); None for no limit."""

    def table(self) -> dict[Phase, float]:
        """Seconds for every phase, looked up once per connection."""
        table = dict.fromkeys(Phase, self.command)
        table.update(
            {
                Phase.GREETING: self.greeting,
                Phase.MAIL: self.mail,
                Phase.RCPT: self.rcpt,
                Phase.DATA: self.data,
                Phase.END_OF_DATA: self.end_of_data,
                Phase.TLS_HANDSHAKE: self.tls_handshake,
            }
        )
        return table


class _Pending:
    """A command sent whose reply has not come yet, and its deadline."""

    __slots__ = ("deadline", "phase", "seconds")

    def __init__(self, phase: Phase, seconds: float, now: float) -> None:
        self.phase = phase
        self.seconds = seconds
        self.deadline = now + seconds

    def resolve(self, reply: Reply) -> None:
        raise NotImplementedError

    def reject(self, error: SMTPError) -> None:
        raise NotImplementedError


class _Waiter(_Pending):
    """A command with a Deferred of its own."""

    __slots__ = ("deferred",)

    def __init__(
        self,
        phase: Phase,
        seconds: float,
        now: float,
        canceller: Callable[[Deferred[Reply]], None],
    ) -> None:
        super().__init__(phase, seconds, now)
        self.deferred: Deferred[Reply] = Deferred(canceller)

    def resolve(self, reply: Reply) -> None:
        self.deferred.callback(reply)

    def reject(self, error: SMTPError) -> None:
        self.deferred.errback(error)


Outcome = Reply | SMTPError
"""What one pipelined command came to: its reply, or why none came."""


class _Batch:
    """The outcomes of a pipelined group of commands, in order; its one
    Deferred fires when the last is in."""

    __slots__ = ("deferred", "outcomes", "size")

    def __init__(
        self, size: int, canceller: Callable[[Deferred[list[Outcome]]], None]
    ) -> None:
        self.size = size
        self.outcomes: list[Outcome] = []
        self.deferred: Deferred[list[Outcome]] = Deferred(canceller)

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if len(self.outcomes) == self.size:
            self.deferred.callback(self.outcomes)


class _BatchWaiter(_Pending):
    """A command of a pipelined group: its outcome goes to the group."""

    __slots__ = ("batch",)

    def __init__(self, phase: Phase, seconds: float, now: float, batch: _Batch) -> None:
        super().__init__(phase, seconds, now)
        self.batch = batch

    def resolve(self, reply: Reply) -> None:
        self.batch.add(reply)

    def reject(self, error: SMTPError) -> None:
        self.batch.add(error)


@implementer(IHandshakeListener)
class ESMTPClient(LineReceiver):
    """An ESMTP client connection driven by Deferreds.

    ``clock`` schedules every timeout, so tests can drive time. Set
    ``allow_plaintext_auth`` only for loopback or UNIX-socket peers.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_LINE_LENGTH

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        *,
        timeouts: Timeouts | None = None,
        implicit_tls: ClientTLS | None = None,
        allow_plaintext_auth: bool = False,
        transcript: Transcript | None = None,
    ) -> None:
        self.clock = clock
        self.timeouts = timeouts or Timeouts()
        self._implicit_tls = implicit_tls
        self.allow_plaintext_auth = allow_plaintext_auth
        self._transcript = transcript
        self._parser = ReplyParser()
        self._waiters: deque[_Pending] = deque()
        self._failure: SMTPError | None = None
        self._greeting: Deferred[Reply] | None = None
        self._greeting_failure: Failure | None = None
        self._pending_tls: ClientTLS | None = implicit_tls
        self._pending_starttls: ClientTLS | None = None
        self._tls_done: Deferred[Reply] | None = None
        self._tls_reply: Reply | None = None
        self._tls_timer: IDelayedCall | None = None
        # One timer per connection, always for the oldest command: pipelined
        # commands share it instead of each scheduling and cancelling one.
        self._reply_timer: IDelayedCall | None = None
        self._phase_seconds = self.timeouts.table()
        # Arguments already validated on this connection: a pooled session
        # sends the same sender and parameters over and over.
        self._paths: dict[str, bytes] = {}
        self._parameters: dict[tuple[str, ...], bytes] = {}
        self._starttls_sent = False
        self.capabilities = Capabilities.empty()
        self.tls: TLSInfo | None = None
        self.closed: Deferred[None] = Deferred()

    # --- state ---------------------------------------------------------------

    @property
    def is_tls_verified(self) -> bool:
        """TLS is up and its peer passed verification."""
        return self.tls is not None

    @property
    def failure(self) -> SMTPError | None:
        """Why the connection is unusable, once it is."""
        return self._failure

    # --- connection events ---------------------------------------------------

    def connectionMade(self) -> None:
        # Every write is a whole command batch, so Nagle only adds delay: with
        # it, the EHLO after the TLS Finished waits for a delayed ACK (~40 ms).
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._greeting = self._expect(Phase.GREETING)
        # Handled here, so a failed greeting is never an "Unhandled error in
        # Deferred"; greeting() gives each caller its own copy of the outcome.
        self._greeting.addErrback(self._keep_greeting_failure)
        if self._implicit_tls is not None:
            self._start_handshake_timer()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_tls_timer()
        if self._failure is None:
            self._failure = self._loss_error(reason)
        self._fail_pending(self._failure)
        self.closed.callback(None)

    def _fail_pending(self, error: SMTPError) -> None:
        """Fail every command still waiting; QUIT counts as done."""
        waiters, self._waiters = self._waiters, deque()
        self._disarm()
        for waiter in waiters:
            if waiter.phase is Phase.QUIT:
                waiter.resolve(Reply(221, ("connection closed",)))
            elif waiter.phase is Phase.END_OF_DATA and not isinstance(
                error, OutcomeUnknown
            ):
                waiter.reject(
                    OutcomeUnknown(
                        f"{error}, after the final dot: the message may or may "
                        "not have been delivered",
                        phase=Phase.END_OF_DATA,
                    )
                )
            else:
                waiter.reject(error)
        if self._tls_done is not None:
            done, self._tls_done = self._tls_done, None
            done.errback(error)

    def _loss_error(self, reason: Failure) -> SMTPError:
        if self._pending_tls is not None:
            return _handshake_error(reason, self._pending_tls.hostname)
        phase = self._waiters[0].phase if self._waiters else None
        if phase is Phase.END_OF_DATA:
            return OutcomeUnknown(
                "connection lost after the final dot; the message may or may "
                "not have been delivered",
                phase=phase,
            )
        where = f" waiting for the {phase.value} reply" if phase else ""
        return ConnectionLost(
            f"connection lost{where}: {reason.getErrorMessage()}", phase=phase
        )

    def handshakeCompleted(self) -> None:
        """TLS is up: verify the peer before anything else happens."""
        tls = self._pending_tls
        if tls is None or self._failure is not None:
            return
        self._cancel_tls_timer()
        connection: SSL.Connection = self.transport.getHandle()  # type: ignore[union-attr]
        try:
            info = tls.verify(connection)
        except CertificateVerificationFailed as error:
            self._abort(error)
            return
        self._pending_tls = None
        self.tls = info
        if info.version == "TLSv1.3":
            _acknowledge_session_tickets(connection, self.transport)
        self._log.debug(
            "TLS {version} {cipher} verified for {name}",
            version=info.version,
            cipher=info.cipher,
            name=info.verified_name or "pinned certificate",
        )
        if self._tls_done is not None:
            done, self._tls_done = self._tls_done, None
            assert self._tls_reply is not None
            done.callback(self._tls_reply)

    # --- receiving -------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._failure is not None:
            return
        if self._pending_tls is not None:
            # Only reachable if a TLS layer delivered data before verification.
            self._abort(ProtocolViolation("data arrived before TLS was verified"))
            return
        self._record("S", line)
        try:
            reply = self._parser.feed(line)
        except ProtocolViolation as error:
            phase = self._waiters[0].phase if self._waiters else None
            self._abort(ProtocolViolation(str(error), phase=phase))
            return
        if reply is not None:
            self._dispatch(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._abort(
            ProtocolViolation(f"reply line longer than {self.MAX_LENGTH} octets")
        )

    def _dispatch(self, reply: Reply) -> None:
        if not self._waiters:
            if reply.code == 421:
                self._abort(
                    TransientReplyError(
                        f"server is closing the connection: {reply}",
                        code=reply.code,
                        enhanced=reply.enhanced,
                        text=reply.text,
                    )
                )
            else:
                self._abort(ProtocolViolation(f"reply no command waits for: {reply}"))
            return
        waiter = self._waiters.popleft()
        if self._waiters:
            self._arm(self._waiters[0])
        # With nothing outstanding the timer is left to come due into an empty
        # queue, or to serve the next command: between messages nothing is
        # cancelled or scheduled.
        if waiter.phase is Phase.STARTTLS and reply.code == 220:
            assert isinstance(waiter, _Waiter)
            self._begin_tls(waiter, reply)
            return
        if waiter.phase is Phase.EHLO:
            self.capabilities = (
                parse_ehlo(reply) if reply.code == 250 else Capabilities.empty()
            )
        waiter.resolve(reply)

    # --- commands --------------------------------------------------------------

    def greeting(self) -> Deferred[Reply]:
        """The server's greeting, once it has come."""
        if self._greeting is None:
            return fail(ConnectionLost("not connected", phase=Phase.GREETING))
        result: Deferred[Reply] = Deferred(self._cancel)

        def relay(value: Reply | None) -> Reply | None:
            if self._greeting_failure is not None:
                result.errback(self._greeting_failure)
            else:
                assert value is not None
                result.callback(value)
            return value

        self._greeting.addCallback(relay)
        return result

    def _keep_greeting_failure(self, failure: Failure) -> None:
        self._greeting_failure = failure

    def ehlo(self, name: str) -> Deferred[Reply]:
        """EHLO; on 250 the capabilities are replaced by what it lists."""
        validate_hostname_argument(name)
        self.capabilities = Capabilities.empty()
        return self._command(b"EHLO " + name.encode("ascii"), Phase.EHLO)

    def helo(self, name: str) -> Deferred[Reply]:
        validate_hostname_argument(name)
        self.capabilities = Capabilities.empty()
        return self._command(b"HELO " + name.encode("ascii"), Phase.HELO)

    def starttls(self, tls: ClientTLS) -> Deferred[Reply]:
        """STARTTLS; fires with the 220 only once TLS is up and verified.

        Any other reply fires at once and TLS does not start; the caller must
        then give up on the connection rather than go on in plaintext.
        """
        if self._starttls_sent or self.tls is not None:
            return fail(
                ProtocolViolation("STARTTLS was already used on this connection")
            )
        self._starttls_sent = True
        self._pending_starttls = tls
        return self._command(b"STARTTLS", Phase.STARTTLS)

    def auth(self, mechanism: Mechanism) -> Deferred[Reply]:
        """Run one SASL exchange; fires with the final (non-334) reply."""
        if self.tls is None and not self.allow_plaintext_auth:
            return fail(
                TLSRequired(
                    "refusing to send credentials without verified TLS",
                    phase=Phase.AUTH,
                )
            )
        initial = mechanism.initial_response()
        command = b"AUTH " + mechanism.name.encode("ascii")
        shown = command
        if initial is not None:
            command += b" " + (base64.b64encode(initial) if initial else b"=")
            shown += b" " + _REDACTED
        d = self._command(command, Phase.AUTH, shown=shown)
        d.addCallback(self._auth_step, mechanism)
        return d

    def _auth_step(self, reply: Reply, mechanism: Mechanism) -> Reply | Deferred[Reply]:
        if reply.code != 334:
            return reply
        challenge_text = reply.lines[0] if reply.lines else ""
        try:
            challenge = base64.b64decode(challenge_text, validate=True)
        except (binascii.Error, ValueError):
            self._abort(
                ProtocolViolation(
                    f"AUTH challenge is not base64: {challenge_text[:40]}",
                    phase=Phase.AUTH,
                )
            )
            assert self._failure is not None
            return fail(self._failure)
        answer = base64.b64encode(mechanism.respond(challenge))
        d = self._command(answer, Phase.AUTH, shown=_REDACTED)
        d.addCallback(self._auth_step, mechanism)
        return d

    def mail(self, sender: str, parameters: Sequence[str] = ()) -> Deferred[Reply]:
        """MAIL FROM; ``parameters`` are ``KEY`` or ``KEY=value`` strings."""
        return self._command(self._mail_line(sender, parameters), Phase.MAIL)

    def rcpt(self, recipient: str, parameters: Sequence[str] = ()) -> Deferred[Reply]:
        return self._command(self._rcpt_line(recipient, parameters), Phase.RCPT)

    def _mail_line(self, sender: str, parameters: Sequence[str]) -> bytes:
        return b"MAIL FROM:" + self._path(sender, null=True) + self._params(parameters)

    def _rcpt_line(self, recipient: str, parameters: Sequence[str]) -> bytes:
        path = self._path(recipient, null=False)
        return b"RCPT TO:" + path + self._params(parameters)

    def data(self) -> Deferred[Reply]:
        """DATA; a 354 means the caller may now send the encoded body."""
        return self._command(b"DATA", Phase.DATA)

    def envelope(
        self,
        sender: str,
        parameters: Sequence[str],
        recipients: Sequence[tuple[str, Sequence[str]]],
        *,
        data: bool,
    ) -> Deferred[list[Outcome]]:
        """MAIL FROM, a RCPT TO per ``(recipient, parameters)`` and, with
        ``data``, DATA, in one write (RFC 2920 PIPELINING; under TLS, one
        record); one Deferred for all their outcomes, in order.

        Every argument is validated before anything is sent. Only for a
        server that offers PIPELINING, and never around EHLO, STARTTLS or AUTH.
        """
        phases = [Phase.MAIL]
        try:
            lines = [self._mail_line(sender, parameters)]
            for recipient, rcpt_parameters in recipients:
                lines.append(self._rcpt_line(recipient, rcpt_parameters))
                phases.append(Phase.RCPT)
        except SMTPError as error:
            return fail(error)
        if data:
            lines.append(b"DATA")
            phases.append(Phase.DATA)
        payload = b"\r\n".join(lines) + b"\r\n"
        if _stray_line_break(payload, len(lines)):
            return fail(
                InvalidArgument("refusing to send a command line with CR, LF or NUL")
            )
        if (refusal := self._not_ready(Phase.MAIL)) is not None:
            return fail(refusal)
        assert self.transport is not None
        batch = _Batch(len(lines), self._cancel)
        now = self.clock.seconds()
        for line, phase in zip(lines, phases, strict=True):
            waiter = _BatchWaiter(phase, self._phase_seconds[phase], now, batch)
            self._waiters.append(waiter)
            self._arm(waiter, now)
            self._record("C", line)
        write_now(self.transport, payload)
        return batch.deferred

    def bdat(self, chunk: bytes, *, last: bool) -> Deferred[Reply]:
        """BDAT (RFC 3030): one counted chunk of the body, in one write with
        its command; only a 2xx to the LAST one means delivered."""
        command = b"BDAT %d%s" % (len(chunk), b" LAST" if last else b"")
        if last:
            phase, seconds = Phase.END_OF_DATA, self.timeouts.end_of_data
        else:
            phase, seconds = Phase.DATA, self.timeouts.data_block
        return self._send(
            command + b"\r\n" + chunk, phase, shown=command, seconds=seconds
        )

    def send_body(self, message: PreparedMessage | bytes) -> Deferred[Reply]:
        """Send an encoded (dot-stuffed, terminated) body; fire with its reply.

        Only a 2xx to this reply means the message was delivered. A body that
        is not held in memory is streamed with transport back-pressure.
        """
        if isinstance(message, bytes):
            if not message.endswith(b"\r\n.\r\n") and message != b".\r\n":
                return fail(InvalidArgument("body is not encoded: use message.prepare"))
            return self._send(message, Phase.END_OF_DATA, shown=_BODY_SHOWN)
        if message.in_memory is not None:
            return self._send(message.in_memory, Phase.END_OF_DATA, shown=_BODY_SHOWN)
        return self._stream(message)

    def _stream(self, message: PreparedMessage) -> Deferred[Reply]:
        if self._failure is not None:
            return fail(self._failure)
        if self.transport is None:
            return fail(ConnectionLost("not connected", phase=Phase.DATA))
        # Until the terminator is out, a failure cannot have delivered
        # anything: the phase is DATA, and each block gets its own timeout.
        waiter = self._expect(Phase.DATA, seconds=self.timeouts.data_block)
        self._record("C", _BODY_SHOWN)
        _BodyStreamer(self, self._waiters[-1], message.chunks()).start()
        return waiter

    def _block_sent(self, waiter: _Pending) -> None:
        """A block of the body went out: its timeout starts again."""
        self._restart(waiter, waiter.phase, self.timeouts.data_block)

    def _body_finished(self, waiter: _Pending) -> None:
        """The terminator is out: from now on a loss means outcome unknown."""
        self._restart(waiter, Phase.END_OF_DATA, self.timeouts.end_of_data)

    def _restart(self, waiter: _Pending, phase: Phase, seconds: float) -> None:
        waiter.phase = phase
        waiter.seconds = seconds
        waiter.deadline = self.clock.seconds() + seconds
        if self._waiters and self._waiters[0] is waiter:
            self._arm(waiter)

    def rset(self) -> Deferred[Reply]:
        return self._command(b"RSET", Phase.RSET)

    def noop(self) -> Deferred[Reply]:
        return self._command(b"NOOP", Phase.NOOP)

    def quit(self) -> Deferred[Reply]:
        """QUIT; a connection closed instead of a 221 counts as done."""
        return self._command(b"QUIT", Phase.QUIT)

    def abort(self, error: SMTPError) -> None:
        """Drop the connection at once, failing every pending command."""
        self._abort(error)

    # --- internals -----------------------------------------------------------

    def _path(self, address: str, *, null: bool) -> bytes:
        """``<address>``, validated (once per connection and address)."""
        path = self._paths.get(address)
        if path is None or (not address and not null):
            validate_address(address, allow_null=null)
            path = b"<" + address.encode("utf-8") + b">"
            if len(self._paths) < _CACHE_LIMIT:
                self._paths[address] = path
        if needs_smtputf8(address) and not self.capabilities.smtputf8:
            raise ExtensionRequired(
                f"address {address!r} needs SMTPUTF8, which the server does not offer"
            )
        return path

    def _params(self, parameters: Sequence[str]) -> bytes:
        if not parameters:
            return b""
        key = tuple(parameters)
        encoded = self._parameters.get(key)
        if encoded is None:
            checked = []
            for parameter in parameters:
                keyword, equals, value = parameter.partition("=")
                checked.append(validate_parameter(keyword, value if equals else None))
            encoded = b"".join(b" " + p.encode("ascii") for p in checked)
            if len(self._parameters) < _CACHE_LIMIT:
                self._parameters[key] = encoded
        return encoded

    def _command(
        self, line: bytes, phase: Phase, *, shown: bytes | None = None
    ) -> Deferred[Reply]:
        data = line + b"\r\n"
        if _stray_line_break(data, 1):
            return fail(
                InvalidArgument(
                    f"refusing to send a {phase.value} line with CR, LF or NUL"
                )
            )
        return self._send(data, phase, shown=shown if shown is not None else line)

    def _send(
        self,
        data: bytes,
        phase: Phase,
        *,
        shown: bytes,
        seconds: float | None = None,
    ) -> Deferred[Reply]:
        if (refusal := self._not_ready(phase)) is not None:
            return fail(refusal)
        assert self.transport is not None
        waiter = self._expect(phase, seconds=seconds)
        self._record("C", shown)
        write_now(self.transport, data)
        return waiter

    def _not_ready(self, phase: Phase) -> SMTPError | None:
        """Why nothing may be sent now, if anything stops it."""
        if self._failure is not None:
            return self._failure
        if self._pending_tls is not None or self.transport is None:
            return ProtocolViolation(
                f"cannot send {phase.value} before the connection is ready",
                phase=phase,
            )
        return None

    def _expect(self, phase: Phase, *, seconds: float | None = None) -> Deferred[Reply]:
        if seconds is None:
            seconds = self._phase_seconds[phase]
        now = self.clock.seconds()
        waiter = _Waiter(phase, seconds, now, self._cancel)
        self._waiters.append(waiter)
        self._arm(waiter, now)
        return waiter.deferred

    def _arm(self, waiter: _Pending, now: float | None = None) -> None:
        """Make the reply timer due no later than ``waiter``'s deadline.

        It may come due early, for a command answered since; it then waits on
        for the oldest command. So a timer already due sooner is left alone
        (between messages nothing is rescheduled), and no command is ever
        timed out late.
        """
        timer = self._reply_timer
        if timer is not None and timer.active():
            if timer.getTime() <= waiter.deadline:
                return
        else:
            timer = None
        if now is None:
            now = self.clock.seconds()
        delay = max(0.0, waiter.deadline - now)
        if timer is not None:
            timer.reset(delay)
        else:
            self._reply_timer = self.clock.callLater(delay, self._reply_overdue)

    def _disarm(self) -> None:
        timer, self._reply_timer = self._reply_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _reply_overdue(self) -> None:
        self._reply_timer = None
        if not self._waiters:
            return
        oldest = self._waiters[0]
        if oldest.deadline <= self.clock.seconds():
            self._timed_out(oldest.phase, oldest.seconds)
        else:
            self._arm(oldest)

    def _cancel(self, _: Deferred[Any]) -> None:
        """The caller stopped waiting (a service stopping): hang up, so every
        command fails at once with what is known; OutcomeUnknown after the dot."""
        if self._waiters:
            phase: Phase | None = self._waiters[0].phase
        else:
            phase = Phase.TLS_HANDSHAKE if self._pending_tls is not None else None
        waiting = f" for the {phase.value} reply" if phase else ""
        self._abort(Timeout(f"abandoned while waiting{waiting}", phase=phase))

    def _timed_out(self, phase: Phase, seconds: float) -> None:
        self._abort(
            Timeout(f"no {phase.value} reply within {seconds:g} s", phase=phase)
        )

    def _begin_tls(self, waiter: _Waiter, reply: Reply) -> None:
        if self._buffer or self._waiters:
            # RFC 3207 4.2: these bytes were sent before TLS and may have been
            # injected by anyone on the path. Never parse them.
            self.clearLineBuffer()  # type: ignore[no-untyped-call]
            self._abort(
                ResponseInjection(
                    "server sent data behind its 220 to STARTTLS "
                    "(response injection); connection aborted",
                    phase=Phase.STARTTLS,
                )
            )
            waiter.deferred.errback(self._failure)
            return
        tls = self._pending_starttls
        assert tls is not None
        self._pending_tls = tls
        self._tls_done = waiter.deferred
        self._tls_reply = reply
        self.capabilities = Capabilities.empty()
        self._parser.reset()
        self._start_handshake_timer()
        self.transport.startTLS(tls.creator)  # type: ignore[union-attr]

    def _start_handshake_timer(self) -> None:
        self._tls_timer = self.clock.callLater(
            self.timeouts.tls_handshake,
            self._timed_out,
            Phase.TLS_HANDSHAKE,
            self.timeouts.tls_handshake,
        )

    def _cancel_tls_timer(self) -> None:
        if self._tls_timer is not None and self._tls_timer.active():
            self._tls_timer.cancel()
        self._tls_timer = None

    def _abort(self, error: SMTPError) -> None:
        if self._failure is not None:
            return
        self._failure = error
        self._log.info("aborting SMTP connection: {error}", error=str(error))
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        self._fail_pending(error)

    def _record(self, direction: str, line: bytes) -> None:
        if self._transcript is not None:
            self._transcript(direction, line)


def _stray_line_break(data: bytes, lines: int) -> bool:
    """Does ``data``, ``lines`` command lines each ended by CRLF, hold a CR,
    LF or NUL of its own? Validation should make that impossible: this is the
    last guard against command injection, so such data is never sent."""
    return data.count(b"\r") != lines or data.count(b"\n") != lines or b"\0" in data


def _handshake_error(reason: Failure, hostname: str) -> SMTPError:
    """Map why a connection died during the TLS handshake to a typed error."""
    value = reason.value
    if isinstance(value, SMTPError):
        return value
    if isinstance(value, VerificationError):
        return CertificateVerificationFailed(
            f"server certificate is not valid for {hostname}; check the host "
            "name or --tls-hostname",
            phase=Phase.TLS_HANDSHAKE,
        )
    if isinstance(value, SSL.Error):
        detail = _ssl_error_text(value)
        if "certificate verify failed" in detail:
            return CertificateVerificationFailed(
                f"server certificate for {hostname} did not verify ({detail}); "
                "check --ca-file or the system CA store",
                phase=Phase.TLS_HANDSHAKE,
            )
        return TLSHandshakeFailed(
            f"TLS handshake failed: {detail}", phase=Phase.TLS_HANDSHAKE
        )
    return TLSHandshakeFailed(
        f"connection closed during the TLS handshake: {reason.getErrorMessage()}",
        phase=Phase.TLS_HANDSHAKE,
    )


def _ssl_error_text(error: SSL.Error) -> str:
    parts: list[str] = []
    for entry in (
        error.args[0] if error.args and isinstance(error.args[0], list) else []
    ):
        if isinstance(entry, tuple) and entry:
            parts.append(str(entry[-1]))
    return "; ".join(parts) or str(error) or "unknown TLS error"


class ESMTPClientFactory(ClientFactory):
    """Builds ESMTPClient connections for code that connects by hand.

    ``options`` are passed to every ESMTPClient; the latest one built is kept
    in ``protocol_instance`` for the caller to drive.
    """

    def __init__(self, clock: IReactorTime, **options: Any) -> None:
        self._clock = clock
        self._options = options
        self.protocol_instance: ESMTPClient | None = None

    def buildProtocol(self, addr: IAddress | None) -> ESMTPClient:
        client = ESMTPClient(self._clock, **self._options)
        client.factory = self
        self.protocol_instance = client
        return client


@implementer(IPushProducer)
class _BodyStreamer:
    """Writes a body chunk by chunk while the transport keeps up."""

    def __init__(
        self, client: ESMTPClient, waiter: _Pending, chunks: Iterator[bytes]
    ) -> None:
        self._client = client
        self._waiter = waiter
        self._chunks = chunks
        self._paused = False
        self._done = False

    def start(self) -> None:
        self._consumer().registerProducer(self, True)
        self._pump()

    def _consumer(self) -> IConsumer:
        return cast(IConsumer, self._client.transport)

    def _pump(self) -> None:
        transport = self._consumer()
        while not self._paused and not self._done:
            if transport is None or self._client.failure is not None:
                self.stopProducing()
                return
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._done = True
                transport.unregisterProducer()
                self._client._body_finished(self._waiter)
                return
            except (SMTPError, OSError) as error:
                self.stopProducing()
                transport.unregisterProducer()
                # Never send the terminator of a body we could not finish.
                self._client.abort(
                    error
                    if isinstance(error, SMTPError)
                    else LocalError(f"cannot read the message: {error}")
                )
                return
            transport.write(chunk)
            self._client._block_sent(self._waiter)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._done = True
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


def _acknowledge_session_tickets(connection: SSL.Connection, transport: object) -> None:
    """Acknowledge the server's TLS 1.3 session tickets at once.

    The server sends them right after our Finished and then answers our EHLO;
    nothing of ours acknowledges the tickets, so a server with Nagle on holds
    its EHLO reply until our delayed ACK fires (~40 ms a connection: why
    Twisted's own sendmail() manages ~20 msgs/s against Postfix). Setting
    TCP_QUICKACK while OpenSSL processes a ticket sends the pending ACK now.
    """
    while transport is not None and not hasattr(transport, "socket"):
        transport = getattr(transport, "transport", None)
    sock = getattr(transport, "socket", None)
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if sock is None or quickack is None:
        return

    def on_state_change(_: SSL.Connection, where: int, __: int) -> None:
        if where & SSL.SSL_CB_EXIT:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)

    connection.set_info_callback(on_state_change)
