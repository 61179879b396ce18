"""Whole sessions over real loopback TCP: ``send()`` against the test server.

TLS modes, AUTH mechanism selection, per-recipient results, typed errors,
timeouts per phase, extensions, and the SNI the server sees. Every server
listens on 127.0.0.1 only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from tests.support.deferred import ensure_deferred
from tests.support.hostile import unhandled_deferred_errors
from txstarttls.client import Timeouts
from txstarttls.errors import (
    AuthenticationFailed,
    ExtensionRequired,
    InvalidAddress,
    MessageTooLarge,
    OutcomeUnknown,
    Phase,
    RecipientsRefused,
    SMTPError,
    Timeout,
    TLSHandshakeFailed,
    TLSRequired,
)
from txstarttls.sasl import Credentials
from txstarttls.send import send
from txstarttls.session import RecipientResult, SendResult
from txstarttls.testing import (
    CertificateAuthority,
    IssuedCertificate,
    RunningServer,
    ScriptedSMTPServerFactory,
    TestMailServer,
    listen_test_server,
    server_tls_options,
)

HOSTNAME = "mx.test.example"
USERS = {"alice": "correct horse"}
TOKENS = {"bob@test.example": "ya29.token-for-bob"}
SENDER = "alice@test.example"
RECIPIENTS = ["one@test.example", "two@test.example"]
MESSAGE = b"Subject: session test\r\n\r\nHello over loopback.\r\n"
EIGHT_BIT = "Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode()

SHORT = 0.2
"""Seconds for the phase under test in timeout tests."""


@pytest.fixture(autouse=True)
def no_unhandled_deferred_errors() -> Any:
    with unhandled_deferred_errors() as events:
        yield
    assert events == [], "a Deferred failed with nobody handling the error"


def _reactor() -> Any:
    """The reactor pytest-twisted runs (imported late: it installs one)."""
    from twisted.internet import reactor

    return reactor


@asynccontextmanager
async def serving(
    server: TestMailServer | ScriptedSMTPServerFactory,
) -> AsyncIterator[RunningServer]:
    """Listen on a free 127.0.0.1 port for the duration of the block."""
    if isinstance(server, TestMailServer):
        running = await server.start(_reactor())
    else:
        running = await listen_test_server(_reactor(), server)
    try:
        yield running
    finally:
        await running.stop()


def deliver(
    running: RunningServer,
    ca_file: Path | None = None,
    **options: Any,
) -> Deferred[SendResult]:
    """``send()`` to the running server, with the usual test defaults."""
    options.setdefault("sender", SENDER)
    options.setdefault("recipients", RECIPIENTS[:1])
    options.setdefault("message", MESSAGE)
    options.setdefault("ehlo_name", "client.test")
    if ca_file is not None:
        options.setdefault("ca_file", str(ca_file))
        options.setdefault("tls_hostname", HOSTNAME)
    return send(_reactor(), host="127.0.0.1", port=running.port, **options)


async def failure(d: Awaitable[object]) -> SMTPError:
    """The typed error ``d`` fails with."""
    try:
        await d
    except SMTPError as error:
        return error
    raise AssertionError("expected the send to fail")


async def client_bytes(running: RunningServer, index: int = 0) -> bytes:
    """What the client sent on connection ``index`` (AUTH redacted)."""
    log = running.factory.sessions[index]
    await log.when_closed()
    return log.client_bytes()


def commands(data: bytes) -> list[bytes]:
    return [line.split(b" ", 1)[0].upper() for line in data.split(b"\r\n") if line]


@pytest.fixture
def server() -> TestMailServer:
    return TestMailServer(users=USERS, tokens=TOKENS)


@pytest.fixture
def ca_file(server: TestMailServer, tmp_path: Path) -> Path:
    return server.ca_file(tmp_path / "ca.pem")


def password() -> Credentials:
    return Credentials("alice", password="correct horse")


# --- required TLS and AUTH ---------------------------------------------------


@ensure_deferred
async def test_required_tls_with_auth_plain(
    server: TestMailServer, ca_file: Path
) -> None:
    async with serving(server) as running:
        result = await deliver(running, ca_file, credentials=password())
        sent = await client_bytes(running)
    [received] = server.messages
    assert received.data == MESSAGE
    assert received.authenticated_as == "alice"
    assert received.tls and received.helo == "client.test"
    assert b"AUTH PLAIN [redacted]\r\n" in sent
    assert b"correct horse" not in sent
    assert commands(sent).count(b"STARTTLS") == 1
    assert [r.recipient for r in result.delivered] == RECIPIENTS[:1]
    assert result.relay == f"127.0.0.1[127.0.0.1]:{running.port}"
    # What was negotiated is reported, and it is what the server saw.
    assert result.tls is not None
    assert result.tls.version == received.tls_version
    assert result.tls.version in ("TLSv1.2", "TLSv1.3")
    assert result.tls.cipher not in ("", "unknown")
    assert result.tls.peer_fingerprint == server.certificate.fingerprint
    assert result.tls.verified_name == HOSTNAME


@ensure_deferred
async def test_login_when_configured_first(
    server: TestMailServer, ca_file: Path
) -> None:
    credentials = Credentials(
        "alice", password="correct horse", mechanisms=("LOGIN", "PLAIN")
    )
    async with serving(server) as running:
        await deliver(running, ca_file, credentials=credentials)
        sent = await client_bytes(running)
    assert b"AUTH LOGIN\r\n" in sent
    assert b"AUTH PLAIN" not in sent
    assert server.messages[0].authenticated_as == "alice"


def _token_source(kind: str, calls: list[int]) -> Callable[[], Any]:
    token = TOKENS["bob@test.example"]

    def sync() -> str:
        calls.append(1)
        return token

    async def coroutine() -> str:
        calls.append(1)
        return token

    def deferred() -> Deferred[str]:
        calls.append(1)
        return deferLater(_reactor(), 0, lambda: token)

    return {"sync": sync, "coroutine": coroutine, "deferred": deferred}[kind]


@ensure_deferred
@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
@pytest.mark.parametrize("kind", ["sync", "coroutine", "deferred"])
async def test_oauth_token_fetched_once_per_send(
    server: TestMailServer, ca_file: Path, mechanism: str, kind: str
) -> None:
    calls: list[int] = []
    credentials = Credentials(
        "bob@test.example",
        token=_token_source(kind, calls),
        mechanisms=(mechanism,),
    )
    async with serving(server) as running:
        await deliver(running, ca_file, credentials=credentials)
        assert len(calls) == 1
        await deliver(running, ca_file, credentials=credentials)
        assert len(calls) == 2
        for index in (0, 1):
            sent = await client_bytes(running, index)
            assert f"AUTH {mechanism} [redacted]\r\n".encode() in sent
            assert TOKENS["bob@test.example"].encode() not in sent
    assert [m.authenticated_as for m in server.messages] == ["bob@test.example"] * 2


@ensure_deferred
@pytest.mark.parametrize("mechanism", ["XOAUTH2", "OAUTHBEARER"])
async def test_rejected_token_is_authentication_failed(
    server: TestMailServer, ca_file: Path, mechanism: str
) -> None:
    credentials = Credentials(
        "bob@test.example", token=lambda: "expired", mechanisms=(mechanism,)
    )
    async with serving(server) as running:
        error = await failure(deliver(running, ca_file, credentials=credentials))
        sent = await client_bytes(running)
    assert isinstance(error, AuthenticationFailed)
    assert error.code == 535 and error.is_permanent
    assert b"MAIL" not in commands(sent)


@ensure_deferred
async def test_wrong_password_is_authentication_failed(
    server: TestMailServer, ca_file: Path
) -> None:
    wrong = Credentials("alice", password="wrong horse")
    async with serving(server) as running:
        error = await failure(deliver(running, ca_file, credentials=wrong))
        sent = await client_bytes(running)
    assert isinstance(error, AuthenticationFailed)
    assert error.code == 535
    assert error.enhanced == "5.7.8"
    assert error.phase is Phase.AUTH
    assert error.is_permanent
    assert b"MAIL" not in commands(sent)
    assert server.messages == []


# --- opportunistic -----------------------------------------------------------


@ensure_deferred
async def test_opportunistic_without_starttls_delivers_in_plaintext() -> None:
    factory = ScriptedSMTPServerFactory()
    async with serving(factory) as running:
        result = await deliver(running, tls="opportunistic")
    assert result.tls is None
    [received] = factory.messages
    assert not received.tls and received.data == MESSAGE


@ensure_deferred
async def test_opportunistic_without_starttls_refuses_credentials() -> None:
    factory = ScriptedSMTPServerFactory(users=USERS, require_tls_for_auth=False)
    async with serving(factory) as running:
        error = await failure(
            deliver(running, tls="opportunistic", credentials=password())
        )
        sent = await client_bytes(running)
    assert isinstance(error, TLSRequired)
    assert error.is_transient
    assert commands(sent) == [b"EHLO", b"QUIT"]
    assert factory.messages == []


@ensure_deferred
async def test_opportunistic_uses_offered_starttls_and_verifies_it(
    server: TestMailServer, ca_file: Path
) -> None:
    async with serving(server) as running:
        result = await deliver(
            running, ca_file, tls="opportunistic", credentials=password()
        )
    assert result.tls is not None and result.tls.verified_name == HOSTNAME
    assert server.messages[0].tls


@ensure_deferred
async def test_opportunistic_does_not_accept_an_unverifiable_certificate(
    server: TestMailServer, tmp_path: Path
) -> None:
    other = TestMailServer().ca_file(tmp_path / "other-ca.pem")
    async with serving(server) as running:
        error = await failure(deliver(running, other, tls="opportunistic"))
    assert isinstance(error, TLSHandshakeFailed)
    assert server.messages == []


# --- implicit TLS ------------------------------------------------------------


@ensure_deferred
async def test_implicit_tls_delivers(tmp_path: Path) -> None:
    server = TestMailServer(users=USERS, implicit_tls=True)
    ca_file = server.ca_file(tmp_path / "ca.pem")
    async with serving(server) as running:
        result = await deliver(running, ca_file, tls="implicit", credentials=password())
        sent = await client_bytes(running)
    assert b"STARTTLS" not in commands(sent)
    assert result.tls is not None and result.tls.verified_name == HOSTNAME
    [received] = server.messages
    assert received.tls and received.authenticated_as == "alice"


@ensure_deferred
async def test_implicit_tls_against_a_plaintext_greeting_fails(
    ca_file: Path,
) -> None:
    factory = ScriptedSMTPServerFactory(users=USERS, require_tls_for_auth=False)
    async with serving(factory) as running:
        error = await failure(
            deliver(running, ca_file, tls="implicit", credentials=password())
        )
    assert isinstance(error, TLSHandshakeFailed)
    assert error.is_transient
    assert factory.messages == []


# --- none --------------------------------------------------------------------


@ensure_deferred
async def test_none_mode_delivers_in_plaintext() -> None:
    factory = ScriptedSMTPServerFactory()
    async with serving(factory) as running:
        result = await deliver(running, tls="none")
    assert result.tls is None
    assert not factory.messages[0].tls


@ensure_deferred
async def test_none_mode_plaintext_auth_to_loopback_when_allowed() -> None:
    factory = ScriptedSMTPServerFactory(users=USERS, require_tls_for_auth=False)
    async with serving(factory) as running:
        await deliver(
            running, tls="none", credentials=password(), allow_plaintext_auth=True
        )
    assert factory.messages[0].authenticated_as == "alice"


@ensure_deferred
async def test_none_mode_credentials_refused_without_opt_in() -> None:
    factory = ScriptedSMTPServerFactory(users=USERS, require_tls_for_auth=False)
    async with serving(factory) as running:
        error = await failure(deliver(running, tls="none", credentials=password()))
        sent = await client_bytes(running)
    assert isinstance(error, TLSRequired)
    assert error.phase is Phase.AUTH
    assert b"AUTH" not in commands(sent)
    assert b"correct horse" not in sent
    assert factory.messages == []


# --- per-recipient results ---------------------------------------------------


def _refuse(server: TestMailServer, reply: str, local_part: str) -> None:
    server.script.reply_to("RCPT", reply, match=lambda arg: f"<{local_part}@" in arg)


@ensure_deferred
async def test_partial_acceptance_is_reported_per_recipient(
    server: TestMailServer, ca_file: Path
) -> None:
    _refuse(server, "550 5.1.1 No such user", "bad")
    _refuse(server, "450 4.2.1 Mailbox busy", "busy")
    recipients = ["one@test.example", "bad@test.example", "busy@test.example"]
    async with serving(server) as running:
        result = await deliver(running, ca_file, recipients=recipients)
    [received] = server.messages
    assert received.recipients == ("one@test.example",)
    assert [r.recipient for r in result.delivered] == ["one@test.example"]
    assert result.delivered[0].status == "sent"
    refused = {r.recipient: r for r in result.refused}
    assert set(refused) == {"bad@test.example", "busy@test.example"}
    assert refused["bad@test.example"].reply.code == 550
    assert refused["bad@test.example"].status == "bounced"
    assert refused["bad@test.example"].dsn == "5.1.1"
    assert refused["busy@test.example"].reply.code == 450
    assert refused["busy@test.example"].status == "deferred"
    assert [r.recipient for r in result.recipients] == recipients


@ensure_deferred
@pytest.mark.parametrize(
    ("replies", "transient"),
    [
        (["550 5.1.1 No such user", "553 5.1.3 Bad address"], False),
        (["450 4.2.1 Mailbox busy", "451 4.3.0 Try later"], True),
        (["450 4.2.1 Mailbox busy", "550 5.1.1 No such user"], False),
    ],
    ids=["all-permanent", "all-transient", "mixed"],
)
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "serial"])
async def test_all_recipients_refused_sends_no_data(
    server: TestMailServer,
    ca_file: Path,
    replies: list[str],
    transient: bool,
    pipelining: bool,
) -> None:
    for reply, local_part in zip(replies, ("one", "two"), strict=True):
        _refuse(server, reply, local_part)
    if not pipelining:
        server.script.ehlo_extensions(post_tls=["8BITMIME", "SIZE 100000"])
    async with serving(server) as running:
        error = await failure(deliver(running, ca_file, recipients=RECIPIENTS))
        sent = await client_bytes(running)
    assert isinstance(error, RecipientsRefused)
    assert error.is_transient is transient
    results = [r for r in error.recipients if isinstance(r, RecipientResult)]
    assert [r.recipient for r in results] == RECIPIENTS
    assert [r.reply.code for r in results] == [int(reply[:3]) for reply in replies]
    assert not any(r.delivered for r in results)
    if pipelining:
        # RFC 2920: DATA went out in the pipeline and was refused (554).
        assert commands(sent)[-2:] == [b"DATA", b"QUIT"]
    else:
        assert b"DATA" not in commands(sent)
    assert b"Hello over loopback" not in sent
    assert server.messages == []


# --- timeouts ----------------------------------------------------------------


class SilentAfterStarttls(LineReceiver):
    """Greets, offers STARTTLS, says 220 and then never says anything again."""

    delimiter = b"\r\n"

    def connectionMade(self) -> None:
        self.sendLine(b"220 mx.test.example ESMTP")

    def lineReceived(self, line: bytes) -> None:
        if line.upper().startswith(b"EHLO"):
            self.sendLine(b"250-mx.test.example")
            self.sendLine(b"250 STARTTLS")
        elif line.upper() == b"STARTTLS":
            self.sendLine(b"220 2.0.0 Ready to start TLS")
            self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        pass


def _stall(
    command: str, *, pipelining: bool = True
) -> Callable[[TestMailServer], None]:
    def configure(server: TestMailServer) -> None:
        if not pipelining:
            server.script.ehlo_extensions(post_tls=["8BITMIME", "AUTH PLAIN LOGIN"])
        server.script.raw_reply_to(command, b"", times=1)

    return configure


STALLS = {
    "greeting": (_stall("CONNECT"), Timeouts(greeting=SHORT), Phase.GREETING),
    "ehlo": (_stall("EHLO"), Timeouts(command=SHORT), Phase.EHLO),
    "starttls": (_stall("STARTTLS"), Timeouts(command=SHORT), Phase.STARTTLS),
    "auth": (_stall("AUTH"), Timeouts(command=SHORT), Phase.AUTH),
    "mail": (_stall("MAIL", pipelining=False), Timeouts(mail=SHORT), Phase.MAIL),
    "rcpt": (_stall("RCPT", pipelining=False), Timeouts(rcpt=SHORT), Phase.RCPT),
    "data": (_stall("DATA", pipelining=False), Timeouts(data=SHORT), Phase.DATA),
}


@ensure_deferred
@pytest.mark.parametrize("phase_name", list(STALLS))
async def test_stalled_server_times_out_in_the_right_phase(
    server: TestMailServer, ca_file: Path, phase_name: str
) -> None:
    configure, timeouts, phase = STALLS[phase_name]
    configure(server)
    async with serving(server) as running:
        error = await failure(
            deliver(running, ca_file, credentials=password(), timeouts=timeouts)
        )
    assert isinstance(error, Timeout)
    assert error.phase is phase
    assert error.is_transient
    assert server.messages == []


@ensure_deferred
async def test_stall_after_the_dot_is_outcome_unknown(
    server: TestMailServer, ca_file: Path
) -> None:
    server.script.raw_reply_to("DATA_END", b"")
    async with serving(server) as running:
        error = await failure(
            deliver(running, ca_file, timeouts=Timeouts(end_of_data=SHORT))
        )
    assert isinstance(error, OutcomeUnknown)
    assert error.phase is Phase.END_OF_DATA
    assert error.is_transient


@ensure_deferred
async def test_silent_tls_handshake_times_out(ca_file: Path) -> None:
    factory = Factory.forProtocol(SilentAfterStarttls)
    port = _reactor().listenTCP(0, factory, interface="127.0.0.1")
    try:
        error = await failure(
            send(
                _reactor(),
                sender=SENDER,
                recipients=RECIPIENTS[:1],
                message=MESSAGE,
                host="127.0.0.1",
                port=port.getHost().port,
                ca_file=str(ca_file),
                tls_hostname=HOSTNAME,
                timeouts=Timeouts(tls_handshake=SHORT),
            )
        )
    finally:
        await port.stopListening()
    assert isinstance(error, Timeout)
    assert error.phase is Phase.TLS_HANDSHAKE


@ensure_deferred
async def test_overall_deadline(server: TestMailServer, ca_file: Path) -> None:
    server.script.raw_reply_to("AUTH", b"")
    async with serving(server) as running:
        error = await failure(
            deliver(
                running,
                ca_file,
                credentials=password(),
                timeouts=Timeouts(overall=SHORT),
            )
        )
    assert isinstance(error, Timeout)
    assert "overall" in str(error)
    assert error.is_transient


# --- extensions --------------------------------------------------------------


@ensure_deferred
async def test_message_larger_than_size_is_refused_before_mail(
    tmp_path: Path,
) -> None:
    server = TestMailServer(max_size=1000)
    ca_file = server.ca_file(tmp_path / "small-ca.pem")
    message = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 25
    async with serving(server) as running:
        error = await failure(deliver(running, ca_file, message=message))
        sent = await client_bytes(running)
    assert isinstance(error, MessageTooLarge)
    assert "1000" in str(error)
    assert b"MAIL" not in commands(sent) and b"DATA" not in commands(sent)


@ensure_deferred
async def test_size_is_declared_when_offered(
    server: TestMailServer, ca_file: Path
) -> None:
    async with serving(server) as running:
        await deliver(running, ca_file)
    assert server.messages[0].mail_options == (f"SIZE={len(MESSAGE) + 3}",)


@ensure_deferred
async def test_eight_bit_body_without_8bitmime_is_refused(
    server: TestMailServer, ca_file: Path
) -> None:
    server.script.ehlo_extensions(post_tls=["PIPELINING", "SMTPUTF8"])
    async with serving(server) as running:
        error = await failure(deliver(running, ca_file, message=EIGHT_BIT))
        sent = await client_bytes(running)
    assert isinstance(error, ExtensionRequired)
    assert "8BITMIME" in str(error)
    assert b"MAIL" not in commands(sent)


@ensure_deferred
async def test_eight_bit_body_with_8bitmime(
    server: TestMailServer, ca_file: Path
) -> None:
    async with serving(server) as running:
        await deliver(running, ca_file, message=EIGHT_BIT)
    [received] = server.messages
    assert "BODY=8BITMIME" in received.mail_options
    assert received.data == EIGHT_BIT


@ensure_deferred
async def test_smtputf8_address_without_smtputf8_is_refused(
    server: TestMailServer, ca_file: Path
) -> None:
    server.script.ehlo_extensions(post_tls=["PIPELINING", "8BITMIME"])
    async with serving(server) as running:
        error = await failure(
            deliver(running, ca_file, recipients=["ren\u00e9@test.example"])
        )
        sent = await client_bytes(running)
    assert isinstance(error, ExtensionRequired)
    assert "SMTPUTF8" in str(error)
    assert b"MAIL" not in commands(sent)


@ensure_deferred
async def test_smtputf8_address_with_smtputf8(
    server: TestMailServer, ca_file: Path
) -> None:
    async with serving(server) as running:
        result = await deliver(
            running,
            ca_file,
            sender="jos\u00e9@test.example",
            recipients=["ren\u00e9@test.example"],
        )
    [received] = server.messages
    assert "SMTPUTF8" in received.mail_options
    assert received.sender == "jos\u00e9@test.example"
    assert received.recipients == ("ren\u00e9@test.example",)
    assert result.delivered[0].recipient == "ren\u00e9@test.example"


# --- SNI ---------------------------------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
class RecordingServerTLS:
    """Server TLS options that keep every connection, to read the SNI later."""

    def __init__(self, inner: IOpenSSLServerConnectionCreator) -> None:
        self._inner = inner
        self.connections: list[SSL.Connection] = []

    def serverConnectionForTLS(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        connection = self._inner.serverConnectionForTLS(tlsProtocol)
        self.connections.append(connection)
        return connection

    def server_names(self) -> list[bytes | None]:
        return [connection.get_servername() for connection in self.connections]


def recording_server(
    tmp_path: Path, *, implicit_tls: bool = False
) -> tuple[ScriptedSMTPServerFactory, RecordingServerTLS, IssuedCertificate, Path]:
    ca = CertificateAuthority()
    certificate = ca.issue(HOSTNAME, "localhost", "127.0.0.1")
    recording = RecordingServerTLS(server_tls_options(certificate))
    factory = ScriptedSMTPServerFactory(
        hostname=HOSTNAME, tls_options=recording, implicit_tls=implicit_tls
    )
    return factory, recording, certificate, ca.write(tmp_path)


@ensure_deferred
@pytest.mark.parametrize(
    ("mode", "options", "expected"),
    [
        ("required", {"tls_hostname": HOSTNAME}, HOSTNAME.encode()),
        ("implicit", {"tls_hostname": HOSTNAME}, HOSTNAME.encode()),
        ("required", {"tls_hostname": "localhost"}, b"localhost"),
        ("required", {}, None),
    ],
    ids=["starttls", "implicit", "other-name", "ip-address-no-sni"],
)
async def test_sni_is_the_configured_tls_hostname(
    tmp_path: Path, mode: str, options: dict[str, Any], expected: bytes | None
) -> None:
    factory, recording, _, ca_file = recording_server(
        tmp_path, implicit_tls=mode == "implicit"
    )
    async with serving(factory) as running:
        result = await send(
            _reactor(),
            sender=SENDER,
            recipients=RECIPIENTS[:1],
            message=MESSAGE,
            host="127.0.0.1",
            port=running.port,
            tls=mode,
            ca_file=str(ca_file),
            **options,
        )
    assert result.tls is not None
    assert result.tls.verified_name == options.get("tls_hostname", "127.0.0.1")
    assert recording.server_names() == [expected]


@ensure_deferred
async def test_sni_with_a_pinned_certificate(tmp_path: Path) -> None:
    factory, recording, certificate, _ = recording_server(tmp_path)
    async with serving(factory) as running:
        result = await send(
            _reactor(),
            sender=SENDER,
            recipients=RECIPIENTS[:1],
            message=MESSAGE,
            host="127.0.0.1",
            port=running.port,
            fingerprint=certificate.fingerprint,
            tls_hostname=HOSTNAME,
        )
    assert result.tls is not None and result.tls.verified_name is None
    assert result.tls.peer_fingerprint == certificate.fingerprint
    assert recording.server_names() == [HOSTNAME.encode()]


# --- nothing is sent for an invalid envelope ---------------------------------


@ensure_deferred
async def test_injection_never_opens_a_connection(
    server: TestMailServer, ca_file: Path
) -> None:
    async with serving(server) as running:
        error = await failure(
            deliver(
                running,
                ca_file,
                sender="a@x.example\r\nRCPT TO:<evil@y.example>",
            )
        )
        await deferLater(_reactor(), 0.05, lambda: None)
        assert running.factory.sessions == []
    assert isinstance(error, InvalidAddress)


@ensure_deferred
async def test_two_sends_are_two_sessions(
    server: TestMailServer, ca_file: Path
) -> None:
    async with serving(server) as running:
        first = deliver(running, ca_file, credentials=password())
        second = deliver(running, ca_file, recipients=RECIPIENTS[1:])
        results = [await first, await second]
    assert len(server.factory.sessions) == 2
    assert sorted(m.recipients for m in server.messages) == [
        (RECIPIENTS[0],),
        (RECIPIENTS[1],),
    ]
    assert all(r.tls is not None for r in results)
