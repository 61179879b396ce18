"""ESMTP extensions and PIPELINING as the client uses them, in memory with TLS."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from twisted.internet import ssl
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from txstarttls.client import ESMTPClient
from txstarttls.dsn import DSNRequest, xtext
from txstarttls.errors import (
    ExtensionRequired,
    InvalidArgument,
    MessageTooLarge,
    RecipientsRefused,
    SMTPError,
)
from txstarttls.message import prepare
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
    message: bytes,
    *,
    pre_tls: Sequence[str] | None = None,
    post_tls: Sequence[str] | None = None,
    rules: Sequence[tuple[str, str]] = (),
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
