"""Tests for the scriptable ESMTP test server (txstarttls.testing._server).

In memory, a raw-bytes client drives it byte for byte (real TLS included);
on a loopback port, Python's smtplib, a real third-party client, talks to it.
"""

from __future__ import annotations

import base64
import contextlib
import re
import smtplib
import socket
import ssl
from pathlib import Path
from typing import Any, Unpack

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.threads import deferToThread

from tests.support.deferred import ensure_deferred
from tests.support.raw_client import RawClient
from txstarttls.testing import (
    CertificateAuthority,
    IssuedCertificate,
    MemoryConnection,
    MemoryTransport,
    ReceivedMessage,
    RunningServer,
    ScriptedSMTPServerFactory,
    SessionKnobs,
    TestMailServer,
    connect_in_memory,
    server_tls_options,
    start_test_server,
)

HOSTNAME = "mx.test.example"
USERS = {"alice": "correct horse"}
TOKENS = {"bob@test.example": "ya29.token-for-bob"}
SECRETS = [b"correct horse", b"ya29.token-for-bob"]
ENHANCED = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def certificate(ca: CertificateAuthority) -> IssuedCertificate:
    return ca.issue(HOSTNAME, "localhost", "127.0.0.1")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# -- an in-memory session with a raw-bytes client -----------------------------


class Session:
    """One in-memory connection from a :class:`RawClient` to the server."""

    def __init__(self, factory: ScriptedSMTPServerFactory, ca_pem: bytes) -> None:
        self.factory = factory
        self.ca_pem = ca_pem
        self.client = RawClient()
        server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49152))
        self.server = server
        self.connection: MemoryConnection = connect_in_memory(self.client, server)
        self.connection.pump()
        self.greeting = self.client.take()

    @property
    def transport(self) -> MemoryTransport:
        transport = self.client.transport
        assert isinstance(transport, MemoryTransport)
        return transport

    def send(self, data: bytes) -> bytes:
        """Write ``data`` as one segment and return everything said back."""
        self.transport.write(data)
        self.connection.pump()
        return self.client.take()

    def command(self, line: bytes) -> bytes:
        return self.send(line + b"\r\n")

    def start_tls(self, hostname: str = HOSTNAME) -> None:
        trust = Certificate.loadPEM(self.ca_pem)
        self.transport.startTLS(optionsForClientTLS(hostname, trustRoot=trust))
        self.connection.pump()

    def upgrade(self) -> None:
        """EHLO, STARTTLS, handshake, EHLO again."""
        assert self.command(b"EHLO client.test").startswith(b"250-")
        assert self.command(b"STARTTLS") == b"220 2.0.0 Ready to start TLS\r\n"
        self.start_tls()
        assert self.client.handshakes == 1
        assert self.command(b"EHLO client.test").startswith(b"250-")

    @property
    def closed(self) -> bool:
        return self.connection.closed


def ehlo_keywords(reply: bytes) -> list[str]:
    lines = reply.decode().split("\r\n")[1:-1]
    return [line[4:] for line in lines]


@pytest.fixture
def factory(certificate: IssuedCertificate) -> ScriptedSMTPServerFactory:
    return ScriptedSMTPServerFactory(
        tls_options=server_tls_options(certificate), users=USERS, tokens=TOKENS
    )


@pytest.fixture
def session(factory: ScriptedSMTPServerFactory, ca: CertificateAuthority) -> Session:
    return Session(factory, ca.certificate_pem)


def make_session(
    ca: CertificateAuthority,
    certificate: IssuedCertificate,
    **knobs: Unpack[SessionKnobs],
) -> Session:
    factory = ScriptedSMTPServerFactory(
        tls_options=server_tls_options(certificate), **knobs
    )
    return Session(factory, ca.certificate_pem)


# -- greeting, EHLO, STARTTLS -------------------------------------------------


def test_greeting(session: Session) -> None:
    assert session.greeting == b"220 mx.test.example ESMTP txstarttls-test\r\n"


def test_ehlo_before_tls_offers_starttls_but_not_auth(session: Session) -> None:
    reply = session.command(b"EHLO client.test")
    assert reply.startswith(b"250-mx.test.example\r\n")
    assert ehlo_keywords(reply) == [
        "PIPELINING",
        "SIZE 10485760",
        "STARTTLS",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
    ]


def test_ehlo_after_tls_offers_auth_but_not_starttls(session: Session) -> None:
    session.command(b"EHLO client.test")
    session.command(b"STARTTLS")
    session.start_tls()
    keywords = ehlo_keywords(session.command(b"EHLO client.test"))
    assert "STARTTLS" not in keywords
    assert "AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER" in keywords
    assert session.factory.sessions[0].tls


def test_no_tls_options_means_no_starttls(
    ca: CertificateAuthority, certificate: IssuedCertificate
) -> None:
    session = Session(ScriptedSMTPServerFactory(users=USERS), ca.certificate_pem)
    assert "STARTTLS" not in ehlo_keywords(session.command(b"EHLO c"))
    assert session.command(b"STARTTLS") == b"502 5.5.1 Command not implemented\r\n"


def test_auth_offered_before_tls_when_allowed(
    ca: CertificateAuthority, certificate: IssuedCertificate
) -> None:
    session = make_session(ca, certificate, users=USERS, require_tls_for_auth=False)
    assert "AUTH PLAIN LOGIN" in ehlo_keywords(session.command(b"EHLO c"))
    plain = b64(b"\0alice\0correct horse")
    assert session.command(b"AUTH PLAIN " + plain).startswith(b"235 2.7.0 ")


def test_auth_refused_before_tls(session: Session) -> None:
    session.command(b"EHLO client.test")
    reply = session.command(b"AUTH PLAIN " + b64(b"\0alice\0correct horse"))
    assert reply.startswith(b"538 5.7.11 ")


def test_session_is_reset_after_tls(session: Session) -> None:
    session.command(b"EHLO client.test")
    session.command(b"STARTTLS")
    session.start_tls()
    assert session.client.handshakes == 1
    # RFC 3207 4.2: the EHLO from before TLS is forgotten.
    reply = session.command(b"MAIL FROM:<a@test.example>")
    assert reply.startswith(b"503 5.5.1 ")
    assert session.command(b"STARTTLS").startswith(b"503 5.5.1 ")


def test_starttls_refusals(session: Session) -> None:
    assert session.command(b"STARTTLS").startswith(b"503 5.5.1 ")
    session.command(b"EHLO c")
    assert session.command(b"STARTTLS now").startswith(b"501 5.5.4 ")


class TestCommandInjectionAfterStartTLS:
    """CVE-2011-0411: commands pipelined behind STARTTLS must never run."""

    pipelined = b"RSET\r\nMAIL FROM:<evil@attacker.example>\r\n"

    def test_same_segment_is_discarded(self, session: Session) -> None:
        reply = session.send(b"EHLO c\r\nSTARTTLS\r\n" + self.pipelined)
        assert reply.endswith(b"220 2.0.0 Ready to start TLS\r\n")
        assert reply.count(b"\r\n") == 9  # 8 EHLO lines and the 220, nothing else
        log = session.factory.sessions[0]
        assert log.discarded_after_starttls == self.pipelined
        assert b"evil" not in log.client_bytes()
        session.start_tls()
        assert session.client.handshakes == 1
        session.command(b"EHLO c")
        # Had MAIL run, this would be "503 nested MAIL".
        assert session.command(b"MAIL FROM:<a@test.example>") == b"250 2.1.0 Ok\r\n"

    def test_later_segment_reaches_the_tls_layer_not_the_smtp_one(
        self, session: Session
    ) -> None:
        first = b"EHLO c\r\nSTARTTLS\r\n"
        session.connection.client_to_server.split = len(first)
        session.send(first + self.pipelined)
        assert session.closed  # plaintext where a ClientHello belongs
        log = session.factory.sessions[0]
        assert b"evil" not in log.client_bytes()
        assert log.discarded_after_starttls == b""


# -- AUTH ---------------------------------------------------------------------

PLAIN_IR = b"AUTH PLAIN " + b64(b"\0alice\0correct horse")
XOAUTH2_IR = b"AUTH XOAUTH2 " + b64(
    b"user=bob@test.example\x01auth=Bearer ya29.token-for-bob\x01\x01"
)
OAUTHBEARER_IR = b"AUTH OAUTHBEARER " + b64(
    b"n,a=bob@test.example,\x01host=mx.test.example\x01port=587\x01"
    b"auth=Bearer ya29.token-for-bob\x01\x01"
)

AUTH_DIALOGUES: dict[str, tuple[list[tuple[bytes, bytes]], str | None]] = {
    "plain initial response": ([(PLAIN_IR, b"235 2.7.0 ")], "alice"),
    "plain after empty challenge": (
        [
            (b"AUTH PLAIN", b"334 \r\n"),
            (b64(b"alice\0alice\0correct horse"), b"235 2.7.0 "),
        ],
        "alice",
    ),
    "login": (
        [
            (b"AUTH LOGIN", b"334 VXNlcm5hbWU6\r\n"),
            (b64(b"alice"), b"334 UGFzc3dvcmQ6\r\n"),
            (b64(b"correct horse"), b"235 2.7.0 "),
        ],
        "alice",
    ),
    "login initial response": (
        [
            (b"AUTH LOGIN " + b64(b"alice"), b"334 UGFzc3dvcmQ6\r\n"),
            (b64(b"correct horse"), b"235 2.7.0 "),
        ],
        "alice",
    ),
    "xoauth2": ([(XOAUTH2_IR, b"235 2.7.0 ")], "bob@test.example"),
    "oauthbearer": ([(OAUTHBEARER_IR, b"235 2.7.0 ")], "bob@test.example"),
    "plain wrong password": (
        [(b"AUTH PLAIN " + b64(b"\0alice\0wrong"), b"535 5.7.8 ")],
        None,
    ),
    "plain other authzid": (
        [(b"AUTH PLAIN " + b64(b"root\0alice\0correct horse"), b"535 5.7.8 ")],
        None,
    ),
    "xoauth2 bad token": (
        [
            (
                b"AUTH XOAUTH2 "
                + b64(b"user=bob@test.example\x01auth=Bearer nope\x01\x01"),
                b"334 eyJ",
            ),
            (b"", b"535 5.7.8 "),
        ],
        None,
    ),
    "oauthbearer bad token": (
        [
            (
                b"AUTH OAUTHBEARER "
                + b64(b"n,a=bob@test.example,\x01auth=Bearer nope\x01\x01"),
                b"334 eyJ",
            ),
            (b64(b"\x01"), b"535 5.7.8 "),
        ],
        None,
    ),
    "cancelled": (
        [(b"AUTH LOGIN", b"334 "), (b"*", b"501 5.0.0 ")],
        None,
    ),
    "cancelled initial response": ([(b"AUTH PLAIN *", b"501 5.0.0 ")], None),
    "undecodable response": (
        [(b"AUTH PLAIN", b"334 "), (b"not base64!", b"501 5.5.2 ")],
        None,
    ),
    "unknown mechanism": ([(b"AUTH CRAM-MD5", b"504 5.5.4 ")], None),
}


@pytest.mark.parametrize("name", list(AUTH_DIALOGUES))
def test_auth_dialogues(session: Session, name: str) -> None:
    steps, user = AUTH_DIALOGUES[name]
    session.upgrade()
    for line, expected in steps:
        assert session.command(line).startswith(expected), line
    assert session.server.authenticated_as == user
    # The session goes on either way, and secrets never reach the transcript.
    assert session.command(b"NOOP") == b"250 2.0.0 Ok\r\n"
    recorded = session.factory.sessions[0].client_bytes()
    for secret in SECRETS:
        assert secret not in recorded
        assert b64(secret)[:12] not in recorded
    assert b"[redacted]" in recorded or name == "unknown mechanism"


def test_auth_only_once_and_not_in_a_transaction(session: Session) -> None:
    session.upgrade()
    session.command(b"MAIL FROM:<>")
    assert session.command(PLAIN_IR).startswith(b"503 5.5.1 ")
    session.command(b"RSET")
    assert session.command(PLAIN_IR).startswith(b"235 ")
    assert session.command(PLAIN_IR).startswith(b"503 5.5.1 ")


def test_require_auth(ca: CertificateAuthority, certificate: IssuedCertificate) -> None:
    session = make_session(ca, certificate, users=USERS, require_auth=True)
    session.upgrade()
    assert session.command(b"MAIL FROM:<a@test.example>").startswith(b"530 5.7.0 ")
    session.command(PLAIN_IR)
    assert session.command(b"MAIL FROM:<a@test.example>") == b"250 2.1.0 Ok\r\n"


# -- the mail transaction -----------------------------------------------------


def send_message(session: Session, content: bytes) -> bytes:
    return session.send(
        b"MAIL FROM:<alice@test.example> SIZE=100 BODY=8BITMIME\r\n"
        b"RCPT TO:<one@test.example> NOTIFY=SUCCESS,FAILURE\r\n"
        b"RCPT TO:<two@test.example>\r\n"
        b"DATA\r\n"
    ) + session.send(content)


def test_message_is_recorded_exactly(session: Session) -> None:
    session.upgrade()
    session.command(PLAIN_IR)
    replies = send_message(
        session,
        b"Subject: dots\r\n\r\n..leading dot\r\n...two\r\nbare\nLF and .\n.\nCR\r\r\n"
        b".\r\n",
    )
    assert replies == (
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
        b"354 End data with <CR><LF>.<CR><LF>\r\n"
        b"250 2.0.0 Ok: queued as TX00000001\r\n"
    )
    [message] = session.factory.messages
    assert message == ReceivedMessage(
        sender="alice@test.example",
        recipients=("one@test.example", "two@test.example"),
        # Un-stuffed; a bare LF or CR is kept, and "\n.\n" does not end DATA.
        data=(
            b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nbare\nLF and .\n.\nCR\r\r\n"
        ),
        tls=True,
        tls_version=message.tls_version,
        authenticated_as="alice",
        helo="client.test",
        queue_id="TX00000001",
        mail_options=("SIZE=100", "BODY=8BITMIME"),
        recipient_options=(("NOTIFY=SUCCESS,FAILURE",), ()),
        session=1,
    )
    assert message.tls_version in ("TLSv1.2", "TLSv1.3")


def test_transaction_resets_after_the_message(session: Session) -> None:
    session.command(b"EHLO c")
    send_message(session, b"one\r\n.\r\n")
    assert session.command(b"RCPT TO:<x@test.example>").startswith(b"503 5.5.1 ")
    send_message(session, b"two\r\n.\r\n")
    assert [m.data for m in session.factory.messages] == [b"one\r\n", b"two\r\n"]
    assert [m.tls for m in session.factory.messages] == [False, False]
    assert session.factory.messages[1].queue_id == "TX00000002"


def test_empty_message(session: Session) -> None:
    session.command(b"EHLO c")
    assert send_message(session, b".\r\n").endswith(b"queued as TX00000001\r\n")
    assert session.factory.messages[0].data == b""


def test_message_split_into_single_bytes(session: Session) -> None:
    session.command(b"EHLO c")
    session.connection.client_to_server.split = 1
    send_message(session, b"a\r\n..b\r\n.\r\n")
    assert session.factory.messages[0].data == b"a\r\n.b\r\n"


# Any bytes but LF, so a CR may sit anywhere in a line, even last.
LINE = st.binary(max_size=30).map(lambda line: line.replace(b"\n", b""))


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(LINE, max_size=8),
    split=st.integers(min_value=1, max_value=40),
)
def test_any_content_in_any_chunking_is_recorded_exactly(
    lines: list[bytes], split: int
) -> None:
    content = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join(
        (b"." + line if line.startswith(b".") else line) + b"\r\n"
        for line in content.split(b"\r\n")[:-1]
    )
    session = Session(ScriptedSMTPServerFactory(), b"")
    session.command(b"EHLO c")
    session.connection.client_to_server.split = split
    assert send_message(session, stuffed + b".\r\n").endswith(b"TX00000001\r\n")
    assert session.factory.messages[0].data == content


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([b"MAIL FROM:<a@b>"], b"503 5.5.1 "),
        ([b"EHLO c", b"RCPT TO:<a@b>"], b"503 5.5.1 "),
        ([b"EHLO c", b"DATA"], b"503 5.5.1 "),
        ([b"EHLO c", b"MAIL FROM:<a@b>", b"DATA"], b"554 5.5.1 "),
        ([b"EHLO c", b"MAIL FROM:<a@b>", b"MAIL FROM:<a@b>"], b"503 5.5.1 "),
        ([b"EHLO c", b"MAIL FROM: <a@b>"], b"501 5.5.4 "),
        ([b"EHLO c", b"MAIL FROM:a@b"], b"501 5.5.4 "),
        ([b"EHLO c", b"MAIL FROM:<a@b>x"], b"501 5.5.4 "),
        ([b"EHLO c", b"MAIL FROM:<a@b> FOO=1"], b"555 5.5.4 "),
        ([b"EHLO c", b"MAIL FROM:<a@b> SIZE=x"], b"501 5.5.4 "),
        ([b"EHLO c", b"MAIL FROM:<a@b> SIZE=99999999"], b"552 5.3.4 "),
        ([b"EHLO c", "MAIL FROM:<ü@b>".encode()], b"553 5.6.7 "),
        ([b"EHLO c", "MAIL FROM:<ü@b> SMTPUTF8".encode()], b"250 2.1.0 "),
        ([b"EHLO c", b"MAIL FROM:<a@b>", b"RCPT TO:<>"], b"501 5.1.3 "),
        ([b"EHLO c", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d> X=1"], b"555 5.5.4 "),
        ([b"EHLO c", b"MAIL FROM:<a@b>", b"RCPT TO:<@relay:c@d>"], b"250 2.1.5 "),
        ([b"HELO c", b"MAIL FROM:<a@b> BODY=7BIT"], b"555 5.5.4 "),
        ([b"HELO c"], b"250 mx.test.example\r\n"),
        ([b"HELO"], b"501 "),
        ([b"EHLO"], b"501 "),
        ([b"NOOP"], b"250 2.0.0 "),
        ([b"RSET"], b"250 2.0.0 "),
        ([b"RSET x"], b"501 5.5.4 "),
        ([b"VRFY postmaster"], b"252 2.0.0 "),
        ([b"VRFY"], b"501 5.5.4 "),
        ([b"EXPN staff"], b"502 5.5.1 "),
        ([b"FROB"], b"500 5.5.2 "),
        ([b""], b"500 5.5.2 "),
        ([b"NOOP \xff"], b"500 5.5.2 "),
        ([b"mail from:<a@b>"], b"503 5.5.1 "),
    ],
)
def test_command_replies(session: Session, lines: list[bytes], expected: bytes) -> None:
    for line in lines[:-1]:
        session.command(line)
    assert session.command(lines[-1]).startswith(expected)


def test_quit(session: Session) -> None:
    assert session.command(b"QUIT") == b"221 2.0.0 Bye\r\n"
    assert session.closed
    assert session.factory.sessions[0].closed


def test_oversized_message_is_read_to_the_end_then_refused(
    ca: CertificateAuthority, certificate: IssuedCertificate
) -> None:
    session = make_session(ca, certificate, max_size=100)
    assert "SIZE 100" in ehlo_keywords(session.command(b"EHLO c"))
    session.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    reply = session.send(b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n.\r\n")
    assert reply == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    assert session.factory.messages == []
    assert session.command(b"MAIL FROM:<a@b>") == b"250 2.1.0 Ok\r\n"


def test_overlong_command_line_closes(session: Session) -> None:
    assert session.send(b"NOOP " + b"x" * 20000).startswith(b"500 5.5.2 ")
    assert session.closed


def test_every_reply_has_an_enhanced_status_code(session: Session) -> None:
    session.upgrade()
    session.command(PLAIN_IR)
    send_message(session, b"hi\r\n.\r\n")
    for line in (b"RSET", b"NOOP", b"VRFY x", b"FROB", b"DATA", b"QUIT"):
        session.command(line)
    transcript = session.factory.sessions[0].transcript
    last_verb = b"CONNECT"
    for who, data in transcript:
        if who == "C":
            last_verb = data.split(b" ", 1)[0].strip().upper()
            continue
        for line in data.split(b"\r\n")[:-1]:
            if last_verb in (b"CONNECT", b"EHLO", b"HELO") or line[:3] == b"354":
                continue
            assert ENHANCED.match(line), line


# -- scripting ----------------------------------------------------------------


def test_scripted_rcpt_failure_matches_one_address(session: Session) -> None:
    rule = session.factory.script.reply_to(
        "RCPT", "550 5.1.1 No such user", match=lambda arg: "bad@" in arg
    )
    session.command(b"EHLO c")
    session.command(b"MAIL FROM:<a@b>")
    assert session.command(b"RCPT TO:<bad@b>") == b"550 5.1.1 No such user\r\n"
    assert session.command(b"RCPT TO:<good@b>") == b"250 2.1.5 Ok\r\n"
    assert session.command(b"RCPT TO:<bad@b>") == b"550 5.1.1 No such user\r\n"
    assert rule.hits == 2
    session.send(b"DATA\r\nx\r\n.\r\n")
    assert session.factory.messages[0].recipients == ("good@b",)


def test_scripted_reply_a_limited_number_of_times(session: Session) -> None:
    session.factory.script.reply_to("DATA_END", "451 4.3.0 try later", times=1)
    session.command(b"EHLO c")
    assert send_message(session, b"x\r\n.\r\n").endswith(b"451 4.3.0 try later\r\n")
    assert session.factory.messages == []
    # The transaction is over after the final dot, whatever the reply.
    assert session.command(b"RCPT TO:<c@d>").startswith(b"503 ")
    assert send_message(session, b"x\r\n.\r\n").endswith(b"queued as TX00000001\r\n")


def test_scripted_multiline_reply_and_close(session: Session) -> None:
    session.factory.script.reply_to(
        "MAIL", "421-4.3.0 go away\n421 4.3.0 really", then_close=True
    )
    session.command(b"EHLO c")
    reply = session.command(b"MAIL FROM:<a@b>")
    assert reply == b"421-4.3.0 go away\r\n421 4.3.0 really\r\n"
    assert session.closed


def test_disconnect_at_data_end(session: Session) -> None:
    session.factory.script.disconnect_at("DATA_END")
    session.command(b"EHLO c")
    replies = send_message(session, b"x\r\n.\r\n")
    assert replies.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert session.closed
    assert session.factory.messages == []
    assert session.client.lost is not None
    assert isinstance(session.client.lost.value, error.ConnectionDone)


def test_abort_at_mail(session: Session) -> None:
    session.factory.script.disconnect_at("MAIL", abort=True)
    session.command(b"EHLO c")
    assert session.command(b"MAIL FROM:<a@b>") == b""
    assert session.client.lost is not None
    assert isinstance(session.client.lost.value, error.ConnectionLost)


def test_raw_reply_to_starttls_injects_in_one_write(session: Session) -> None:
    injected = b"220 Ready\r\n250-mx\r\n250 AUTH PLAIN LOGIN\r\n"
    session.factory.script.raw_reply_to("STARTTLS", injected, start_tls=True)
    session.command(b"EHLO c")
    pipe = session.connection.server_to_client
    reads = pipe.reads
    assert session.command(b"STARTTLS") == injected
    assert pipe.reads == reads + 1
    # The server really did start TLS behind the injected lines.
    session.start_tls()
    assert session.client.handshakes == 1
    assert session.factory.sessions[0].tls


def test_raw_greeting_and_ehlo_extensions(session: Session) -> None:
    session.factory.script.raw_greeting(b"220-first\r\n220 second\r\n")
    session.factory.script.ehlo_extensions(pre_tls=["PIPELINING"], post_tls=["X-NEW"])
    other = Session(session.factory, session.ca_pem)
    assert other.greeting == b"220-first\r\n220 second\r\n"
    assert other.command(b"EHLO c") == b"250-mx.test.example\r\n250 PIPELINING\r\n"
    # Hidden, but still accepted: the server behaves as configured.
    assert other.command(b"STARTTLS").startswith(b"220 ")
    other.start_tls()
    assert other.command(b"EHLO c") == b"250-mx.test.example\r\n250 X-NEW\r\n"


def test_empty_raw_reply_stalls(session: Session) -> None:
    session.factory.script.raw_reply_to("NOOP", b"", times=1)
    assert session.command(b"NOOP") == b""
    assert not session.closed
    assert session.command(b"NOOP") == b"250 2.0.0 Ok\r\n"


def test_connect_can_be_scripted(session: Session) -> None:
    session.factory.script.reply_to("CONNECT", "554 5.3.2 not now", then_close=True)
    other = Session(session.factory, session.ca_pem)
    assert other.greeting == b"554 5.3.2 not now\r\n"
    assert other.closed


def test_script_clear(session: Session) -> None:
    script = session.factory.script
    script.reply_to("NOOP", "500 5.5.2 no")
    script.ehlo_extensions(pre_tls=[])
    script.clear()
    assert session.command(b"NOOP") == b"250 2.0.0 Ok\r\n"
    assert "PIPELINING" in ehlo_keywords(session.command(b"EHLO c"))


def test_script_rejects_bad_command_names(session: Session) -> None:
    with pytest.raises(ValueError, match="not a command name"):
        session.factory.script.reply_to("MAIL FROM", "250 ok")


# -- implicit TLS and waiting -------------------------------------------------


def test_implicit_tls_in_memory(
    ca: CertificateAuthority, certificate: IssuedCertificate
) -> None:
    factory = ScriptedSMTPServerFactory(
        tls_options=server_tls_options(certificate), users=USERS, implicit_tls=True
    )
    client = RawClient()
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 49152))
    connection = connect_in_memory(client, server)
    transport = client.transport
    assert isinstance(transport, MemoryTransport)
    trust = Certificate.loadPEM(ca.certificate_pem)
    transport.startTLS(optionsForClientTLS(HOSTNAME, trustRoot=trust))
    connection.pump()
    assert client.take() == b"220 mx.test.example ESMTP txstarttls-test\r\n"
    assert b"220 mx.test" not in connection.server_to_client.delivered
    transport.write(b"EHLO c\r\n")
    connection.pump()
    keywords = ehlo_keywords(client.take())
    assert "STARTTLS" not in keywords
    assert "AUTH PLAIN LOGIN" in keywords


def test_implicit_tls_needs_options() -> None:
    with pytest.raises(ValueError, match="implicit_tls"):
        ScriptedSMTPServerFactory(implicit_tls=True)


def test_wait_for_messages(session: Session) -> None:
    waited: list[list[ReceivedMessage]] = []
    session.factory.wait_for_messages(2).addCallback(waited.append)
    session.command(b"EHLO c")
    send_message(session, b"one\r\n.\r\n")
    assert waited == []
    send_message(session, b"two\r\n.\r\n")
    assert [m.data for m in waited[0]] == [b"one\r\n", b"two\r\n"]
    done: list[list[ReceivedMessage]] = []
    session.factory.wait_for_messages(1).addCallback(done.append)
    assert len(done[0]) == 1


def test_session_log_when_closed_and_text(session: Session) -> None:
    log = session.factory.sessions[0]
    closed: list[object] = []
    log.when_closed().addCallback(closed.append)
    session.command(b"QUIT")
    assert closed == [log]
    assert log.text().splitlines() == [
        "S: 220 mx.test.example ESMTP txstarttls-test",
        "C: QUIT",
        "S: 221 2.0.0 Bye",
    ]
    assert log.peer == "127.0.0.1:49152"
    assert session.factory.transcripts() == [log.transcript]


def test_test_mail_server_writes_its_ca(tmp_path: Path) -> None:
    server = TestMailServer(users=USERS)
    path = server.ca_file(tmp_path / "ca.pem")
    assert path.read_bytes() == server.ca_pem
    assert server.factory.settings.hostname == HOSTNAME
    assert server.ssl_context().cert_store_stats()["x509_ca"] == 1


# -- real loopback sockets, real third-party client ---------------------------


def smtplib_session(
    port: int, context: Any, message: bytes, recipients: list[str]
) -> tuple[list[str], list[str], dict[str, tuple[int, bytes]]]:
    """What a user's script would do; returns EHLO keywords and refusals."""
    with smtplib.SMTP("localhost", port, local_hostname="client.test") as client:
        client.ehlo()
        before = sorted(client.esmtp_features)
        client.starttls(context=context)
        client.ehlo()
        after = sorted(client.esmtp_features)
        client.login("alice", "correct horse")
        refused = client.sendmail("alice@test.example", recipients, message)
    return before, after, refused


@ensure_deferred
async def test_smtplib_starttls_login_and_send() -> None:
    from twisted.internet import reactor

    server = TestMailServer(users=USERS)
    server.script.reply_to(
        "RCPT", "550 5.1.1 No such user", match=lambda arg: "bad@" in arg
    )
    running: RunningServer = await server.start(reactor)
    try:
        assert running.host == "127.0.0.1" and running.port > 0
        message = (
            b"Subject: test\r\n\r\n.starts with a dot\r\n..two dots\r\nbare LF\nend"
        )
        before, after, refused = await deferToThread(
            smtplib_session,
            running.port,
            server.ssl_context(),
            message,
            ["good@test.example", "bad@test.example"],
        )
        assert "starttls" in before and "auth" not in before
        assert "auth" in after and "starttls" not in after
        assert refused == {"bad@test.example": (550, b"5.1.1 No such user")}
        [received] = await running.factory.wait_for_messages(1)
        # smtplib sends bytes as they are (a bare LF too) and ends with CRLF.
        assert received.data == message + b"\r\n"
        assert received.recipients == ("good@test.example",)
        assert received.tls and received.tls_version in ("TLSv1.2", "TLSv1.3")
        assert received.authenticated_as == "alice"
        assert received.helo == "client.test"
        log = running.factory.sessions[0]
        await log.when_closed()
        assert b"correct horse" not in log.client_bytes()
    finally:
        await running.stop()


def smtplib_data_failure(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port) as client:
        try:
            client.sendmail("a@test.example", ["b@test.example"], b"x\r\n")
        except smtplib.SMTPDataError as failure:
            return failure.smtp_code
    return 0


@ensure_deferred
async def test_start_test_server_scripted_data_failure() -> None:
    from twisted.internet import reactor

    running = await start_test_server(reactor, hostname="relay.test.example")
    try:
        running.factory.script.reply_to("DATA_END", "451 4.3.0 try later")
        code = await deferToThread(smtplib_data_failure, running.port)
        assert code == 451
        assert running.factory.messages == []
        assert running.factory.settings.hostname == "relay.test.example"
    finally:
        await running.stop()


@ensure_deferred
async def test_stop_drops_live_sessions_and_the_port() -> None:
    from twisted.internet import reactor

    running = await start_test_server(reactor)
    client = socket.create_connection(("127.0.0.1", running.port))
    try:
        greeting = await deferToThread(client.recv, 100)
        assert greeting.startswith(b"220 ")
        await running.stop()
        assert running.factory.sessions[0].closed
        # Aborted: the client sees a reset or, at best, the end of the stream.
        with contextlib.suppress(ConnectionResetError):
            assert await deferToThread(client.recv, 100) == b""
    finally:
        client.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", running.port), timeout=5).close()


def pipelined_starttls(port: int, context: ssl.SSLContext) -> list[bytes]:
    """Pipeline MAIL behind STARTTLS in one send, then talk over TLS."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@attacker.example>\r\n")
        while not reader.readline().startswith(b"220 "):
            pass
        with context.wrap_socket(raw, server_hostname=HOSTNAME) as tls:
            tls.sendall(b"EHLO c\r\nMAIL FROM:<a@test.example>\r\nQUIT\r\n")
            received = b""
            while chunk := tls.recv(4096):
                received += chunk
    return received.split(b"\r\n")


@ensure_deferred
async def test_pipelined_starttls_over_a_real_socket() -> None:
    from twisted.internet import reactor

    server = TestMailServer()
    running = await server.start(reactor)
    try:
        lines = await deferToThread(
            pipelined_starttls, running.port, server.ssl_context()
        )
        # Had the injected MAIL run, this MAIL would be "503 nested MAIL".
        assert b"250 2.1.0 Ok" in lines
        assert b"221 2.0.0 Bye" in lines
        log = running.factory.sessions[0]
        assert log.discarded_after_starttls == b"MAIL FROM:<evil@attacker.example>\r\n"
    finally:
        await running.stop()


def test_wait_for_messages_deferred_type(factory: ScriptedSMTPServerFactory) -> None:
    waiting = factory.wait_for_messages(1)
    assert isinstance(waiting, Deferred)
    assert not waiting.called
