"""ESMTP extensions and PIPELINING as the client uses them, in memory with TLS."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from twisted.internet import ssl
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from txstarttls import message as message_module
from txstarttls import session as session_module
from txstarttls.client import ESMTPClient
from txstarttls.dsn import DSNRequest, xtext
from txstarttls.errors import (
    ExtensionRequired,
    InvalidArgument,
    LocalError,
    MessageTooLarge,
    RecipientsRefused,
    SMTPError,
)
from txstarttls.message import MessageInput, PreparedMessage, prepare
from txstarttls.sasl import Credentials
from txstarttls.session import Envelope, SendResult, run_session
from txstarttls.testing import (
    CertificateAuthority,
    ScriptedSMTPServerFactory,
    connect_in_memory,
    server_tls_options,
)
from txstarttls.testing._memory import MemoryConnection
from txstarttls.tls import TLSPolicy
from txstarttls.upstream import Upstream, prepare_tls

CA = CertificateAuthority()
CERTIFICATE = CA.issue("mx.test.example")
TRUST = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(CA.certificate_pem)])
TRANSCRIPT: list[tuple[str, bytes]] = []
"""The client's view of the last run(): what it sent and received, in order."""


def client_view_after_auth() -> list[str]:
    """The transaction as the client lived it: C/S and the verb or code."""
    start = next(i for i, (_, line) in enumerate(TRANSCRIPT) if line.startswith(b"235"))
    return [
        f"{direction} {line.split(b' ')[0].split(b':')[0].decode()}"
        for direction, line in TRANSCRIPT[start + 1 :]
    ]


def run(
    envelope: Envelope,
    message: MessageInput | PreparedMessage,
    *,
    pre_tls: Sequence[str] | None = None,
    post_tls: Sequence[str] | None = None,
    rules: Sequence[tuple[str, str]] = (),
    chunking: bool = False,
) -> tuple[SendResult | Failure, ScriptedSMTPServerFactory, MemoryConnection]:
    """One session in memory against the scripted server; its outcome."""
    factory = ScriptedSMTPServerFactory(
        tls_options=server_tls_options(CERTIFICATE), users={"u": "p"}
    )
    if pre_tls is not None or post_tls is not None:
        factory.script.ehlo_extensions(pre_tls=pre_tls, post_tls=post_tls)
    for command, reply in rules:
        factory.script.reply_to(command, reply)
    upstream = Upstream(
        host="mx.test.example",
        tls=TLSPolicy(),
        credentials=Credentials("u", password="p"),
        ehlo_name="client.example",
        chunking=chunking,
    )
    tls = prepare_tls(upstream, trust_root=TRUST)
    client = ESMTPClient(Clock(), transcript=lambda *line: TRANSCRIPT.append(line))
    TRANSCRIPT.clear()
    connection = connect_in_memory(client, factory.buildProtocol(None))
    outcome: list[SendResult | Failure] = []
    d: Deferred[SendResult] = ensureDeferred(
        run_session(client, upstream, tls, envelope, prepare(message))
    )
    d.addBoth(outcome.append)
    connection.pump()
    assert outcome, "session did not finish"
    return outcome[0], factory, connection


def commands(factory: ScriptedSMTPServerFactory) -> list[bytes]:
    (session,) = factory.sessions
    return [line for direction, line in session.transcript if direction == "C"]


POST_TLS = ["PIPELINING", "SIZE 100000", "AUTH PLAIN", "ENHANCEDSTATUSCODES"]


def test_dsn_parameters_are_passed_on_when_offered() -> None:
    dsn = DSNRequest(
        ret="hdrs",
        envid="id 1+2=3",
        notify=(("a@y.example", "success, failure"),),
        orcpt=(("a@y.example", "orig@y.example"),),
    )
    result, factory, _ = run(
        Envelope("s@x.example", ("a@y.example", "b@y.example"), dsn=dsn),
        b"hi\r\n",
        post_tls=[*POST_TLS, "DSN"],
    )
    assert isinstance(result, SendResult)
    (message,) = factory.messages
    assert "RET=HDRS" in message.mail_options
    assert "ENVID=id+201+2B2+3D3" in message.mail_options
    assert message.recipient_options == (
        ("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;orig@y.example"),
        (),
    )


def test_dsn_parameters_are_dropped_when_not_offered() -> None:
    dsn = DSNRequest(ret="FULL", notify=(("a@y.example", "NEVER"),))
    result, factory, _ = run(
        Envelope("s@x.example", ("a@y.example",), dsn=dsn), b"hi\r\n", post_tls=POST_TLS
    )
    assert isinstance(result, SendResult)
    assert b"RET" not in b"".join(commands(factory))
    assert b"NOTIFY" not in b"".join(commands(factory))


def test_bad_dsn_values_are_refused_locally() -> None:
    with pytest.raises(InvalidArgument):
        DSNRequest(ret="ALL")
    with pytest.raises(InvalidArgument):
        DSNRequest(notify=(("a@y.example", "NEVER,SUCCESS"),))


def test_xtext() -> None:
    assert xtext("a+b=c d\x7f") == "a+2Bb+3Dc+20d+7F"


def test_size_is_declared_and_an_oversized_message_fails_before_data() -> None:
    result, factory, _ = run(
        Envelope("s@x.example", ("a@y.example",)),
        b"x" * 500 + b"\r\n",
        post_tls=["PIPELINING", "SIZE 400", "AUTH PLAIN"],
    )
    assert isinstance(result, Failure)
    assert isinstance(result.value, MessageTooLarge)
    assert result.value.is_permanent
    assert not any(line.startswith(b"MAIL") for line in commands(factory))


def test_eight_bit_body_is_declared_or_refused() -> None:
    body = "Subject: é\r\n\r\nü\r\n".encode()
    result, factory, _ = run(
        Envelope("s@x.example", ("a@y.example",)),
        body,
        post_tls=[*POST_TLS, "8BITMIME"],
    )
    assert isinstance(result, SendResult)
    assert "BODY=8BITMIME" in factory.messages[0].mail_options
    result, factory, _ = run(
        Envelope("s@x.example", ("a@y.example",)), body, post_tls=POST_TLS
    )
    assert isinstance(result, Failure)
    assert isinstance(result.value, ExtensionRequired)
    assert factory.messages == []


def test_smtputf8_addresses_need_the_extension() -> None:
    envelope = Envelope("jörg@x.example", ("zoë@y.example",))
    result, factory, _ = run(envelope, b"hi\r\n", post_tls=[*POST_TLS, "SMTPUTF8"])
    assert isinstance(result, SendResult)
    assert "SMTPUTF8" in factory.messages[0].mail_options
    result, factory, _ = run(envelope, b"hi\r\n", post_tls=POST_TLS)
    assert isinstance(result, Failure)
    assert isinstance(result.value, ExtensionRequired)


def test_pipelining_sends_mail_rcpt_and_data_before_any_reply() -> None:
    result, _, _ = run(
        Envelope("s@x.example", ("a@y.example", "b@y.example")),
        b"hi\r\n",
        post_tls=POST_TLS,
    )
    assert isinstance(result, SendResult)
    assert client_view_after_auth()[:7] == [
        "C MAIL",
        "C RCPT",
        "C RCPT",
        "C DATA",
        "S 250",
        "S 250",
        "S 250",
    ]


def test_without_pipelining_one_command_at_a_time() -> None:
    result, _, _ = run(
        Envelope("s@x.example", ("a@y.example",)),
        b"hi\r\n",
        post_tls=["SIZE 100000", "AUTH PLAIN"],
    )
    assert isinstance(result, SendResult)
    assert client_view_after_auth()[:6] == [
        "C MAIL",
        "S 250",
        "C RCPT",
        "S 250",
        "C DATA",
        "S 354",
    ]


def test_no_body_is_sent_when_no_recipient_was_accepted() -> None:
    result, factory, _ = run(
        Envelope("s@x.example", ("a@y.example", "b@y.example")),
        b"secret body\r\n",
        post_tls=POST_TLS,
        rules=[("RCPT", "550 5.1.1 unknown")],
    )
    assert isinstance(result, Failure)
    assert isinstance(result.value, RecipientsRefused)
    assert [r.reply.code for r in result.value.recipients] == [550, 550]  # type: ignore[attr-defined]
    (session,) = factory.sessions
    assert b"secret body" not in session.client_bytes()


def test_enhanced_status_codes_are_in_every_result() -> None:
    result, _, _ = run(
        Envelope("s@x.example", ("a@y.example", "b@y.example")),
        b"hi\r\n",
        post_tls=POST_TLS,
        rules=[("RCPT", "450 4.2.1 mailbox busy")],
    )
    assert isinstance(result, Failure)
    error = result.value
    assert isinstance(error, SMTPError)
    assert error.is_transient
    assert [r.dsn for r in error.recipients] == ["4.2.1", "4.2.1"]  # type: ignore[attr-defined]


# --- CHUNKING / BDAT (RFC 3030) ----------------------------------------------------

CHUNKING = [*POST_TLS, "CHUNKING"]
DOTTY = b"Subject: dots\r\n\r\n.one\r\n..two\r\nbare\nlf\r\n."


def test_chunking_sends_the_body_unstuffed_with_bdat_last_when_enabled() -> None:
    result, factory, _ = run(
        Envelope("s@x.example", ("a@y.example",)),
        DOTTY,
        post_tls=CHUNKING,
        chunking=True,
    )
    assert isinstance(result, SendResult)
    assert [r.recipient for r in result.delivered] == ["a@y.example"]
    canonical = b"Subject: dots\r\n\r\n.one\r\n..two\r\nbare\r\nlf\r\n.\r\n"
    (message,) = factory.messages
    assert message.data == canonical  # no dot-stuffing, no terminator
    verbs = [line.split(b" ")[0] for line in commands(factory)]
    assert b"DATA" not in verbs
    assert f"BDAT {len(canonical)} LAST\r\n".encode() in commands(factory)
    # MAIL and RCPT still went out together (PIPELINING), then BDAT.
    assert client_view_after_auth()[:4] == ["C MAIL", "C RCPT", "S 250", "S 250"]


def test_chunking_offered_but_not_enabled_uses_data() -> None:
    result, factory, _ = run(
        Envelope("s@x.example", ("a@y.example",)), DOTTY, post_tls=CHUNKING
    )
    assert isinstance(result, SendResult)
    verbs = [line.split(b" ")[0].strip() for line in commands(factory)]
    assert b"DATA" in verbs and b"BDAT" not in verbs


def test_chunking_enabled_but_not_offered_uses_data() -> None:
    result, factory, _ = run(
        Envelope("s@x.example", ("a@y.example",)),
        DOTTY,
        post_tls=POST_TLS,
        chunking=True,
    )
    assert isinstance(result, SendResult)
    verbs = [line.split(b" ")[0].strip() for line in commands(factory)]
    assert b"DATA" in verbs and b"BDAT" not in verbs


def test_large_body_goes_in_counted_chunks_and_arrives_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(message_module, "CHUNK_SIZE", 100)
    monkeypatch.setattr(session_module, "BDAT_CHUNK", 300)
    lines = [b".line %d with a leading dot" % n for n in range(40)]
    path = tmp_path / "big.eml"
    path.write_bytes(b"Subject: big\n\n" + b"\n".join(lines) + b"\n")
    result, factory, _ = run(
        Envelope("s@x.example", ("a@y.example",)),
        str(path),
        post_tls=CHUNKING,
        chunking=True,
    )
    assert isinstance(result, SendResult)
    (message,) = factory.messages
    assert message.data == path.read_bytes().replace(b"\n", b"\r\n")
    bdats = [line for line in commands(factory) if line.startswith(b"BDAT ")]
    assert len(bdats) > 3
    assert all(not line.endswith(b"LAST\r\n") for line in bdats[:-1])
    assert bdats[-1].endswith(b" LAST\r\n")
    sizes = [int(line.split()[1]) for line in bdats]
    assert sum(sizes) == len(message.data)
    assert max(sizes) < 300 + 100 * 2  # bounded: memory stays flat


def test_refused_last_chunk_fails_the_recipients() -> None:
    result, factory, _ = run(
        Envelope("s@x.example", ("a@y.example",)),
        b"hi\r\n",
        post_tls=CHUNKING,
        chunking=True,
        rules=[("DATA_END", "554 5.7.1 Rejected by policy")],
    )
    assert isinstance(result, Failure)
    assert isinstance(result.value, SMTPError)
    assert result.value.code == 554
    assert not factory.messages


def test_failed_chunk_ends_the_transaction_and_nothing_more_is_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "BDAT_CHUNK", 10)
    result, factory, _ = run(
        Envelope("s@x.example", ("a@y.example",)),
        b"x" * 50 + b"\r\n",
        post_tls=CHUNKING,
        chunking=True,
        rules=[("BDAT", "452 4.3.1 Insufficient system storage")],
    )
    assert isinstance(result, Failure)
    assert isinstance(result.value, SMTPError) and result.value.code == 452
    bdats = [line for line in commands(factory) if line.startswith(b"BDAT ")]
    assert bdats == [b"BDAT 52\r\n"]
    assert not factory.messages


def test_no_bdat_when_every_recipient_is_refused() -> None:
    result, factory, _ = run(
        Envelope("s@x.example", ("a@y.example",)),
        b"hi\r\n",
        post_tls=CHUNKING,
        chunking=True,
        rules=[("RCPT", "550 5.1.1 No such user")],
    )
    assert isinstance(result, Failure)
    assert isinstance(result.value, RecipientsRefused)
    assert not any(line.startswith(b"BDAT") for line in commands(factory))


def test_a_body_that_cannot_be_read_never_gets_its_last_chunk(tmp_path: Path) -> None:
    path = tmp_path / "gone.eml"
    path.write_bytes(b"Subject: soon gone\r\n\r\nbody\r\n")
    prepared = prepare(str(path))
    path.unlink()
    result, factory, _ = run(
        Envelope("s@x.example", ("a@y.example",)),
        prepared,
        post_tls=CHUNKING,
        chunking=True,
    )
    assert isinstance(result, Failure)
    assert isinstance(result.value, LocalError)
    assert "cannot read the message" in str(result.value)
    assert not any(line.startswith(b"BDAT") for line in commands(factory))
    assert not factory.messages
