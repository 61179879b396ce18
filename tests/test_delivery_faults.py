"""The fault matrix: queue runner, real client and a scripted upstream on one Clock.

Every case queues one message for two recipients, lets the runner deliver it
through :class:`MemorySmarthost` (real STARTTLS and AUTH, in memory), and
checks four things: the state of each recipient in the store, the
Postfix-style log line for each, that the next attempt sends only what is
still pending (never an accepted recipient again), and that exactly one
bounce goes back to the sender when one is due and none otherwise.

The rules under test (issue 4, section 2): a 5xx after verified TLS at MAIL,
RCPT, DATA or the final dot bounces; anything before verified TLS (greeting,
EHLO, STARTTLS) is unauthenticated and only defers; 421 anywhere, lost
connections, timeouts, TLS and AUTH failures defer; a loss after the final
dot is retried and logged as a possible duplicate.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from tests.support.memory_smarthost import (
    GOOD_CERTIFICATE,
    OTHER_CA_CERTIFICATE,
    RELAY,
    WRONG_NAME_CERTIFICATE,
    MemorySmarthost,
)
from tests.support.memory_store import MemoryStore
from txstarttls.client import Timeouts
from txstarttls.delivery import DeliverySettings, QueueRunner
from txstarttls.queue import QueueEntry, RecipientState, new_queue_id
from txstarttls.testing import IssuedCertificate, ServerScript

START = 1_800_000_000.0
SENDER = "cron@legacy.example"
A = "a@example.net"
B = "b@example.net"
CONTENT = b"From: Cron <cron@legacy.example>\r\nSubject: nightly\r\n\r\nbody\r\n"
TIMEOUTS = Timeouts()
RETRY = 300.0
"""Postfix's minimal_backoff_time: the first retry, with jitter drawn at 0.5."""

CODES = {
    421: "4.3.2",
    450: "4.2.1",
    451: "4.3.0",
    452: "4.3.1",
    550: "5.7.1",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.7.1",
}
"""Each reply code with a plausible enhanced status code to go with it."""

Match = Callable[[str], bool] | None


def addressed_to(recipient: str) -> Callable[[str], bool]:
    """Match RCPT TO:<recipient> only."""
    return lambda argument: argument.startswith(f"TO:<{recipient}>")


def second_use() -> Match:
    """Match the second use of a command: the EHLO after STARTTLS."""
    uses = itertools.count(1)
    return lambda _argument: next(uses) == 2


@dataclass(frozen=True)
class Phase:
    """Where the upstream misbehaves, and how to script it there."""

    name: str
    command: str
    """The scripted server's name for it (CONNECT: the greeting)."""
    said: str
    """The client's name for it, as in "no rcpt reply within 300 s"."""
    match: Callable[[], Match] = lambda: None
    trusted: bool = True
    """Replies here come after verified TLS."""
    timeout: float = 0.0
    """The client's timeout for the reply here."""

    def __str__(self) -> str:
        return self.name


PHASES = [
    Phase("greeting", "CONNECT", "greeting", trusted=False, timeout=TIMEOUTS.greeting),
    Phase("ehlo", "EHLO", "ehlo", trusted=False, timeout=TIMEOUTS.command),
    Phase("starttls", "STARTTLS", "starttls", trusted=False, timeout=TIMEOUTS.command),
    Phase("ehlo-after-tls", "EHLO", "ehlo", second_use, timeout=TIMEOUTS.command),
    Phase("auth", "AUTH", "auth", timeout=TIMEOUTS.command),
    Phase("mail", "MAIL", "mail", timeout=TIMEOUTS.mail),
    Phase("rcpt", "RCPT", "rcpt", lambda: addressed_to(B), timeout=TIMEOUTS.rcpt),
    Phase("data", "DATA", "data", timeout=TIMEOUTS.data),
    Phase("dot", "DATA_END", "end-of-data", timeout=TIMEOUTS.end_of_data),
]
PHASE = {phase.name: phase for phase in PHASES}

STALLED_BEHIND = {"MAIL": [("RCPT", 2), ("DATA", 1)], "RCPT": [("DATA", 1)]}
"""The client pipelines MAIL, RCPT... and DATA: a server gone silent at one
answers none of the commands behind it (with two recipients)."""

LOG_LINE = re.compile(
    r"^(?P<queue_id>\w+): to=<(?P<to>[^>]*)>, relay=(?P<relay>\S+), "
    r"delay=(?P<delay>[\d.]+), delays=(?P<delays>[\d.]+/[\d.]+/[\d.]+/[\d.]+), "
    r"dsn=(?P<dsn>[245]\.\d{1,3}\.\d{1,3}), "
    r"status=(?P<status>sent|deferred|bounced|expired) \((?P<reply>.*)\)$"
)


class RecordingStore(MemoryStore):
    """A MemoryStore that keeps every entry version written, to audit states."""

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__(clock)
        self.versions: list[QueueEntry] = []

    def add(self, entry: QueueEntry, content: bytes) -> Deferred[None]:
        self.versions.append(entry)
        return super().add(entry, content)

    def update(self, entry: QueueEntry) -> Deferred[None]:
        self.versions.append(entry)
        return super().update(entry)

    def bounces(self) -> list[QueueEntry]:
        """Every bounce ever queued."""
        return [entry for entry in self.versions if entry.is_bounce]


class Relay:
    """A queue runner delivering to a MemorySmarthost, everything on one Clock."""

    def __init__(self, *, certificate: IssuedCertificate = GOOD_CERTIFICATE) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = RecordingStore()
        self.smarthost = MemorySmarthost(self.clock, certificate=certificate)
        self.runner = self.new_runner()
        self.queue_id = ""

    def new_runner(self) -> QueueRunner:
        return QueueRunner(
            self.store,
            [self.smarthost],
            self.clock,
            DeliverySettings(hostname="relay.test.example"),
            draw=lambda: 0.5,
        )

    @property
    def script(self) -> ServerScript:
        return self.smarthost.factory.script

    def queue(self, *recipients: str) -> str:
        self.queue_id = new_queue_id()
        entry = QueueEntry(
            queue_id=self.queue_id,
            sender=SENDER,
            recipients=tuple(RecipientState(r) for r in recipients or (A, B)),
            arrival_time=self.clock.seconds(),
            size=len(CONTENT),
        )
        self.store.add(entry, CONTENT)
        return self.queue_id

    def start(self) -> None:
        self.runner.startService()
        self.clock.advance(0)

    def sessions(self) -> int:
        return len(self.smarthost.factory.sessions)

    def recipients_sent(self, since: int = 0) -> list[str]:
        """RCPT TO addresses the upstream saw for our message, from a session on."""
        sent: list[str] = []
        for session in self.smarthost.factory.sessions[since:]:
            for who, line in session.transcript:
                if who == "C" and line.startswith(b"RCPT TO:<"):
                    sent.append(line[9:].split(b">", 1)[0].decode())
        return [r for r in sent if r != SENDER]

    def delivered(self) -> Counter[str]:
        """How often the upstream accepted our message for each recipient."""
        return Counter(
            r
            for message in self.smarthost.factory.messages
            if message.sender == SENDER
            for r in message.recipients
        )

    def bounce_messages(self) -> list[bytes]:
        return [m.data for m in self.smarthost.factory.messages if m.sender == ""]

    def retry(self) -> None:
        """Advance to the stored next attempt (which must be in the future)."""
        entry = self.store.get(self.queue_id)
        wait = entry.next_attempt - self.clock.seconds()
        assert wait >= RETRY * 0.9, f"retry in {wait} s: a tight loop"
        self.clock.advance(wait)

    def states(self) -> dict[str, str] | None:
        """Each recipient's stored state, or None once the entry was removed."""
        if self.queue_id not in self.store.entries:
            return None
        entry = self.store.get(self.queue_id)
        return {r.address: r.status for r in entry.recipients}


def outcome_lines(logged: list[str], queue_id: str) -> dict[str, list[re.Match[str]]]:
    """The per-recipient log lines for ``queue_id``, by recipient, in order."""
    found: dict[str, list[re.Match[str]]] = {}
    for line in logged:
        match = LOG_LINE.match(line)
        if match is not None and match["queue_id"] == queue_id:
            found.setdefault(match["to"], []).append(match)
    return found


Outcome = tuple[str, str]
"""(status, dsn) as logged for one recipient in one attempt."""


def check_fault(
    relay: Relay,
    logged: list[str],
    first: dict[str, Outcome],
    *,
    reply_text: str | None = None,
    possible_duplicate: bool = False,
) -> None:
    """The first attempt went as ``first`` says; then the retry finishes the job.

    Checks the log lines and stored states of the first attempt, that the
    retry sends only the recipients still pending, that every recipient ends
    delivered exactly once or bounced, and that exactly one bounce (naming
    the bounced recipients) went back to the sender when one was due.
    """
    queue_id = relay.queue_id
    lines = outcome_lines(logged, queue_id)
    assert set(lines) == set(first), logged
    for recipient, (status, dsn) in first.items():
        (line,) = lines[recipient]
        assert (line["status"], line["dsn"]) == (status, dsn), line.string
        assert line["relay"] == RELAY, line.string
        if reply_text is not None and status != "sent":
            assert reply_text in line["reply"], line.string
        assert ("possible duplicate" in line["reply"]) == possible_duplicate, (
            line.string
        )

    states = {"sent": "delivered", "deferred": "pending", "bounced": "bounced"}
    expected_states = {r: states[status] for r, (status, _) in first.items()}
    pending = [r for r, state in expected_states.items() if state == "pending"]
    bounced = [r for r, state in expected_states.items() if state == "bounced"]
    if pending:
        assert relay.states() == expected_states
        assert relay.store.bounces() == [], "a bounce before the message finished"
        entry = relay.store.get(queue_id)
        assert entry.attempts == 1
        sessions_before = relay.sessions()
        relay.retry()
        # The retry asks the upstream for the pending recipients only.
        assert relay.recipients_sent(sessions_before) == pending
        retried = outcome_lines(logged, queue_id)
        for recipient in pending:
            assert retried[recipient][-1]["status"] == "sent"
        for recipient in expected_states.keys() - set(pending):
            assert len(retried[recipient]) == 1, "a finished recipient was retried"
    assert relay.states() is None, "the message should have left the queue"
    accepted = [r for r in first if r not in bounced]
    assert relay.delivered() == Counter(accepted), "a duplicate or a loss"

    bounces = relay.store.bounces()
    if bounced:
        (bounce,) = bounces
        assert bounce.sender == ""
        assert [r.address for r in bounce.recipients] == [SENDER]
        (report,) = relay.bounce_messages()
        for recipient in first:
            final = f"Final-Recipient: rfc822; {recipient}".encode()
            assert (final in report) == (recipient in bounced), report
    else:
        assert bounces == []
        assert relay.bounce_messages() == []
    assert relay.store.entries == {}


def refusal(code: int, phase: Phase) -> str:
    return f"{code} {CODES[code]} scripted {phase.name} refusal"


def expected_refusal(phase: Phase, code: int) -> dict[str, Outcome]:
    """What the first attempt must log for ``code`` at ``phase``."""
    enhanced = CODES[code]
    if phase.name == "rcpt":
        if code == 421:
            # The upstream hung up before DATA: nothing was sent to anyone.
            return {A: ("deferred", "4.0.0"), B: ("deferred", "4.0.0")}
        refused = ("bounced" if code >= 500 else "deferred", enhanced)
        return {A: ("sent", "2.0.0"), B: refused}
    if code >= 500 and phase.trusted and phase.name != "auth":
        return {A: ("bounced", enhanced), B: ("bounced", enhanced)}
    # Deferred: Postfix (soft_bounce) reports a 5xx that did not bounce as 4.x.x.
    return {A: ("deferred", "4" + enhanced[1:]), B: ("deferred", "4" + enhanced[1:])}


@pytest.mark.parametrize("code", sorted(CODES))
@pytest.mark.parametrize("phase", PHASES, ids=str)
def test_reply_code_at_phase(phase: Phase, code: int, logged: list[str]) -> None:
    relay = Relay()
    relay.script.reply_to(
        phase.command,
        refusal(code, phase),
        match=phase.match(),
        times=1,
        then_close=code == 421,
    )
    relay.queue(A, B)
    relay.start()
    first = expected_refusal(phase, code)
    reply_text = None if (phase.name, code) == ("rcpt", 421) else refusal(code, phase)
    check_fault(relay, logged, first, reply_text=reply_text)


def test_5xx_before_tls_is_logged_as_untrusted_not_final(logged: list[str]) -> None:
    """The line for an unauthenticated 5xx says deferred, and so does the store."""
    relay = Relay()
    relay.script.reply_to("CONNECT", "554 5.7.1 go away", times=1)
    relay.queue(A)
    relay.start()
    (line,) = outcome_lines(logged, relay.queue_id)[A]
    assert line["status"] == "deferred"
    assert line["dsn"].startswith("4.")
    entry = relay.store.get(relay.queue_id)
    (recipient,) = entry.recipients
    assert recipient.status == "pending"
    assert recipient.dsn is not None and recipient.dsn.startswith("4.")


@pytest.mark.parametrize("phase", PHASES, ids=str)
def test_disconnect_at_phase(phase: Phase, logged: list[str]) -> None:
    relay = Relay()
    relay.script.disconnect_at(phase.command, match=phase.match(), times=1)
    relay.queue(A, B)
    relay.start()
    lost_after_dot = phase.name == "dot"
    check_fault(
        relay,
        logged,
        {A: ("deferred", "4.0.0"), B: ("deferred", "4.0.0")},
        possible_duplicate=lost_after_dot,
    )


def stall(script: ServerScript, phase: Phase) -> None:
    """The upstream goes silent at ``phase`` for one attempt."""
    script.raw_reply_to(phase.command, b"", match=phase.match(), times=1)
    for command, times in STALLED_BEHIND.get(phase.command, []):
        script.raw_reply_to(command, b"", times=times)


@pytest.mark.parametrize("phase", PHASES, ids=str)
def test_upstream_too_slow_at_phase(phase: Phase, logged: list[str]) -> None:
    relay = Relay()
    stall(relay.script, phase)
    relay.queue(A, B)
    relay.start()
    relay.clock.advance(phase.timeout - 1)
    assert outcome_lines(logged, relay.queue_id) == {}, "gave up too early"
    assert relay.smarthost.in_flight == 1
    relay.clock.advance(1)
    assert relay.smarthost.in_flight == 0
    for (line,) in outcome_lines(logged, relay.queue_id).values():
        assert line["delay"] == f"{phase.timeout:g}", line.string
    check_fault(
        relay,
        logged,
        {A: ("deferred", "4.0.0"), B: ("deferred", "4.0.0")},
        reply_text=f"no {phase.said} reply within {phase.timeout:g} s",
        possible_duplicate=phase.name == "dot",
    )


def test_upstream_too_slow_for_the_tls_handshake(logged: list[str]) -> None:
    """A 220 to STARTTLS, then nothing: the handshake times out."""
    relay = Relay()
    factory = relay.smarthost.factory

    def then_hang(_argument: str) -> bool:
        # Stop reading, as a wedged server does: the ClientHello is never read.
        for protocol in factory.live:
            protocol.paused = True
        return True

    relay.script.raw_reply_to(
        "STARTTLS", b"220 2.0.0 Ready to start TLS\r\n", match=then_hang, times=1
    )
    relay.queue(A, B)
    relay.start()
    relay.clock.advance(TIMEOUTS.tls_handshake - 1)
    assert outcome_lines(logged, relay.queue_id) == {}
    relay.clock.advance(1)
    check_fault(
        relay,
        logged,
        {A: ("deferred", "4.0.0"), B: ("deferred", "4.0.0")},
        reply_text="no tls-handshake reply within 60 s",
    )


@pytest.mark.parametrize(
    ("certificate", "reason"),
    [
        pytest.param(OTHER_CA_CERTIFICATE, "did not verify", id="other-ca"),
        pytest.param(
            WRONG_NAME_CERTIFICATE, "not valid for smtp.example.net", id="wrong-name"
        ),
    ],
)
def test_certificate_failure_is_deferred_and_logged_loudly(
    certificate: IssuedCertificate, reason: str, logged: list[str]
) -> None:
    relay = Relay(certificate=certificate)
    relay.queue(A, B)
    relay.start()
    assert any(
        "smarthost refused" in line and "check the TLS and AUTH settings" in line
        for line in logged
    )
    # Nothing but the handshake happened: no EHLO, let alone AUTH, after it.
    (session,) = relay.smarthost.factory.sessions
    assert session.client_bytes().endswith(b"STARTTLS\r\n")
    relay.smarthost.serve_certificate(GOOD_CERTIFICATE)
    check_fault(
        relay,
        logged,
        {A: ("deferred", "4.0.0"), B: ("deferred", "4.0.0")},
        reply_text=reason,
    )


def test_server_that_closes_right_after_220_to_starttls(logged: list[str]) -> None:
    relay = Relay()
    relay.script.raw_reply_to(
        "STARTTLS", b"220 2.0.0 Ready to start TLS\r\n", close=True, times=1
    )
    relay.queue(A, B)
    relay.start()
    check_fault(
        relay,
        logged,
        {A: ("deferred", "4.0.0"), B: ("deferred", "4.0.0")},
        reply_text="TLS handshake",
    )


def test_auth_535_is_deferred_every_time_and_never_bounced(
    logged: list[str],
) -> None:
    relay = Relay()
    relay.smarthost = MemorySmarthost(relay.clock, password="wrong password")
    relay.runner = relay.new_runner()
    relay.queue(A, B)
    relay.start()
    for attempt in (1, 2, 3):
        lines = outcome_lines(logged, relay.queue_id)
        for recipient in (A, B):
            assert len(lines[recipient]) == attempt
            line = lines[recipient][-1]
            assert (line["status"], line["dsn"]) == ("deferred", "4.7.8")
            assert "535 5.7.8" in line["reply"]
            assert "check the user name and password" in line["reply"]
        assert relay.states() == {A: "pending", B: "pending"}
        relay.retry()
    assert sum("check the TLS and AUTH settings" in line for line in logged) == 4
    assert relay.smarthost.factory.messages == []
    assert relay.store.bounces() == []


def test_auth_535_once_then_delivered(logged: list[str]) -> None:
    relay = Relay()
    relay.script.reply_to(
        "AUTH", "535 5.7.8 Authentication credentials invalid", times=1
    )
    relay.queue(A, B)
    relay.start()
    check_fault(
        relay,
        logged,
        {A: ("deferred", "4.7.8"), B: ("deferred", "4.7.8")},
        reply_text="535 5.7.8 Authentication credentials invalid",
    )


@pytest.mark.parametrize(
    ("replies", "first"),
    [
        (
            {A: "550 5.1.1 no such user", B: "553 5.1.3 bad address"},
            {A: ("bounced", "5.1.1"), B: ("bounced", "5.1.3")},
        ),
        (
            {A: "451 4.3.0 busy", B: "452 4.3.1 full"},
            {A: ("deferred", "4.3.0"), B: ("deferred", "4.3.1")},
        ),
        (
            {A: "550 5.1.1 no such user", B: "451 4.3.0 busy"},
            {A: ("bounced", "5.1.1"), B: ("deferred", "4.3.0")},
        ),
    ],
    ids=["all-permanent", "all-transient", "permanent-and-transient"],
)
def test_every_recipient_refused(
    replies: dict[str, str], first: dict[str, Outcome], logged: list[str]
) -> None:
    """No RCPT accepted: no body is sent; each recipient is judged on its own
    reply, and the one bounce comes when the message is finished."""
    relay = Relay()
    for recipient, reply in replies.items():
        relay.script.reply_to("RCPT", reply, match=addressed_to(recipient), times=1)
    relay.queue(A, B)
    relay.start()
    assert ("C", b".\r\n") not in relay.smarthost.factory.sessions[0].transcript
    check_fault(relay, logged, first)


def test_two_refusals_at_rcpt_after_one_acceptance_bounce_once(
    logged: list[str],
) -> None:
    """Three recipients: one accepted, one refused for good at once, one
    deferred and then refused for good: one bounce, for both, at the end."""
    relay = Relay()
    c = "c@example.net"
    relay.script.reply_to(
        "RCPT", "550 5.1.1 no such user", match=addressed_to(B), times=1
    )
    relay.script.reply_to(
        "RCPT", "452 4.2.2 mailbox full", match=addressed_to(c), times=1
    )
    relay.queue(A, B, c)
    relay.start()
    assert relay.states() == {A: "delivered", B: "bounced", c: "pending"}
    relay.script.reply_to(
        "RCPT", "552 5.2.2 mailbox full for good", match=addressed_to(c)
    )
    sessions = relay.sessions()
    relay.retry()
    assert relay.recipients_sent(sessions) == [c]
    assert relay.states() is None
    assert relay.delivered() == Counter([A])
    assert len(relay.store.bounces()) == 1
    (report,) = relay.bounce_messages()
    assert b"Final-Recipient: rfc822; b@example.net" in report
    assert b"Final-Recipient: rfc822; c@example.net" in report
    assert b"Final-Recipient: rfc822; a@example.net" not in report


# --- a restart in the middle of a delivery -------------------------------------


def check_never_corrupted(store: RecordingStore, queue_id: str) -> None:
    """Every version written holds both recipients, none delivered twice over."""
    for entry in store.versions:
        if entry.queue_id != queue_id:
            continue
        assert [r.address for r in entry.recipients] == [A, B]
        assert {r.status for r in entry.recipients} <= {"pending", "delivered"}


@pytest.mark.parametrize(
    ("phase", "dot_went_out"),
    [
        pytest.param(PHASE["dot"], True, id="waiting-for-the-dot-reply"),
        pytest.param(PHASE["rcpt"], False, id="waiting-for-rcpt"),
    ],
)
def test_restart_during_a_delivery(
    phase: Phase, dot_went_out: bool, logged: list[str]
) -> None:
    """Stopped mid-delivery: abandoned after stop_timeout with its state
    intact, flagged as a possible duplicate only if the dot went out, and
    delivered by the next runner on the same spool."""
    relay = Relay()
    stall(relay.script, phase)
    relay.queue(A, B)
    relay.start()
    assert relay.smarthost.in_flight == 1
    (session,) = relay.smarthost.factory.sessions
    assert (("C", b".\r\n") in session.transcript) == dot_went_out

    stopping = relay.runner.stopService()
    relay.clock.advance(relay.runner.settings.stop_timeout)
    assert stopping.called, "stop must not wait longer than stop_timeout"
    assert any("abandoning 1 deliveries in flight" in line for line in logged)
    assert relay.smarthost.in_flight == 0
    check_never_corrupted(relay.store, relay.queue_id)
    assert relay.states() == {A: "pending", B: "pending"}
    assert relay.store.get(relay.queue_id).attempts == 1
    assert relay.delivered() == Counter()

    lines = outcome_lines(logged, relay.queue_id)
    for recipient in (A, B):
        (line,) = lines[recipient]
        assert line["status"] == "deferred"
        assert ("possible duplicate" in line["reply"]) == dot_went_out, line.string

    # A new process: a new runner and a new pool, the same spool and upstream.
    upstream = relay.smarthost.factory
    relay.smarthost = MemorySmarthost(relay.clock)
    relay.smarthost.factory = upstream
    relay.runner = relay.new_runner()
    relay.runner.startService()
    relay.clock.advance(0)
    assert relay.states() == {A: "pending", B: "pending"}, "retried too early"
    relay.retry()
    assert relay.states() is None
    check_never_corrupted(relay.store, relay.queue_id)
    assert relay.delivered() == Counter([A, B])
    assert relay.store.bounces() == []
    lines = outcome_lines(logged, relay.queue_id)
    for recipient in (A, B):
        assert [line["status"] for line in lines[recipient]] == ["deferred", "sent"]


def test_stop_lets_a_delivery_in_flight_finish(logged: list[str]) -> None:
    """The dot's reply comes within stop_timeout: delivered, not repeated."""
    relay = Relay()
    relay.script.raw_reply_to("DATA_END", b"", times=1)
    relay.queue(A, B)
    relay.start()
    stopping = relay.runner.stopService()
    relay.clock.advance(1)
    assert not stopping.called
    # The upstream answers late, but in time.
    (protocol,) = relay.smarthost.factory.live
    protocol.sendLine(b"250 2.0.0 Ok: queued late")
    relay.smarthost.pump()
    assert stopping.called
    assert relay.states() is None
    lines = outcome_lines(logged, relay.queue_id)
    assert [line["status"] for line in lines[A]] == ["sent"]
    relay.runner = relay.new_runner()
    relay.runner.startService()
    relay.clock.advance(RETRY * 10)
    assert relay.recipients_sent() == [A, B]


def test_stop_does_not_fail_over_to_the_next_smarthost(logged: list[str]) -> None:
    """Abandoning a delivery stuck in setup must not open another session."""
    relay = Relay()
    second = MemorySmarthost(relay.clock)
    relay.runner = QueueRunner(
        relay.store,
        [relay.smarthost, second],
        relay.clock,
        DeliverySettings(hostname="relay.test.example"),
        draw=lambda: 0.5,
    )
    relay.script.raw_reply_to("CONNECT", b"", times=1)
    relay.queue(A, B)
    relay.start()
    stopping = relay.runner.stopService()
    relay.clock.advance(relay.runner.settings.stop_timeout)
    assert stopping.called
    assert second.factory.sessions == []
    assert relay.states() == {A: "pending", B: "pending"}
    lines = outcome_lines(logged, relay.queue_id)
    assert [line["status"] for line in lines[A]] == ["deferred"]
    assert "abandoned while waiting for the greeting reply" in lines[A][0]["reply"]
