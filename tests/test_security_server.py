"""SECURITY-CASES 17-22 against the relay listener, with variants of our own.

Every attack is sent as one TCP segment and again as one-byte reads, in
memory, with real TLS after STARTTLS. Tests are named after the attack.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet.defer import Deferred, succeed
from twisted.logger import LogEvent, capturedLogs
from zope.interface import implementer

from tests.test_server import (
    PASSWORD,
    PLAIN,
    UNTRUSTED,
    USER,
    Session,
    ehlo,
    log_text,
    make_settings,
    open_session,
)
from txstarttls.testing import CertificateAuthority
from txstarttls.userdb import make_portal

SPLITS = [pytest.param(None, id="one-segment"), pytest.param(1, id="byte-by-byte")]


@implementer(ICredentialsChecker)
class SpyChecker:
    """Accepts alice; remembers every credential it was asked to check."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.checked: list[bytes] = []

    def requestAvatarId(
        self, credentials: IUsernamePassword
    ) -> Deferred[bytes | tuple[()]]:
        self.checked.append(credentials.username)
        if (credentials.username, credentials.password) == (USER, PASSWORD):
            return succeed(USER)
        from twisted.cred.error import UnauthorizedLogin
        from twisted.internet.defer import fail

        return fail(UnauthorizedLogin())


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture
def logs() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


def tls_session(
    ca: CertificateAuthority, checker: SpyChecker | None = None, **settings: object
) -> Session:
    return open_session(
        ca,
        settings=make_settings(ca, **settings),
        portal=make_portal(checker or SpyChecker()),
    )


def disconnect_counts(logs: Sequence[LogEvent]) -> str:
    [line] = [t for t in log_text(logs).splitlines() if t.startswith("disconnect")]
    return line


# -- 17: STARTTLS command injection (CVE-2011-0411) ----------------------------------


@pytest.mark.parametrize("injected", [b"RSET\r\n", b"EHLO inject\r\n"])
def test_commands_injected_after_starttls_never_run_in_one_segment(
    ca: CertificateAuthority, injected: bytes, logs: Sequence[LogEvent]
) -> None:
    session = tls_session(ca)
    ehlo(session)
    replies = session.send(b"STARTTLS\r\n" + injected)
    assert [r.code for r in replies] == [220]
    session.client.start_tls(ca)
    session.connection.pump()
    assert session.client.handshakes == 1
    # Nothing answered the injected command, inside or outside TLS, and the
    # server still waits for EHLO: "EHLO inject" did not run.
    assert session.pump() == []
    reply = session.send(b"MAIL FROM:<a@test.example>\r\n")[0]
    assert (reply.code, reply.enhanced) == (503, "5.5.1")
    session.send(b"QUIT\r\n")
    assert "rset" not in disconnect_counts(logs)
    assert "ehlo=1 " in disconnect_counts(logs)
    assert "discarded" in log_text(logs)


@pytest.mark.parametrize("injected", [b"RSET\r\n", b"EHLO inject\r\n"])
def test_commands_injected_after_starttls_byte_by_byte_kill_the_handshake(
    ca: CertificateAuthority, injected: bytes, logs: Sequence[LogEvent]
) -> None:
    """Arriving after TLS started, the plaintext is a broken TLS record."""
    session = tls_session(ca)
    ehlo(session)
    replies = session.send(b"STARTTLS\r\n" + injected, split=1)
    assert [r.code for r in replies] == [220]
    session.client.start_tls(ca)
    session.connection.pump()
    assert session.closed
    assert session.client.handshakes == 0
    assert "rset" not in disconnect_counts(logs)
    assert "ehlo=1 " in disconnect_counts(logs)


@pytest.mark.parametrize("split", SPLITS)
def test_auth_injected_after_starttls_does_not_authenticate(
    ca: CertificateAuthority, split: int | None, logs: Sequence[LogEvent]
) -> None:
    checker = SpyChecker()
    session = tls_session(ca, checker, allowed_networks=UNTRUSTED)
    ehlo(session)
    payload = (
        b"STARTTLS\r\nEHLO x\r\nAUTH PLAIN "
        + PLAIN
        + b"\r\nMAIL FROM:<a@x.example>\r\n"
    )
    assert [r.code for r in session.send(payload, split=split)] == [220]
    session.client.start_tls(ca)
    session.connection.pump()
    if split is None:
        ehlo(session)
        assert session.server.authenticated_as is None
        session.send(b"MAIL FROM:<a@test.example>\r\n")
        reply = session.send(b"RCPT TO:<x@external.example>\r\n")[0]
        assert (reply.code, reply.enhanced) == (554, "5.7.1")
    else:
        assert session.closed
    assert checker.checked == []
    assert PLAIN.decode() not in log_text(logs)


@pytest.mark.parametrize("split", SPLITS)
def test_command_split_across_the_tls_boundary_is_not_reassembled(
    ca: CertificateAuthority, split: int | None
) -> None:
    """Half a command before STARTTLS, the rest inside TLS: never one command."""
    session = tls_session(ca)
    ehlo(session)
    session.send(b"STARTTLS\r\nMAIL FR")
    session.client.start_tls(ca)
    session.connection.pump()
    ehlo(session)
    replies = session.send(b"OM:<a@test.example>\r\n", split=split)
    assert [(r.code, r.enhanced) for r in replies] == [(500, "5.5.2")]
    assert session.codes(b"RCPT TO:<b@example.net>\r\n") == [503]


@pytest.mark.parametrize("split", SPLITS)
def test_starttls_injection_from_a_pipelining_client_after_ehlo(
    ca: CertificateAuthority, split: int | None
) -> None:
    """STARTTLS pipelined behind EHLO is a synchronisation error, not a TLS start."""
    session = tls_session(ca)
    replies = session.send(b"EHLO c.example\r\nSTARTTLS\r\nRSET\r\n", split=split)
    if split is None:
        assert [r.code for r in replies] == [554]
        assert session.closed
        assert not session.server.tls_active
    else:
        assert [r.code for r in replies] == [250, 220]


# -- 18: state reset after STARTTLS --------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_envelope_from_before_tls_is_forgotten(
    ca: CertificateAuthority, split: int | None
) -> None:
    session = tls_session(ca)
    ehlo(session)
    assert session.codes(b"MAIL FROM:<a@test.example>\r\n", split=split) == [250]
    assert session.codes(b"RCPT TO:<b@example.net>\r\n", split=split) == [250]
    session.start_tls(split=split)
    reply = session.send(b"DATA\r\n", split=split)[0]
    assert (reply.code, reply.enhanced) == (503, "5.5.1")
    assert session.codes(b"RCPT TO:<b@example.net>\r\n", split=split) == [503]
    reply = session.send(b"MAIL FROM:<a@test.example>\r\n", split=split)[0]
    assert (reply.code, reply.enhanced) == (503, "5.5.1")
    ehlo(session)
    assert session.codes(b"DATA\r\n", split=split) == [503]
    assert session.store.calls == 0


def test_pipelining_capability_from_before_tls_is_forgotten(
    ca: CertificateAuthority,
) -> None:
    """After TLS without a new EHLO, pipelined commands are a sync error."""
    session = tls_session(ca)
    ehlo(session)
    session.start_tls()
    replies = session.send(b"NOOP\r\nNOOP\r\n")
    assert [r.code for r in replies] == [554]


def test_helo_name_from_before_tls_is_not_used(ca: CertificateAuthority) -> None:
    session = tls_session(ca)
    ehlo(session, b"plaintext.example")
    session.start_tls()
    ehlo(session, b"secure.example")
    assert session.message().code == 250
    entry, content = session.store.stored[0]
    assert entry.client_helo == "secure.example"
    assert b"plaintext.example" not in content


# -- 19: no AUTH before TLS ----------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_auth_before_tls_is_refused_unchecked_and_unlogged(
    ca: CertificateAuthority, split: int | None, logs: Sequence[LogEvent]
) -> None:
    checker = SpyChecker()
    session = tls_session(ca, checker)
    reply = ehlo(session)
    assert not any(line.startswith("AUTH") for line in reply.lines)
    reply = session.send(b"AUTH PLAIN " + PLAIN + b"\r\n", split=split)[0]
    assert (reply.code, reply.enhanced) == (530, "5.7.0")
    assert checker.checked == []
    assert session.server.authenticated_as is None
    text = log_text(logs)
    assert PLAIN.decode() not in text and "alice" not in text


@pytest.mark.parametrize("split", SPLITS)
def test_auth_login_before_tls_then_credentials_as_commands(
    ca: CertificateAuthority, split: int | None, logs: Sequence[LogEvent]
) -> None:
    """A client that sends its secrets anyway: they are unknown commands, unlogged."""
    checker = SpyChecker()
    session = tls_session(ca, checker)
    ehlo(session)
    assert session.codes(b"AUTH LOGIN\r\n", split=split) == [530]
    for secret in (base64.b64encode(USER), base64.b64encode(PASSWORD)):
        assert session.codes(secret + b"\r\n", split=split) == [500]
    assert checker.checked == []
    text = log_text(logs)
    assert base64.b64encode(PASSWORD).decode() not in text
    assert base64.b64encode(USER).decode() not in text


def test_auth_before_tls_with_helo_only(ca: CertificateAuthority) -> None:
    checker = SpyChecker()
    session = tls_session(ca, checker)
    session.send(b"HELO c.example\r\n")
    assert session.codes(b"AUTH PLAIN " + PLAIN + b"\r\n") == [530]
    assert checker.checked == []


# -- 20: SMTP smuggling --------------------------------------------------------------

SMUGGLED = (
    b"MAIL FROM:<spoof@bank.example>\r\nRCPT TO:<victim@local.example>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nx\r\n.\r\n"
)
FAKE_ENDS = [
    pytest.param(b"\n.\n", id="LF.LF"),
    pytest.param(b"\r.\r", id="CR.CR"),
    pytest.param(b"\n.\r\n", id="LF.CRLF"),
    pytest.param(b"\r\n.\n", id="CRLF.LF"),
    pytest.param(b"\r\n.\r", id="CRLF.CR"),
    pytest.param(b"\r.\r\n", id="CR.CRLF"),
]


def start_data(session: Session) -> None:
    ehlo(session)
    session.envelope("b@example.net")
    assert session.codes(b"DATA\r\n") == [354]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("fake_end", FAKE_ENDS)
def test_smuggling_with_a_fake_end_of_data_is_refused_whole(
    fake_end: bytes, split: int | None
) -> None:
    session = open_session()
    start_data(session)
    replies = session.send(b"Subject: t\r\n\r\nbody" + fake_end + SMUGGLED, split=split)
    assert [(r.code, r.enhanced) for r in replies] == [(550, "5.5.2")]
    assert session.store.calls == 0
    # The session is in sync: the next command is a command again.
    assert session.codes(b"MAIL FROM:<a@test.example>\r\n") == [250]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("fake_end", FAKE_ENDS)
def test_smuggling_in_normalize_mode_yields_exactly_one_message(
    fake_end: bytes, split: int | None
) -> None:
    session = open_session(settings=make_settings(bare_line_endings="normalize"))
    start_data(session)
    replies = session.send(b"Subject: t\r\n\r\nbody" + fake_end + SMUGGLED, split=split)
    assert [r.code for r in replies] == [250]
    [(entry, _)] = session.store.stored
    [body] = session.store.bodies
    assert [r.address for r in entry.recipients] == ["b@example.net"]
    assert b"MAIL FROM:<spoof@bank.example>\r\n" in body
    assert b"\n" not in body.replace(b"\r\n", b"")


@pytest.mark.parametrize("split", SPLITS)
def test_bare_cr_inside_a_header_is_refused(split: int | None) -> None:
    session = open_session()
    start_data(session)
    replies = session.send(
        b"Subject: a\rBcc: victim@example.net\r\n\r\nbody\r\n.\r\n", split=split
    )
    assert [r.code for r in replies] == [550]
    assert session.store.calls == 0


@pytest.mark.parametrize("split", SPLITS)
def test_smuggling_terminator_split_at_every_position(split: int | None) -> None:
    """The real terminator arrives in pieces: still exactly one message."""
    session = open_session()
    start_data(session)
    for byte in b"Subject: t\r\n\r\nbody\r\n.\r\n":
        session.client.send(bytes([byte]))
        session.connection.pump()
    assert [r.code for r in session.take()] == [250]
    assert session.store.bodies == [b"Subject: t\r\n\r\nbody\r\n"]


# -- 21: over-long line inside DATA --------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_overlong_line_then_fake_commands_stay_inside_data(split: int | None) -> None:
    session = open_session()
    start_data(session)
    payload = (
        b"Subject: t\r\n\r\n"
        + b"a" * 17_000
        + b"\r\nMAIL FROM:<spoof@bank.example>\r\nRCPT TO:<victim@local.example>\r\n"
        b"DATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n"
    )
    replies = session.send(payload, split=split)
    assert [(r.code, r.enhanced) for r in replies] == [(500, "5.5.2")]
    assert session.store.calls == 0
    assert session.codes(b"RCPT TO:<b@example.net>\r\n") == [503]


@pytest.mark.parametrize("split", SPLITS)
def test_overlong_line_then_crlf_dot_lf_is_not_the_end(split: int | None) -> None:
    session = open_session()
    start_data(session)
    payload = b"a" * 17_000 + b"\r\n.\n" + SMUGGLED
    replies = session.send(payload, split=split)
    # Exactly one reply for the one DATA; bare LF and long line both seen.
    assert [r.code for r in replies] == [550]
    assert session.store.calls == 0


@pytest.mark.parametrize("split", SPLITS)
def test_real_end_right_after_an_overlong_line_is_found(split: int | None) -> None:
    """A server that truncates long lines could miss this terminator."""
    session = open_session()
    start_data(session)
    payload = b"a" * 17_000 + b"\r\n.\r\nMAIL FROM:<a@test.example>\r\n"
    replies = session.send(payload, split=split)
    assert [r.code for r in replies] == [500, 250]
    assert session.store.calls == 0


@pytest.mark.parametrize("split", SPLITS)
def test_line_of_exactly_998_octets_is_accepted(split: int | None) -> None:
    session = open_session()
    start_data(session)
    line = b"b" * 998
    replies = session.send(line + b"\r\n.\r\n", split=split)
    assert [r.code for r in replies] == [250]
    assert session.store.bodies == [line + b"\r\n"]


@pytest.mark.parametrize("split", SPLITS)
def test_line_of_999_octets_is_refused(split: int | None) -> None:
    session = open_session()
    start_data(session)
    replies = session.send(b"b" * 999 + b"\r\n.\r\n", split=split)
    assert [r.code for r in replies] == [500]


# -- 22: open relay ------------------------------------------------------------------

RELAY_TRICKS = [
    b"x@external.example",
    b"x%external.example@relay.example",
    b"@relay.example:x@external.example",
    b"@a.example,@relay.example:x@external.example",
    b'"x@external.example"@relay.example',
    b'"x%external.example"@relay.example',
    b"external.example!x@relay.example",
    b"x@[192.0.2.1]",
    b"x@mx.test.example",
    b"postmaster",
    b"",
]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("recipient", RELAY_TRICKS)
def test_open_relay_tricks_from_an_untrusted_client_are_denied(
    recipient: bytes, split: int | None
) -> None:
    session = open_session(settings=make_settings(allowed_networks=UNTRUSTED))
    ehlo(session)
    assert session.codes(b"MAIL FROM:<a@test.example>\r\n", split=split) == [250]
    reply = session.send(b"RCPT TO:<" + recipient + b">\r\n", split=split)[0]
    assert (reply.code, reply.enhanced) == (554, "5.7.1")
    assert session.codes(b"DATA\r\n") == [554]
    assert session.store.calls == 0


def test_open_relay_pipelined_tricks_all_denied() -> None:
    session = open_session(settings=make_settings(allowed_networks=UNTRUSTED))
    ehlo(session)
    payload = b"MAIL FROM:<a@test.example>\r\n" + b"".join(
        b"RCPT TO:<" + r + b">\r\n" for r in RELAY_TRICKS
    )
    replies = session.send(payload)
    assert [r.code for r in replies] == [250] + [554] * len(RELAY_TRICKS)


def test_open_relay_failed_auth_does_not_open_the_relay(
    ca: CertificateAuthority,
) -> None:
    session = tls_session(ca, allowed_networks=UNTRUSTED)
    session.start_tls()
    ehlo(session)
    session.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0guess") + b"\r\n")
    session.clock.advance(1)
    assert [r.code for r in session.pump()] == [535]
    session.send(b"MAIL FROM:<a@test.example>\r\n")
    assert session.codes(b"RCPT TO:<x@external.example>\r\n") == [554]


def test_open_relay_auth_state_does_not_survive_a_new_connection(
    ca: CertificateAuthority,
) -> None:
    first = tls_session(ca, allowed_networks=UNTRUSTED)
    first.start_tls()
    ehlo(first)
    assert first.codes(b"AUTH PLAIN " + PLAIN + b"\r\n") == [235]
    second = open_session(ca, factory=first.factory)
    ehlo(second)
    second.send(b"MAIL FROM:<a@test.example>\r\n")
    assert second.codes(b"RCPT TO:<x@external.example>\r\n") == [554]
