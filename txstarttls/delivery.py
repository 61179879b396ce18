"""The queue runner: from the spool to the smarthost, with retries and bounces.

Every queued message is tried against the smarthosts in order (the next one
only when a session could not even be set up), one pooled session per
delivery. Each recipient keeps its own state: one the smarthost accepted is
never sent again; a trusted 5xx bounces it; anything else defers it until
the next attempt, Postfix's schedule: clamp(time in queue, 300 s, 4000 s),
give up after five days. The envelope is rewritten atomically after every
attempt, so a crash or a stop loses nothing and repeats at most the message
whose final dot had gone out (logged as a possible duplicate).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from txstarttls.dsn import (
    DSNRequest,
    RecipientReport,
    ReportedMessage,
    build_report,
    original_headers,
    parse_orcpt,
    xtext_decode,
)
from txstarttls.errors import (
    AuthenticationFailed,
    AuthenticationUnavailable,
    ConfigurationError,
    OutcomeUnknown,
    Phase,
    RecipientsRefused,
    SMTPError,
    TLSError,
)
from txstarttls.message import PreparedMessage, prepare
from txstarttls.metrics import NullMetrics, RelayMetrics
from txstarttls.queue import (
    IMessageStore,
    MessageNotFound,
    QueueEntry,
    RecipientState,
    new_queue_id,
)
from txstarttls.rewrite import rewrite_from_header, rewrite_sender
from txstarttls.session import Envelope, RecipientResult, SendResult

_log = Logger(namespace="txstarttls.delivery")

# A failure in these phases means no session could be set up with this
# smarthost: the next one in the list may do better.
SETUP_PHASES = frozenset(
    {
        None,
        Phase.CONNECT,
        Phase.GREETING,
        Phase.EHLO,
        Phase.HELO,
        Phase.STARTTLS,
        Phase.TLS_HANDSHAKE,
        Phase.AUTH,
    }
)

# Messages up to this size are read into memory to be sent; larger ones are
# spooled to a temporary file and streamed from it.
IN_MEMORY_CONTENT = 1024 * 1024

# Our own settings are wrong, not the message: never bounce for these.
_OUR_FAULT = (AuthenticationFailed, AuthenticationUnavailable, ConfigurationError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Postfix's defaults: minimal/maximal_backoff_time, maximal_queue_lifetime."""

    minimal_backoff: float = 300.0
    maximal_backoff: float = 4000.0
    maximal_lifetime: float = 5 * 86400.0
    delay_warning: float | None = None
    """Warn the sender once after this long in the queue; None: never."""
    jitter: float = 0.1
    """Spread retries by up to this fraction so a burst does not return as one."""

    def next_attempt(self, arrival: float, now: float, draw: float) -> float:
        """When to try again; ``draw`` is uniform in [0, 1)."""
        backoff = min(max(now - arrival, self.minimal_backoff), self.maximal_backoff)
        return now + backoff * (1.0 + self.jitter * (2.0 * draw - 1.0))

    def expired(self, arrival: float, now: float) -> bool:
        return now - arrival >= self.maximal_lifetime


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How the runner behaves; the smarthosts come as pools."""

    hostname: str
    """This relay's name, as Reporting-MTA in bounces."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_concurrent: int = 20
    rewrite_sender: str | None = None
    rewrite_from: str | None = None
    poll_interval: float = 1.0
    """How often ``incoming/`` (the sendmail drop) is checked."""
    stop_timeout: float = 30.0
    """How long a stop waits for deliveries in flight before abandoning them."""

    @property
    def postmaster(self) -> str:
        return f"MAILER-DAEMON@{self.hostname}"


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """What one attempt did to one recipient, for state and the log."""

    address: str
    status: str
    """sent, deferred, bounced or expired (Postfix's words)."""
    dsn: str
    text: str


def outcome_of_result(result: SendResult) -> list[RecipientOutcome]:
    return [_from_recipient_result(r) for r in result.recipients]


def _from_recipient_result(result: RecipientResult) -> RecipientOutcome:
    return RecipientOutcome(
        result.recipient,
        result.status,
        deferred_dsn(result.dsn) if result.status == "deferred" else result.dsn,
        str(result.reply),
    )


def deferred_dsn(dsn: str) -> str:
    """A 5.x.x that does not bounce (untrusted, or our AUTH) is reported as
    4.x.x, as Postfix's soft_bounce does: RFC 3464 delays are never 5.x.x."""
    return "4" + dsn[1:] if dsn.startswith("5") else dsn


def outcome_of_error(
    error: SMTPError, addresses: Sequence[str]
) -> list[RecipientOutcome]:
    """Per-recipient outcome of an attempt that failed as a whole."""
    if isinstance(error, RecipientsRefused):
        return [
            _from_recipient_result(r)
            for r in error.recipients
            if isinstance(r, RecipientResult)
        ]
    bounce = error.is_permanent and not isinstance(error, _OUR_FAULT)
    dsn = error.enhanced or ("5.0.0" if bounce else "4.0.0")
    if not bounce:
        dsn = deferred_dsn(dsn)
    text = str(error)
    if isinstance(error, OutcomeUnknown):
        text += " (possible duplicate on retry)"
    status = "bounced" if bounce else "deferred"
    return [RecipientOutcome(address, status, dsn, text) for address in addresses]


def apply_outcomes(
    entry: QueueEntry, outcomes: Sequence[RecipientOutcome]
) -> QueueEntry:
    """The entry with each recipient's new state; the attempt counted."""
    states = {"sent": "delivered", "bounced": "bounced", "deferred": "pending"}
    for outcome in outcomes:
        recipient = next(r for r in entry.recipients if r.address == outcome.address)
        entry = entry.with_recipient(
            outcome.address,
            status=states[outcome.status],
            dsn=outcome.dsn,
            last_reply=outcome.text,
            attempts=recipient.attempts + 1,
        )
    return entry


def dsn_request(entry: QueueEntry) -> DSNRequest | None:
    """RFC 3461 parameters kept from the submitting client, for the next hop."""
    ret = envid = None
    for parameter in entry.mail_parameters:
        keyword, _, value = parameter.partition("=")
        if keyword.upper() == "RET":
            ret = value
        elif keyword.upper() == "ENVID":
            envid = xtext_decode(value)
    notify = tuple((r.address, r.notify) for r in entry.recipients if r.notify)
    orcpt = tuple(
        (r.address, original)
        for r in entry.recipients
        if r.orcpt and (original := parse_orcpt(r.orcpt)) is not None
    )
    if ret is None and envid is None and not notify and not orcpt:
        return None
    return DSNRequest(ret=ret, envid=envid, notify=notify, orcpt=orcpt)


def wants_notice(recipient: RecipientState, kind: str) -> bool:
    """Did the sender ask (or not refuse) to hear about ``kind`` (FAILURE, DELAY)?"""
    if recipient.notify is None:
        return True
    words = {word.strip().upper() for word in recipient.notify.split(",")}
    return kind in words


def postfix_seconds(value: float) -> str:
    """Postfix's compact style: 1.2, 0.05, 0."""
    text = f"{max(value, 0.0):.2f}".rstrip("0").rstrip(".")
    return text or "0"


class Smarthost(Protocol):
    """Where a message goes; ConnectionPool is the real one."""

    async def deliver(self, envelope: Envelope, message: PreparedMessage) -> SendResult:
        """Deliver or raise a typed SMTPError."""

    async def close(self) -> None:
        """Release connections."""


class QueueRunner(Service):
    """Delivers what the store holds; a twistd service."""

    def __init__(
        self,
        store: IMessageStore,
        pools: Sequence[Smarthost],
        clock: IReactorTime,
        settings: DeliverySettings,
        *,
        draw: Callable[[], float] = random.random,
        metrics: RelayMetrics | None = None,
    ) -> None:
        if not pools:
            raise ConfigurationError("at least one smarthost is needed")
        self.store = store
        self.pools = list(pools)
        self.clock = clock
        self.settings = settings
        self._draw = draw
        self.metrics = metrics or NullMetrics()
        self._timers: dict[str, IDelayedCall] = {}
        self._ready: deque[tuple[str, float]] = deque()
        self._active: dict[str, Deferred[float | None]] = {}
        self._poller: LoopingCall | None = None
        self._stopping = False

    # --- service life ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        self.pick_up_unscheduled()
        poller = LoopingCall(self._poll)
        poller.clock = self.clock
        self._poller = poller
        poller.start(self.settings.poll_interval, now=True).addErrback(
            lambda failure: _log.failure("queue poll failed", failure)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._ready.clear()
        return ensureDeferred(self._finish_in_flight())

    async def _finish_in_flight(self) -> None:
        in_flight = list(self._active.values())
        if in_flight:
            _log.info("waiting for {n} deliveries in flight", n=len(in_flight))
            waiting = DeferredList(in_flight, consumeErrors=True)

            def abandon() -> None:
                _log.warn(
                    "abandoning {n} deliveries in flight; their state is kept",
                    n=len(self._active),
                )
                waiting.cancel()

            timeout = self.clock.callLater(self.settings.stop_timeout, abandon)
            try:
                await waiting
            finally:
                if timeout.active():
                    timeout.cancel()
        for pool in self.pools:
            await pool.close()

    # --- scheduling ------------------------------------------------------------

    def pick_up_unscheduled(self) -> int:
        """Schedule every stored message not known yet; how many.

        At start, and after a listener process ended without saying it had
        queued a message it acknowledged.
        """
        known = {*self._timers, *self._active, *(qid for qid, _ in self._ready)}
        now = self.clock.seconds()
        found = 0
        for queue_id in self.store.queue_ids():
            if queue_id in known:
                continue
            try:
                entry = self.store.get(queue_id)
            except (MessageNotFound, ValueError) as error:
                _log.error(
                    "{queue_id}: cannot load: {error}",
                    queue_id=queue_id,
                    error=str(error),
                )
                continue
            self.schedule(queue_id, max(entry.next_attempt, now))
            found += 1
        return found

    def notify_queued(self, queue_id: str) -> None:
        """A new message was queued: try it now."""
        self.schedule(queue_id, self.clock.seconds())

    def flush(self) -> int:
        """Try every waiting message now (``txstarttls flush``); how many."""
        waiting = list(self._timers)
        for queue_id in waiting:
            self.schedule(queue_id, self.clock.seconds())
        return len(waiting)

    def schedule(self, queue_id: str, when: float) -> None:
        if self._stopping or queue_id in self._active:
            return
        timer = self._timers.pop(queue_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        delay = max(0.0, when - self.clock.seconds())
        self._timers[queue_id] = self.clock.callLater(delay, self._make_ready, queue_id)

    def _make_ready(self, queue_id: str) -> None:
        self._timers.pop(queue_id, None)
        self._ready.append((queue_id, self.clock.seconds()))
        self._pump()

    def _pump(self) -> None:
        while (
            self._ready
            and not self._stopping
            and len(self._active) < self.settings.max_concurrent
        ):
            queue_id, ready_at = self._ready.popleft()
            if queue_id in self._active:
                continue
            attempt = ensureDeferred(self._attempt(queue_id, ready_at))
            self._active[queue_id] = attempt
            attempt.addBoth(self._attempt_done, queue_id)

    def _attempt_done(self, result: float | Failure | None, queue_id: str) -> None:
        """The attempt is over: schedule the next one (if any), start others."""
        self._active.pop(queue_id, None)
        if isinstance(result, Failure):
            # A bug, not a delivery failure: the entry stays as it was; say so
            # loudly and try again after the minimal backoff.
            _log.failure(
                "{queue_id}: delivery attempt crashed", result, queue_id=queue_id
            )
            result = self.clock.seconds() + self.settings.retry.minimal_backoff
        if result is not None:
            self.schedule(queue_id, result)
        self._pump()

    async def _poll(self) -> None:
        for queue_id in await self.store.adopt_incoming():
            _log.info("{queue_id}: picked up from incoming/", queue_id=queue_id)
            self.notify_queued(queue_id)

    # --- one attempt -----------------------------------------------------------

    async def _attempt(self, queue_id: str, ready_at: float) -> float | None:
        """Try once; the time of the next attempt, or None when it is done."""
        try:
            entry = self.store.get(queue_id)
        except MessageNotFound:
            return None  # deleted by an operator meanwhile
        started = self.clock.seconds()
        if self.settings.retry.expired(entry.arrival_time, started):
            entry = self._expire(entry, started)
        else:
            entry = await self._deliver(entry, ready_at, started)
        return await self._conclude(entry)

    async def _deliver(
        self, entry: QueueEntry, ready_at: float, started: float
    ) -> QueueEntry:
        pending = tuple(r.address for r in entry.pending_recipients)
        try:
            envelope = Envelope(
                rewrite_sender(entry.sender, self.settings.rewrite_sender),
                pending,
                dsn=dsn_request(entry),
            )
            message = self._message(entry)
        except SMTPError as error:
            outcomes = outcome_of_error(error, pending)
            relay, setup = "none", 0.0
        else:
            relay, result, setup = await self._via_smarthosts(envelope, message)
            if isinstance(result, SMTPError):
                outcomes = outcome_of_error(result, pending)
                if isinstance(result, TLSError | AuthenticationFailed):
                    _log.error(
                        "{queue_id}: smarthost refused: {error}; check the TLS and "
                        "AUTH settings",
                        queue_id=entry.queue_id,
                        error=str(result),
                    )
            else:
                outcomes = outcome_of_result(result)
                if result.tls is not None and result.setup_seconds > 0:
                    self.metrics.outbound_tls(result.tls.version)
        finished = self.clock.seconds()
        self._log_outcomes(
            entry,
            outcomes,
            relay,
            delays=(
                ready_at - entry.arrival_time,
                started - ready_at,
                setup,
                finished - started - setup,
            ),
            finished=finished,
        )
        return apply_outcomes(entry, outcomes)

    def _message(self, entry: QueueEntry) -> PreparedMessage:
        """The content: in memory when small, else spooled and streamed."""
        if self.settings.rewrite_from is None and entry.size > IN_MEMORY_CONTENT:
            with self.store.open_content(entry.queue_id) as source:
                return prepare(source)
        content = self.store.read_content(entry.queue_id)
        if self.settings.rewrite_from is not None:
            content = rewrite_from_header(content, self.settings.rewrite_from)
        return prepare(content)

    async def _via_smarthosts(
        self, envelope: Envelope, message: PreparedMessage
    ) -> tuple[str, SendResult | SMTPError, float]:
        """The first smarthost that gets past session setup decides."""
        error: SMTPError | None = None
        relay = "none"
        for pool in self.pools:
            try:
                result = await pool.deliver(envelope, message)
            except SMTPError as failure:
                error = failure
                relay = failure.relay or "none"
                if failure.phase in SETUP_PHASES and not self._stopping:
                    continue
                return relay, failure, 0.0
            return result.relay, result, result.setup_seconds
        assert error is not None
        return relay, error, 0.0

    def _expire(self, entry: QueueEntry, now: float) -> QueueEntry:
        days = self.settings.retry.maximal_lifetime / 86400
        outcomes = [
            RecipientOutcome(
                r.address,
                "expired",
                "4.4.7",
                f"message expired after {days:g} days in the queue; last error: "
                f"{r.last_reply or entry.last_error or 'none'}",
            )
            for r in entry.pending_recipients
        ]
        self._log_outcomes(
            entry,
            outcomes,
            "none",
            delays=(now - entry.arrival_time, 0, 0, 0),
            finished=now,
        )
        for outcome in outcomes:
            entry = entry.with_recipient(
                outcome.address,
                status="expired",
                dsn=outcome.dsn,
                last_reply=outcome.text,
            )
        return entry

    async def _conclude(self, entry: QueueEntry) -> float | None:
        """Bounce or warn as needed; then remove, or save for the next attempt."""
        now = self.clock.seconds()
        if entry.is_finished:
            failed = [
                r
                for r in entry.recipients
                if r.status in ("bounced", "expired") and wants_notice(r, "FAILURE")
            ]
            if failed:
                await self._report(entry, failed, now, delayed_until=None)
            await self.store.remove(entry.queue_id)
            _log.info("{queue_id}: removed", queue_id=entry.queue_id)
            return None
        retry = self.settings.retry
        if (
            retry.delay_warning is not None
            and not entry.delay_warned
            and now - entry.arrival_time >= retry.delay_warning
        ):
            waiting = [r for r in entry.pending_recipients if wants_notice(r, "DELAY")]
            if waiting:
                await self._report(
                    entry,
                    waiting,
                    now,
                    delayed_until=entry.arrival_time + retry.maximal_lifetime,
                )
            entry = replace(entry, delay_warned=True)
        next_attempt = retry.next_attempt(entry.arrival_time, now, self._draw())
        last = next(
            (r.last_reply for r in entry.pending_recipients if r.last_reply), None
        )
        entry = replace(
            entry,
            attempts=entry.attempts + 1,
            next_attempt=next_attempt,
            last_error=last,
        )
        try:
            await self.store.update(entry)
        except MessageNotFound:
            _log.info(
                "{queue_id}: deleted by an operator during delivery",
                queue_id=entry.queue_id,
            )
            return None
        return next_attempt

    async def _report(
        self,
        entry: QueueEntry,
        recipients: Sequence[RecipientState],
        now: float,
        *,
        delayed_until: float | None,
    ) -> None:
        """Queue a DSN to the envelope sender; never for <> or for a bounce."""
        if entry.sender == "" or entry.is_bounce:
            return
        try:
            headers = original_headers(self.store.read_content(entry.queue_id))
        except (MessageNotFound, OSError):
            headers = b""
        report = build_report(
            ReportedMessage(entry.queue_id, entry.sender, entry.arrival_time, headers),
            [
                RecipientReport(
                    r.address,
                    "delayed" if delayed_until is not None else "failed",
                    r.dsn or ("4.0.0" if delayed_until is not None else "5.0.0"),
                    diagnostic=r.last_reply,
                    orcpt=r.orcpt,
                )
                for r in recipients
            ],
            reporting_mta=self.settings.hostname,
            postmaster=self.settings.postmaster,
            now=now,
            delayed_until=delayed_until,
        )
        bounce = QueueEntry(
            queue_id=new_queue_id(),
            sender="",
            recipients=(RecipientState(entry.sender),),
            arrival_time=now,
            size=len(report),
            is_bounce=True,
        )
        await self.store.add(bounce, report)
        kind = (
            "delay warning"
            if delayed_until is not None
            else "non-delivery notification"
        )
        _log.info(
            "{queue_id}: sender {kind}: {bounce_id}",
            queue_id=entry.queue_id,
            kind=kind,
            bounce_id=bounce.queue_id,
        )
        self.notify_queued(bounce.queue_id)

    def _log_outcomes(
        self,
        entry: QueueEntry,
        outcomes: Sequence[RecipientOutcome],
        relay: str,
        *,
        delays: tuple[float, float, float, float],
        finished: float,
    ) -> None:
        delay = postfix_seconds(finished - entry.arrival_time)
        shown = "/".join(postfix_seconds(d) for d in delays)
        for outcome in outcomes:
            self.metrics.delivery(outcome.status, finished - entry.arrival_time)
            log = _log.info if outcome.status == "sent" else _log.warn
            log(
                "{queue_id}: to=<{to}>, relay={relay}, delay={delay}, "
                "delays={delays}, dsn={dsn}, status={status} ({reply})",
                queue_id=entry.queue_id,
                to=outcome.address,
                relay=relay,
                delay=delay,
                delays=shown,
                dsn=outcome.dsn,
                status=outcome.status,
                reply=outcome.text,
            )
