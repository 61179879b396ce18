"""The queue runner with a fake smarthost, a memory store and a Clock."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable
from dataclasses import replace

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from tests.support.memory_store import MemoryStore
from txstarttls.delivery import (
    DeliverySettings,
    QueueRunner,
    RetryPolicy,
    postfix_seconds,
)
from txstarttls.errors import (
    AuthenticationFailed,
    CertificateVerificationFailed,
    ConnectionFailed,
    OutcomeUnknown,
    PermanentReplyError,
    Phase,
    RecipientsRefused,
    SMTPError,
    TransientReplyError,
)
from txstarttls.message import PreparedMessage
from txstarttls.queue import QueueEntry, RecipientState, new_queue_id
from txstarttls.reply import Reply
from txstarttls.session import Envelope, RecipientResult, SendResult

DAY = 86400.0
CONTENT = b"From: Cron <root@localhost>\r\nSubject: nightly\r\n\r\nbody\r\n"

Behaviour = Callable[[Envelope, PreparedMessage], "SendResult | SMTPError"]


class FakeSmarthost:
    """Answers each delivery with ``behaviour``; records what it was given."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or accept_all
        self.deliveries: list[tuple[Envelope, bytes]] = []
        self.blocked: list[Deferred[None]] = []
        self.block = False
        self.closed = False

    async def deliver(self, envelope: Envelope, message: PreparedMessage) -> SendResult:
        self.deliveries.append((envelope, b"".join(message.chunks())))
        if self.block:
            gate: Deferred[None] = Deferred()
            self.blocked.append(gate)
            await gate
        outcome = self.behaviour(envelope, message)
        if isinstance(outcome, SMTPError):
            raise outcome
        return outcome

    async def close(self) -> None:
        self.closed = True


def reply(text: str) -> Reply:
    code, _, rest = text.partition(" ")
    enhanced = rest.split(" ")[0] if rest[:1] in "245" and "." in rest else None
    return Reply(int(code), (rest,), enhanced)


def result(
    envelope: Envelope, refused: dict[str, str] | None = None, *, trusted: bool = True
) -> SendResult:
    refused = refused or {}
    final = reply("250 2.0.0 Ok: queued as UP1")
    return SendResult(
        recipients=tuple(
            RecipientResult(r, reply(refused[r]), delivered=False, trusted=trusted)
            if r in refused
            else RecipientResult(r, final, delivered=True)
            for r in envelope.recipients
        ),
        reply=final,
        tls=None,
        relay="smtp.example.net[127.0.0.2]:587",
    )


def accept_all(envelope: Envelope, message: PreparedMessage) -> SendResult | SMTPError:
    return result(envelope)


class Harness:
    def __init__(self, *smarthosts: FakeSmarthost, **settings: object) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryStore()
        self.smarthosts = list(smarthosts) or [FakeSmarthost()]
        self.runner = QueueRunner(
            self.store,
            self.smarthosts,
            self.clock,
            DeliverySettings(hostname="relay.test.example", **settings),  # type: ignore[arg-type]
            draw=lambda: 0.5,
        )

    def queue(
        self,
        *recipients: str,
        sender: str = "cron@legacy.example",
        age: float = 0.0,
        **changes: object,
    ) -> str:
        queue_id = new_queue_id()
        entry = QueueEntry(
            queue_id=queue_id,
            sender=sender,
            recipients=tuple(RecipientState(r) for r in recipients),
            arrival_time=self.clock.seconds() - age,
            size=len(CONTENT),
        )
        self.store.add(replace(entry, **changes), CONTENT)  # type: ignore[arg-type]
        return queue_id

    def start(self) -> None:
        self.runner.startService()
        self.clock.advance(0)

    @property
    def smarthost(self) -> FakeSmarthost:
        return self.smarthosts[0]

    def bounces(self) -> list[QueueEntry]:
        return [e for e in self.store.entries.values() if e.is_bounce]


def test_delivered_message_leaves_the_queue_with_a_postfix_log_line(
    logged: list[str],
) -> None:
    harness = Harness()
    queue_id = harness.queue("a@example.net", "b@example.net")
    harness.start()
    assert harness.store.entries == {}
    ((envelope, body),) = harness.smarthost.deliveries
    assert envelope.recipients == ("a@example.net", "b@example.net")
    assert body.startswith(b"From: Cron")
    sent = [line for line in logged if "status=sent" in line]
    assert sent[0].startswith(
        f"{queue_id}: to=<a@example.net>, relay=smtp.example.net[127.0.0.2]:587, "
        "delay=0, delays=0/0/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as UP1)"
    )


def test_accepted_recipient_is_never_sent_again() -> None:
    smarthost = FakeSmarthost(
        lambda env, _: result(env, {"b@example.net": "451 4.2.0 try later"})
    )
    harness = Harness(smarthost)
    queue_id = harness.queue("a@example.net", "b@example.net")
    harness.start()
    entry = harness.store.get(queue_id)
    assert [r.status for r in entry.recipients] == ["delivered", "pending"]
    assert entry.next_attempt == harness.clock.seconds() + 300
    smarthost.behaviour = accept_all
    harness.clock.advance(300)
    assert [env.recipients for env, _ in smarthost.deliveries] == [
        ("a@example.net", "b@example.net"),
        ("b@example.net",),
    ]
    assert harness.store.entries == {}


def test_deferred_message_is_retried_when_the_store_writes_asynchronously() -> None:
    smarthost = FakeSmarthost(lambda env, _: TransientReplyError("451", code=451))
    harness = Harness(smarthost)
    harness.store = MemoryStore(harness.clock)
    harness.runner.store = harness.store
    queue_id = harness.queue("a@example.net")
    harness.start()
    harness.clock.advance(0)
    assert len(smarthost.deliveries) == 1
    assert harness.store.get(queue_id).attempts == 1
    harness.clock.advance(300)
    harness.clock.advance(0)
    assert len(smarthost.deliveries) == 2


def test_retry_schedule_is_postfix_like_with_jitter() -> None:
    policy = RetryPolicy()
    assert policy.next_attempt(0, 10, 0.5) == 10 + 300
    assert policy.next_attempt(0, 1000, 0.5) == 1000 + 1000
    assert policy.next_attempt(0, 90000, 0.5) == 90000 + 4000
    assert policy.next_attempt(0, 1000, 0.0) == pytest.approx(1000 + 900)
    assert policy.next_attempt(0, 1000, 0.999999) == pytest.approx(1000 + 1100)
    assert policy.expired(0, 5 * DAY)
    assert not policy.expired(0, 5 * DAY - 1)


def test_schedule_survives_a_restart() -> None:
    smarthost = FakeSmarthost(lambda env, _: TransientReplyError("451 later", code=451))
    harness = Harness(smarthost)
    queue_id = harness.queue("a@example.net")
    harness.start()
    due = harness.store.get(queue_id).next_attempt
    harness.runner.stopService()
    again = QueueRunner(
        harness.store,
        [smarthost],
        harness.clock,
        DeliverySettings(hostname="relay.test.example"),
    )
    again.startService()
    harness.clock.advance(due - harness.clock.seconds() - 1)
    assert len(smarthost.deliveries) == 1
    harness.clock.advance(1)
    assert len(smarthost.deliveries) == 2


def test_permanent_refusal_bounces_once_through_the_same_path() -> None:
    smarthost = FakeSmarthost(
        lambda env, _: (
            result(env, {"b@example.net": "550 5.1.1 No such user"})
            if env.sender
            else result(env)
        )
    )
    harness = Harness(smarthost)
    queue_id = harness.queue("a@example.net", "b@example.net")
    harness.start()
    assert queue_id not in harness.store.entries
    bounce_envelope, bounce = smarthost.deliveries[-1]
    assert bounce_envelope.sender == ""
    assert bounce_envelope.recipients == ("cron@legacy.example",)
    parsed = email.message_from_bytes(bounce, policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report"
    assert b"Diagnostic-Code: smtp; 550 5.1.1 No such user" in bounce
    assert b"Final-Recipient: rfc822; b@example.net" in bounce
    assert b"a@example.net" not in bounce.split(b"--txstarttls")[2]
    assert len(smarthost.deliveries) == 2


def test_unauthenticated_5xx_is_deferred_not_bounced() -> None:
    smarthost = FakeSmarthost(
        lambda env, _: result(env, {"a@example.net": "550 5.7.1 no"}, trusted=False)
    )
    harness = Harness(smarthost)
    queue_id = harness.queue("a@example.net", "b@example.net")
    harness.start()
    assert harness.store.get(queue_id).recipients[0].status == "pending"
    assert harness.bounces() == []


@pytest.mark.parametrize(
    "error",
    [
        CertificateVerificationFailed("bad cert", phase=Phase.TLS_HANDSHAKE),
        AuthenticationFailed("535 5.7.8 bad credentials", code=535, phase=Phase.AUTH),
        ConnectionFailed("refused", phase=Phase.CONNECT),
        TransientReplyError("421 4.3.2 bye", code=421, phase=Phase.MAIL),
    ],
)
def test_tls_auth_and_connection_failures_are_deferred(
    error: SMTPError, logged: list[str]
) -> None:
    harness = Harness(FakeSmarthost(lambda env, _: error))
    queue_id = harness.queue("a@example.net")
    harness.start()
    entry = harness.store.get(queue_id)
    assert entry.recipients[0].status == "pending"
    assert entry.attempts == 1
    assert harness.bounces() == []
    assert any("status=deferred" in line for line in logged)
    # Nothing retries in a tight loop.
    harness.clock.advance(299)
    assert len(harness.smarthost.deliveries) == 1


def test_loss_after_the_dot_is_retried_and_flagged_as_possible_duplicate(
    logged: list[str],
) -> None:
    harness = Harness(
        FakeSmarthost(lambda env, _: OutcomeUnknown("lost", phase=Phase.END_OF_DATA))
    )
    queue_id = harness.queue("a@example.net")
    harness.start()
    assert harness.store.get(queue_id).recipients[0].status == "pending"
    assert any("possible duplicate" in line for line in logged)


def test_permanent_message_level_error_bounces_every_pending_recipient() -> None:
    harness = Harness(
        FakeSmarthost(
            lambda env, _: (
                PermanentReplyError(
                    "554 5.6.0 content rejected",
                    code=554,
                    enhanced="5.6.0",
                    phase=Phase.END_OF_DATA,
                )
                if env.sender
                else result(env)
            )
        )
    )
    harness.queue("a@example.net", "b@example.net")
    harness.start()
    _, bounce = harness.smarthost.deliveries[-1]
    assert bounce.count(b"Status: 5.6.0") == 2


def test_all_recipients_refused_uses_per_recipient_results() -> None:
    def refuse(env: Envelope, _: PreparedMessage) -> SendResult | SMTPError:
        if not env.sender:
            return result(env)
        refused = (
            RecipientResult("a@example.net", reply("550 5.1.1 gone"), delivered=False),
            RecipientResult("b@example.net", reply("452 4.2.2 full"), delivered=False),
        )
        return RecipientsRefused("none", recipients=refused, transient=False)

    harness = Harness(FakeSmarthost(refuse))
    queue_id = harness.queue("a@example.net", "b@example.net")
    harness.start()
    entry = harness.store.get(queue_id)
    assert [r.status for r in entry.recipients] == ["bounced", "pending"]
    # The bounce waits until the message is finished: at most one per message.
    assert harness.bounces() == []


def test_expired_message_bounces_with_4_4_7(logged: list[str]) -> None:
    harness = Harness()
    harness.queue("a@example.net", age=5 * DAY + 1, attempts=40)
    harness.start()
    assert any("status=expired" in line for line in logged)
    envelope, bounce = harness.smarthost.deliveries[-1]
    assert envelope.sender == ""
    assert b"Status: 4.4.7" in bounce
    # Only the bounce went out: the expired message itself was not tried.
    assert len(harness.smarthost.deliveries) == 1


@pytest.mark.parametrize(
    "changes", [{"sender": ""}, {"is_bounce": True}, {"notify": "NEVER"}]
)
def test_never_a_bounce_for_null_sender_a_bounce_or_notify_never(
    changes: dict[str, object],
) -> None:
    harness = Harness(
        FakeSmarthost(lambda env, _: result(env, {"a@example.net": "550 5.1.1 x"}))
    )
    notify = changes.pop("notify", None)
    queue_id = harness.queue("a@example.net", **changes)  # type: ignore[arg-type]
    if notify is not None:
        entry = harness.store.get(queue_id)
        harness.store.entries[queue_id] = entry.with_recipient(
            "a@example.net", notify=str(notify)
        )
    harness.start()
    assert harness.store.entries == {}
    assert len(harness.smarthost.deliveries) == 1


def test_delay_warning_is_sent_once() -> None:
    smarthost = FakeSmarthost(
        lambda env, _: (
            TransientReplyError("451 later", code=451, phase=Phase.MAIL)
            if env.sender
            else result(env)
        )
    )
    harness = Harness(smarthost, retry=RetryPolicy(delay_warning=3600))
    queue_id = harness.queue("a@example.net", age=3700)
    harness.start()
    warnings = [env for env, _ in smarthost.deliveries if env.sender == ""]
    assert len(warnings) == 1
    assert b"Will-Retry-Until" in smarthost.deliveries[-1][1]
    assert harness.store.get(queue_id).delay_warned
    harness.clock.advance(4000)
    assert len([env for env, _ in smarthost.deliveries if env.sender == ""]) == 1


def test_failover_to_the_next_smarthost_only_when_setup_failed() -> None:
    first = FakeSmarthost(
        lambda env, _: ConnectionFailed("refused", phase=Phase.CONNECT)
    )
    second = FakeSmarthost()
    harness = Harness(first, second)
    harness.queue("a@example.net")
    harness.start()
    assert len(first.deliveries) == len(second.deliveries) == 1
    assert harness.store.entries == {}

    first.behaviour = lambda env, _: TransientReplyError(
        "452 4.3.1", code=452, phase=Phase.MAIL
    )
    harness.queue("b@example.net")
    harness.runner.notify_queued(harness.store.queue_ids()[0])
    harness.clock.advance(0)
    assert len(second.deliveries) == 1


def test_concurrency_is_capped_and_stop_waits_for_deliveries_in_flight() -> None:
    smarthost = FakeSmarthost()
    smarthost.block = True
    harness = Harness(smarthost, max_concurrent=2)
    for n in range(5):
        harness.queue(f"r{n}@example.net")
    harness.start()
    assert len(smarthost.deliveries) == 2
    stopped = harness.runner.stopService()
    assert not stopped.called
    for gate in list(smarthost.blocked):
        gate.callback(None)
    assert stopped.called
    assert smarthost.closed
    # The two in flight finished; the others were kept, untouched, for later.
    assert len(harness.store.entries) == 3
    assert all(e.attempts == 0 for e in harness.store.entries.values())


def test_flush_retries_deferred_messages_now() -> None:
    smarthost = FakeSmarthost(lambda env, _: TransientReplyError("451", code=451))
    harness = Harness(smarthost)
    harness.queue("a@example.net")
    harness.start()
    smarthost.behaviour = accept_all
    assert harness.runner.flush() == 1
    harness.clock.advance(0)
    assert harness.store.entries == {}


def test_incoming_drops_are_picked_up_promptly() -> None:
    harness = Harness()
    harness.start()
    entry = QueueEntry(
        new_queue_id(), "s@x.example", (RecipientState("a@example.net"),), 0.0, 4
    )
    harness.store.incoming.append((entry, b"hi\r\n"))
    harness.clock.advance(1)
    assert len(harness.smarthost.deliveries) == 1


def test_sender_and_from_rewriting() -> None:
    harness = Harness(
        rewrite_sender="relay@example.net", rewrite_from="relay@example.net"
    )
    harness.queue("a@example.net", sender="root@localhost")
    harness.start()
    envelope, body = harness.smarthost.deliveries[0]
    assert envelope.sender == "relay@example.net"
    assert b"From: Cron <relay@example.net>\r\n" in body


def test_null_sender_is_never_rewritten() -> None:
    harness = Harness(rewrite_sender="relay@example.net")
    harness.queue("a@example.net", sender="")
    harness.start()
    assert harness.smarthost.deliveries[0][0].sender == ""


def test_dsn_parameters_travel_with_the_message() -> None:
    harness = Harness()
    queue_id = harness.queue(
        "a@example.net", mail_parameters=("RET=HDRS", "ENVID=abc+2Bdef")
    )
    entry = harness.store.get(queue_id)
    harness.store.entries[queue_id] = entry.with_recipient(
        "a@example.net", notify="SUCCESS,FAILURE", orcpt="rfc822;orig+40x.example"
    )
    harness.start()
    ((envelope, _),) = harness.smarthost.deliveries
    assert envelope.dsn is not None
    assert envelope.dsn.ret == "HDRS"
    assert envelope.dsn.envid == "abc+def"
    assert envelope.dsn.notify == (("a@example.net", "SUCCESS,FAILURE"),)
    assert envelope.dsn.orcpt == (("a@example.net", "orig@x.example"),)


def test_postfix_seconds() -> None:
    assert postfix_seconds(1.2) == "1.2"
    assert postfix_seconds(0.05) == "0.05"
    assert postfix_seconds(0) == "0"
    assert postfix_seconds(-1) == "0"


def test_no_smarthost_is_a_configuration_error() -> None:
    with pytest.raises(SMTPError):
        QueueRunner(MemoryStore(), [], Clock(), DeliverySettings(hostname="h"))


def test_message_deleted_during_delivery_is_dropped_quietly(logged: list[str]) -> None:
    smarthost = FakeSmarthost(lambda env, _: TransientReplyError("451", code=451))
    smarthost.block = True
    harness = Harness(smarthost)
    queue_id = harness.queue("a@example.net")
    harness.start()
    harness.store.remove(queue_id)  # txstarttls delete, meanwhile
    smarthost.blocked[0].callback(None)
    assert any("deleted by an operator" in line for line in logged)
    assert not any("crashed" in line for line in logged)
    harness.clock.advance(5000)
    assert len(smarthost.deliveries) == 1
