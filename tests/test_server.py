"""Tests for the relay listener (txstarttls.server) and its Received: header.

A raw-bytes client talks to the server in memory, with real TLS after
STARTTLS, and a task.Clock drives every timer. The harness at the top is
shared with tests/test_security_server.py.
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import ipaddress
from collections.abc import Iterator, Sequence
from typing import Any, cast

import pytest
from twisted.cred.checkers import (
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, capturedLogs, formatEvent
from zope.interface import implementer

from tests.support.raw_client import RawClient as SharedRawClient
from txstarttls.queue import IMessageStore, QueueEntry, StoreError
from txstarttls.received import TLSDetails, received_header, transmission_type
from txstarttls.reply import Reply, parse_replies
from txstarttls.server import ListenerSettings, RelayServer, RelayServerFactory
from txstarttls.testing import (
    CertificateAuthority,
    MemoryConnection,
    MemoryTransport,
    connect_in_memory,
    server_tls_options,
)
from txstarttls.userdb import make_portal

HOSTNAME = "mx.test.example"
USER = b"alice"
PASSWORD = b"correct horse battery"
PLAIN = base64.b64encode(b"\0" + USER + b"\0" + PASSWORD)
WRONG_PLAIN = base64.b64encode(b"\0" + USER + b"\0wrong password")
UNTRUSTED = (ipaddress.ip_network("127.0.0.2/32"),)
CLIENT = IPv4Address("TCP", "127.0.0.1", 49152)


# -- harness -------------------------------------------------------------------------


class FakeStore:
    """An IMessageStore.add whose outcome the test decides.

    ``mode`` "ok" stores at once, "fail" fails with StoreError, "manual"
    returns a Deferred the test fires with :meth:`finish`.
    """

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.stored: list[tuple[QueueEntry, bytes]] = []
        self.pending: list[tuple[Deferred[None], QueueEntry, bytes]] = []
        self.calls = 0

    def add(self, entry: QueueEntry, content: bytes) -> Deferred[None]:
        self.calls += 1
        assert entry.size == len(content)
        if self.mode == "fail":
            return fail(StoreError("queue write failed: ENOSPC (No space left)"))
        if self.mode == "crash":
            return fail(RuntimeError("store bug"))
        if self.mode == "manual":
            waiting: Deferred[None] = Deferred()
            self.pending.append((waiting, entry, content))
            return waiting
        self.stored.append((entry, content))
        return succeed(None)

    def finish(self, index: int = 0) -> None:
        waiting, entry, content = self.pending.pop(index)
        self.stored.append((entry, content))
        waiting.callback(None)

    @property
    def contents(self) -> list[bytes]:
        return [content for _, content in self.stored]

    @property
    def bodies(self) -> list[bytes]:
        """Contents without our Received: header."""
        return [strip_received(content) for content in self.contents]


def strip_received(content: bytes) -> bytes:
    assert content.startswith(b"Received: ")
    lines = content.split(b"\r\n")
    index = 1
    while lines[index].startswith(b"\t"):
        index += 1
    return b"\r\n".join(lines[index:])


class RawClient(SharedRawClient):
    """The shared raw client, able to start TLS towards the relay."""

    def start_tls(self, ca: CertificateAuthority) -> None:
        transport = self.transport
        assert isinstance(transport, MemoryTransport)
        trust = Certificate.loadPEM(ca.certificate_pem)
        transport.startTLS(optionsForClientTLS(HOSTNAME, trustRoot=trust))


@dataclasses.dataclass
class Session:
    """One in-memory client/server pair and what the client has read so far."""

    client: RawClient
    server: RelayServer
    connection: MemoryConnection
    factory: RelayServerFactory
    store: FakeStore
    clock: Clock
    ca: CertificateAuthority | None
    seen: int = 0

    def send(self, data: bytes, *, split: int | None = None) -> list[Reply]:
        """Write ``data`` as one segment (or ``split``-byte reads); new replies."""
        self.connection.client_to_server.split = split
        self.client.send(data)
        self.connection.pump()
        return self.take()

    def take(self) -> list[Reply]:
        replies = parse_replies(bytes(self.client.received))
        new = replies[self.seen :]
        self.seen = len(replies)
        return new

    def codes(self, data: bytes, *, split: int | None = None) -> list[int]:
        return [reply.code for reply in self.send(data, split=split)]

    def start_tls(self, *, split: int | None = None) -> list[Reply]:
        assert self.ca is not None
        replies = self.send(b"STARTTLS\r\n", split=split)
        assert replies[-1].code == 220, replies
        self.client.start_tls(self.ca)
        self.connection.pump()
        assert self.client.handshakes == 1
        return replies

    def pump(self) -> list[Reply]:
        self.connection.pump()
        return self.take()

    @property
    def closed(self) -> bool:
        return self.connection.closed

    def envelope(self, *recipients: str, sender: str = "a@test.example") -> None:
        assert self.send(f"MAIL FROM:<{sender}>\r\n".encode())[0].code == 250
        for recipient in recipients:
            reply = self.send(f"RCPT TO:<{recipient}>\r\n".encode())[0]
            assert reply.code == 250, reply

    def message(
        self, body: bytes = b"Subject: hi\r\n\r\nhello\r\n", *recipients: str
    ) -> Reply:
        self.envelope(*(recipients or ("b@example.net",)))
        assert self.send(b"DATA\r\n")[0].code == 354
        replies = self.send(body + b".\r\n")
        assert len(replies) == 1, replies
        return replies[0]


def make_settings(
    ca: CertificateAuthority | None = None, **changes: Any
) -> ListenerSettings:
    tls = server_tls_options(ca.issue(HOSTNAME)) if ca is not None else None
    return dataclasses.replace(
        ListenerSettings(hostname=HOSTNAME, tls_options=tls), **changes
    )


def open_session(
    ca: CertificateAuthority | None = None,
    *,
    settings: ListenerSettings | None = None,
    store: FakeStore | None = None,
    portal: Portal | None = None,
    clock: Clock | None = None,
    client_address: IPv4Address = CLIENT,
    factory: RelayServerFactory | None = None,
) -> Session:
    """Connect a RawClient to a fresh server and read the greeting."""
    store = store if store is not None else FakeStore()
    clock = clock if clock is not None else Clock()
    if factory is None:
        factory = RelayServerFactory(
            settings if settings is not None else make_settings(ca),
            cast(IMessageStore, store),
            clock,
            portal=portal,
        )
    else:
        store = cast(FakeStore, factory.store)
        clock = cast(Clock, factory.clock)
    client = RawClient()
    server = factory.buildProtocol(client_address)
    connection = connect_in_memory(client, server, client_address=client_address)
    session = Session(client, server, connection, factory, store, clock, ca)
    session.pump()
    return session


def clock_at(seconds: float) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


def ehlo(session: Session, name: bytes = b"client.test.example") -> Reply:
    replies = session.send(b"EHLO " + name + b"\r\n")
    assert len(replies) == 1 and replies[0].code == 250, replies
    return replies[0]


def extensions(reply: Reply) -> list[str]:
    return list(reply.lines[1:])


def users_portal() -> Portal:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser(USER, PASSWORD)
    return make_portal(checker)


def log_text(events: Sequence[LogEvent]) -> str:
    return "\n".join(formatEvent(event) for event in events)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture
def logs() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


# -- greeting and EHLO ---------------------------------------------------------------


def test_greeting_names_the_host_without_enhanced_code() -> None:
    session = open_session()
    assert bytes(session.client.received) == b"220 mx.test.example ESMTP txstarttls\r\n"


def test_ehlo_before_tls_offers_starttls_and_no_auth(ca: CertificateAuthority) -> None:
    session = open_session(ca, portal=users_portal())
    reply = ehlo(session)
    assert reply.lines[0] == HOSTNAME
    assert extensions(reply) == [
        "PIPELINING",
        "SIZE 10240000",
        "STARTTLS",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "DSN",
        "SMTPUTF8",
    ]


def test_ehlo_after_tls_offers_auth_and_no_starttls(ca: CertificateAuthority) -> None:
    session = open_session(ca, portal=users_portal())
    session.start_tls()
    assert extensions(ehlo(session)) == [
        "PIPELINING",
        "SIZE 10240000",
        "AUTH PLAIN LOGIN",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "DSN",
        "SMTPUTF8",
    ]


def test_no_auth_after_tls_without_a_users_file(ca: CertificateAuthority) -> None:
    session = open_session(ca)
    session.start_tls()
    assert not any(line.startswith("AUTH") for line in extensions(ehlo(session)))
    assert session.send(b"AUTH PLAIN " + PLAIN + b"\r\n")[0].code == 503


def test_size_advertised_is_the_configured_limit() -> None:
    session = open_session(settings=make_settings(max_size=5000))
    assert "SIZE 5000" in extensions(ehlo(session))


def test_without_certificate_no_starttls_and_454() -> None:
    session = open_session()
    assert "STARTTLS" not in extensions(ehlo(session))
    reply = session.send(b"STARTTLS\r\n")[0]
    assert (reply.code, reply.enhanced) == (454, "4.7.0")


def test_starttls_twice_is_503(ca: CertificateAuthority) -> None:
    session = open_session(ca)
    session.start_tls()
    ehlo(session)
    reply = session.send(b"STARTTLS\r\n")[0]
    assert (reply.code, reply.enhanced) == (503, "5.5.1")


def test_starttls_with_argument_is_501(ca: CertificateAuthority) -> None:
    session = open_session(ca)
    ehlo(session)
    assert session.codes(b"STARTTLS now\r\n") == [501]
    assert not session.server.tls_active


def test_failed_tls_handshake_is_logged_and_survived(
    ca: CertificateAuthority, logs: Sequence[LogEvent]
) -> None:
    session = open_session(ca)
    ehlo(session)
    session.send(b"STARTTLS\r\n")
    session.client.start_tls(CertificateAuthority("a CA the client trusts"))
    session.connection.pump()
    assert session.closed
    assert session.client.handshakes == 0
    assert "TLS handshake failed with [127.0.0.1]" in log_text(logs)
    assert "disconnect from [127.0.0.1] ehlo=1 starttls=1 commands=2" in log_text(logs)


def test_implicit_tls_offers_auth_at_once_and_no_starttls(
    ca: CertificateAuthority,
) -> None:
    settings = make_settings(ca, implicit_tls=True)
    factory = RelayServerFactory(
        settings, cast(IMessageStore, FakeStore()), Clock(), portal=users_portal()
    )
    server = factory.buildProtocol(CLIENT)
    transport = StringTransport(peerAddress=CLIENT)
    server.makeConnection(transport)
    server.dataReceived(b"EHLO c.example\r\n")
    replies = parse_replies(transport.value())
    assert "AUTH PLAIN LOGIN" in replies[1].lines
    assert "STARTTLS" not in replies[1].lines
    assert server.tls_active


def test_helo_answers_with_hostname_only() -> None:
    session = open_session()
    reply = session.send(b"HELO client.example\r\n")[0]
    assert (reply.code, reply.lines) == (250, (HOSTNAME,))


def test_ehlo_and_helo_need_an_argument() -> None:
    session = open_session()
    assert session.codes(b"EHLO\r\n") == [501]
    assert session.codes(b"HELO\r\n") == [501]
    assert session.codes(b"EHLO " + b"x" * 256 + b"\r\n") == [501]


def test_every_reply_carries_an_enhanced_status_code(ca: CertificateAuthority) -> None:
    """RFC 2034: all but the greeting, EHLO/HELO, 334 and 354 carry one."""
    session = open_session(ca, portal=users_portal())
    exempt: list[Reply] = []
    checked: list[Reply] = []

    def run(data: bytes, *, exempt_reply: bool = False) -> None:
        for reply in session.send(data):
            (exempt if exempt_reply or reply.code in (334, 354) else checked).append(
                reply
            )

    run(b"EHLO c.example\r\n", exempt_reply=True)
    for command in (
        b"NOOP",
        b"HELP",
        b"VRFY someone",
        b"VRFY",
        b"RSET",
        b"FOO",
        b"RCPT TO:<b@example.net>",
        b"DATA",
        b"MAIL FROM:<a@test.example> FOO=1",
        b"MAIL FROM:<a@test.example> SIZE=99999999999",
        b"MAIL FROM:a@test.example",
        b"AUTH PLAIN " + PLAIN,
        b"MAIL FROM:<a@test.example>",
        b"MAIL FROM:<a@test.example>",
        b"RCPT TO:<b@example.net> NOTIFY=SOMETIMES",
        b"RCPT TO:<b@example.net>",
        b"DATA",
        b"hello\r\n.",
        b"DATA",
        b"x" * 600,
        b"STARTTLS extra",
    ):
        run(command + b"\r\n")
    session.start_tls()
    run(b"EHLO c.example\r\n", exempt_reply=True)
    run(b"AUTH LOGIN\r\n")
    run(base64.b64encode(USER) + b"\r\n")
    run(base64.b64encode(PASSWORD) + b"\r\n")
    run(b"AUTH PLAIN " + PLAIN + b"\r\n")
    run(b"QUIT\r\n")
    assert len(checked) >= 20
    for reply in checked:
        assert reply.enhanced is not None, reply
        assert reply.enhanced[0] == str(reply.code)[0], reply
    assert {reply.code for reply in exempt} == {250, 334, 354}
    assert all(reply.enhanced is None for reply in exempt if reply.code == 354)


# -- simple commands -----------------------------------------------------------------


def test_noop_help_vrfy_rset_quit() -> None:
    session = open_session()
    ehlo(session)
    for command, code, enhanced in (
        (b"NOOP", 250, "2.0.0"),
        (b"HELP", 214, "2.0.0"),
        (b"VRFY postmaster", 252, "2.5.0"),
        (b"VRFY", 501, "5.5.4"),
        (b"RSET", 250, "2.0.0"),
    ):
        reply = session.send(command + b"\r\n")[0]
        assert (reply.code, reply.enhanced) == (code, enhanced), command
    reply = session.send(b"QUIT\r\n")[0]
    assert (reply.code, reply.enhanced) == (221, "2.0.0")
    assert session.closed


def test_commands_are_case_insensitive() -> None:
    session = open_session()
    assert session.codes(b"ehlo c.example\r\n") == [250]
    assert session.codes(b"mail from:<a@test.example>\r\n") == [250]
    assert session.codes(b"rcpt to:<b@example.net>\r\n") == [250]


def test_rset_forgets_the_envelope() -> None:
    session = open_session()
    ehlo(session)
    session.envelope("b@example.net")
    assert session.codes(b"RSET\r\n") == [250]
    assert session.codes(b"DATA\r\n") == [503]


def test_ehlo_resets_the_transaction() -> None:
    session = open_session()
    ehlo(session)
    session.envelope("b@example.net")
    ehlo(session)
    assert session.codes(b"DATA\r\n") == [503]


def test_unknown_command_is_500_552() -> None:
    session = open_session()
    reply = session.send(b"EXPN staff\r\n")[0]
    assert (reply.code, reply.enhanced) == (500, "5.5.2")
    assert not session.closed


@pytest.mark.parametrize(
    ("commands", "code", "enhanced"),
    [
        ([b"MAIL FROM:<a@test.example>"], 503, "5.5.1"),
        ([b"EHLO c", b"RCPT TO:<b@example.net>"], 503, "5.5.1"),
        ([b"EHLO c", b"DATA"], 503, "5.5.1"),
        (
            [b"EHLO c", b"MAIL FROM:<a@t.example>", b"MAIL FROM:<a@t.example>"],
            503,
            "5.5.1",
        ),
        ([b"EHLO c", b"MAIL FROM:<a@t.example>", b"DATA"], 554, "5.5.1"),
        ([b"EHLO c", b"MAIL FROM:a@t.example"], 501, "5.5.4"),
        ([b"EHLO c", b"MAIL FROM:<a@t.example>x"], 501, "5.5.4"),
        ([b"EHLO c", b"MAIL TO:<a@t.example>"], 501, "5.5.4"),
        ([b"EHLO c", b"MAIL FROM:<not an address>"], 501, "5.1.7"),
        ([b"EHLO c", b"MAIL FROM:<a@t.example>", b"RCPT TO:<>"], 501, "5.1.3"),
        ([b"EHLO c", b"MAIL FROM:<a@t.example>", b"RCPT TO:<b@>"], 501, "5.1.3"),
        ([b"EHLO c", b"MAIL FROM:<a@t.example>", b"RCPT TO:b@x.example"], 501, "5.5.4"),
        (
            [
                b"EHLO c",
                b"MAIL FROM:<a@t.example>",
                b"RCPT TO:<b@x.example>",
                b"DATA x",
            ],
            501,
            "5.5.4",
        ),
    ],
)
def test_sequence_and_syntax_errors(
    commands: list[bytes], code: int, enhanced: str
) -> None:
    session = open_session()
    for command in commands[:-1]:
        assert session.send(command + b"\r\n")[0].code < 400, command
    reply = session.send(commands[-1] + b"\r\n")[0]
    assert (reply.code, reply.enhanced) == (code, enhanced)


def test_null_sender_is_accepted() -> None:
    session = open_session()
    ehlo(session)
    session.envelope("b@example.net", sender="")
    assert session.codes(b"DATA\r\n") == [354]
    assert session.codes(b"bounce\r\n.\r\n") == [250]
    assert session.store.stored[0][0].sender == ""


def test_space_after_colon_is_tolerated() -> None:
    session = open_session()
    ehlo(session)
    assert session.codes(b"MAIL FROM: <a@test.example>\r\n") == [250]
    assert session.codes(b"RCPT TO: <b@example.net>\r\n") == [250]


# -- command line hygiene ------------------------------------------------------------


@pytest.mark.parametrize("split", [None, 1])
def test_command_line_over_512_octets_is_500_then_the_session_goes_on(
    split: int | None,
) -> None:
    session = open_session()
    ehlo(session)
    # 511 octets of line + CRLF = 513: one too many. Its tail must not run.
    line = b"NOOP " + b"x" * 501 + b" QUIT"
    assert len(line) + 2 == 513
    replies = session.send(line + b"\r\n", split=split)
    assert [(r.code, r.enhanced) for r in replies] == [(500, "5.5.2")]
    assert not session.closed
    assert session.codes(b"NOOP\r\n", split=split) == [250]


@pytest.mark.parametrize("split", [None, 1])
def test_command_line_of_exactly_512_octets_is_accepted(split: int | None) -> None:
    session = open_session()
    ehlo(session)
    line = b"NOOP " + b"x" * (510 - 5)
    assert len(line) + 2 == 512
    assert session.codes(line + b"\r\n", split=split) == [250]


def test_endless_line_is_discarded_not_buffered() -> None:
    session = open_session()
    ehlo(session)
    for _ in range(20):
        session.client.send(b"y" * 10_000)
        session.connection.pump()
        assert len(session.server._buffer) <= 1
    assert session.codes(b"\r\nNOOP\r\n") == [500, 250]


def test_cr_lf_split_across_reads_after_long_line() -> None:
    session = open_session()
    ehlo(session)
    session.client.send(b"z" * 600 + b"\r")
    session.connection.pump()
    assert session.take() == []
    assert session.codes(b"\nNOOP\r\n") == [500, 250]


def test_bad_utf8_and_control_characters_in_commands() -> None:
    session = open_session()
    ehlo(session)
    assert session.codes(b"MAIL FROM:<\xff@test.example>\r\n") == [500]
    assert session.codes(b"MAIL FROM:<a@test.example>\nRCPT TO:<b@x.example>\r\n") == [
        500
    ]
    assert session.codes(b"NOOP\x00\r\n") == [500]
    assert session.codes(b"MAIL FROM:<a@test.example>\r\n") == [250]


def test_http_request_is_refused_and_closed() -> None:
    session = open_session()
    replies = session.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [(r.code, r.enhanced) for r in replies] == [(521, "5.7.0")]
    assert session.closed


# -- pipelining and synchronisation --------------------------------------------------


def test_pipelined_envelope_and_data_get_replies_in_order() -> None:
    session = open_session()
    ehlo(session)
    replies = session.send(
        b"MAIL FROM:<a@test.example>\r\nRCPT TO:<b@example.net>\r\n"
        b"RCPT TO:<c@example.net>\r\nRCPT TO:<bad@>\r\nDATA\r\n"
    )
    assert [r.code for r in replies] == [250, 250, 250, 501, 354]
    replies = session.send(b"hi\r\n.\r\nMAIL FROM:<d@test.example>\r\nQUIT\r\n")
    assert [r.code for r in replies] == [250, 250, 221]
    assert len(session.store.stored) == 1


def test_pipelined_commands_after_the_dot_wait_for_the_store() -> None:
    store = FakeStore("manual")
    session = open_session(store=store)
    ehlo(session)
    session.envelope("b@example.net")
    assert session.codes(b"DATA\r\n") == [354]
    replies = session.send(
        b"body\r\n.\r\nMAIL FROM:<x@test.example>\r\nRCPT TO:<y@example.net>\r\n"
    )
    # Nothing at all until the queue has the message on disk.
    assert replies == []
    assert len(store.pending) == 1
    store.finish()
    replies = session.pump()
    assert [r.code for r in replies] == [250, 250, 250]
    assert replies[0].lines[0].startswith("2.0.0 Ok: queued as ")


def test_250_only_after_the_store_fired() -> None:
    store = FakeStore("manual")
    session = open_session(store=store)
    ehlo(session)
    session.envelope("b@example.net")
    session.send(b"DATA\r\n")
    assert session.send(b"body\r\n.\r\n") == []
    session.clock.advance(600)
    assert session.take() == [], "no timeout while our own store is busy"
    assert not session.closed
    store.finish()
    [reply] = session.pump()
    queue_id = store.stored[0][0].queue_id
    assert reply.lines == (f"2.0.0 Ok: queued as {queue_id}",)


def test_two_messages_in_one_session_get_distinct_ids() -> None:
    session = open_session()
    ehlo(session)
    first = session.message()
    second = session.message()
    assert first.code == second.code == 250
    ids = [entry.queue_id for entry, _ in session.store.stored]
    assert len(set(ids)) == 2


@pytest.mark.parametrize(
    "segment",
    [
        b"HELO c.example\r\nMAIL FROM:<a@test.example>\r\n",
        b"EHLO c.example\r\nMAIL FROM:<a@test.example>\r\n",
        b"NOOP\r\nNOOP\r\n",
    ],
)
def test_pipelining_before_ehlo_is_a_synchronisation_error(segment: bytes) -> None:
    session = open_session()
    replies = session.send(segment)
    assert [(r.code, r.enhanced) for r in replies] == [(554, "5.5.0")]
    assert session.closed


def test_pipelining_after_helo_is_a_synchronisation_error() -> None:
    session = open_session()
    assert session.codes(b"HELO c.example\r\n") == [250]
    replies = session.send(b"MAIL FROM:<a@test.example>\r\nRCPT TO:<b@example.net>\r\n")
    assert [r.code for r in replies] == [554]
    assert session.closed
    assert session.store.calls == 0


@pytest.mark.parametrize(
    "segment",
    [
        b"NOOP\r\nMAIL FROM:<a@test.example>\r\n",
        b"VRFY x\r\nNOOP\r\n",
        b"EHLO again\r\nNOOP\r\n",
        b"MAIL FROM:<a@test.example>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nbody\r\n",
    ],
)
def test_commands_that_end_a_group_must_be_last(segment: bytes) -> None:
    session = open_session()
    ehlo(session)
    replies = session.send(segment)
    assert replies[-1].code == 554 and replies[-1].enhanced == "5.5.0"
    assert 354 not in [r.code for r in replies]
    assert session.closed


def test_a_client_that_waits_is_never_a_synchronisation_error() -> None:
    """Byte-by-byte reads look like a client that waits: no false alarm."""
    session = open_session()
    replies = session.send(
        b"HELO c.example\r\nMAIL FROM:<a@test.example>\r\nRCPT TO:<b@example.net>\r\n",
        split=1,
    )
    assert [r.code for r in replies] == [250, 250, 250]


def test_quit_may_follow_the_dot_without_pipelining() -> None:
    session = open_session()
    assert session.codes(b"HELO c.example\r\n") == [250]
    session.envelope("b@example.net")
    assert session.codes(b"DATA\r\n") == [354]
    assert session.codes(b"hi\r\n.\r\nQUIT\r\n") == [250, 221]


# -- greeting delay and idle timeout -------------------------------------------------


def test_client_talking_before_the_greeting_gets_554_and_is_closed() -> None:
    session = open_session(settings=make_settings(greet_pause=2.0))
    assert session.take() == []
    replies = session.send(b"EHLO spambot\r\n")
    assert [(r.code, r.enhanced) for r in replies] == [(554, "5.5.0")]
    assert session.closed
    session.clock.advance(5)
    assert b"220" not in bytes(session.client.received)


def test_patient_client_is_greeted_after_the_pause() -> None:
    session = open_session(settings=make_settings(greet_pause=2.0))
    session.clock.advance(1.9)
    assert session.pump() == []
    session.clock.advance(0.1)
    [greeting] = session.pump()
    assert greeting.code == 220
    assert session.codes(b"EHLO c.example\r\n") == [250]


def test_idle_client_gets_421_442_and_is_closed() -> None:
    session = open_session()
    ehlo(session)
    session.clock.advance(299)
    assert session.codes(b"NOOP\r\n") == [250]
    session.clock.advance(299)
    assert session.pump() == []
    session.clock.advance(1)
    [reply] = session.pump()
    assert (reply.code, reply.enhanced) == (421, "4.4.2")
    assert session.closed


def test_idle_timeout_during_data_keeps_nothing() -> None:
    session = open_session()
    ehlo(session)
    session.envelope("b@example.net")
    session.send(b"DATA\r\n")
    session.send(b"partial body\r\n")
    session.clock.advance(300)
    assert [r.code for r in session.pump()] == [421]
    assert session.store.calls == 0


# -- limits --------------------------------------------------------------------------


def test_size_parameter_over_the_limit_is_552() -> None:
    session = open_session(settings=make_settings(max_size=1000))
    ehlo(session)
    reply = session.send(b"MAIL FROM:<a@test.example> SIZE=1001\r\n")[0]
    assert (reply.code, reply.enhanced) == (552, "5.3.4")
    assert session.codes(b"MAIL FROM:<a@test.example> SIZE=1000\r\n") == [250]


@pytest.mark.parametrize("split", [None, 7])
def test_message_over_the_limit_is_read_to_the_end_then_552(split: int | None) -> None:
    session = open_session(settings=make_settings(max_size=1000))
    ehlo(session)
    session.envelope("b@example.net")
    session.send(b"DATA\r\n")
    body = b"".join(b"line %04d of text\r\n" % n for n in range(200))
    replies = session.send(body + b".\r\nNOOP\r\n", split=split)
    assert [(r.code, r.enhanced) for r in replies] == [(552, "5.3.4"), (250, "2.0.0")]
    assert session.store.calls == 0
    assert session.codes(b"MAIL FROM:<a@test.example>\r\n") == [250]


def test_too_many_recipients_is_452_453() -> None:
    session = open_session(settings=make_settings(max_recipients=2))
    ehlo(session)
    session.envelope("b@example.net", "c@example.net")
    reply = session.send(b"RCPT TO:<d@example.net>\r\n")[0]
    assert (reply.code, reply.enhanced) == (452, "4.5.3")
    assert session.codes(b"DATA\r\n") == [354]
    assert session.codes(b"x\r\n.\r\n") == [250]
    [(entry, _)] = session.store.stored
    assert [r.address for r in entry.recipients] == ["b@example.net", "c@example.net"]


def test_duplicate_recipient_is_kept_once() -> None:
    session = open_session()
    ehlo(session)
    session.envelope("b@example.net", "b@example.net")
    session.send(b"DATA\r\n")
    session.send(b"x\r\n.\r\n")
    assert len(session.store.stored[0][0].recipients) == 1


# -- MAIL and RCPT parameters --------------------------------------------------------


def test_dsn_body_and_smtputf8_parameters_are_kept() -> None:
    session = open_session()
    ehlo(session)
    assert session.codes(
        b"MAIL FROM:<a@test.example> SIZE=100 BODY=8bitmime SMTPUTF8 RET=hdrs "
        b"ENVID=QQ+2B314\r\n"
    ) == [250]
    assert session.codes(
        b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE "
        b"ORCPT=rfc822;b+40example.net\r\n"
    ) == [250]
    assert session.codes(b"RCPT TO:<c@example.net> NOTIFY=NEVER\r\n") == [250]
    assert session.codes("RCPT TO:<jörg@example.net>\r\n".encode()) == [250]
    session.send(b"DATA\r\n")
    assert session.codes(b"x\r\n.\r\n") == [250]
    [(entry, _)] = session.store.stored
    assert entry.mail_parameters == (
        "BODY=8BITMIME",
        "SMTPUTF8",
        "RET=HDRS",
        "ENVID=QQ+2B314",
    )
    first, second, third = entry.recipients
    assert (first.notify, first.orcpt) == ("SUCCESS,FAILURE", "rfc822;b+40example.net")
    assert (second.notify, second.orcpt) == ("NEVER", None)
    assert (third.address, third.notify) == ("jörg@example.net", None)


@pytest.mark.parametrize(
    ("parameters", "code"),
    [
        (b"FOO=1", 555),
        (b"BODY=BINARYMIME", 501),
        (b"BODY", 501),
        (b"RET=ALL", 501),
        (b"ENVID=a+b", 501),
        (b"ENVID=" + b"x" * 101, 501),
        (b"SIZE=ten", 501),
        (b"SIZE=1 SIZE=2", 501),
        (b"SMTPUTF8=yes", 501),
        (b"=x", 501),
        (b"AUTH=<>", 555),
    ],
)
def test_bad_mail_parameters(parameters: bytes, code: int) -> None:
    session = open_session()
    ehlo(session)
    reply = session.send(b"MAIL FROM:<a@test.example> " + parameters + b"\r\n")[0]
    assert reply.code == code
    assert reply.enhanced == ("5.5.4" if code in (501, 555) else reply.enhanced)


@pytest.mark.parametrize(
    ("parameters", "code"),
    [
        (b"NOTIFY=NEVER,SUCCESS", 501),
        (b"NOTIFY=SOMETIMES", 501),
        (b"NOTIFY=SUCCESS,SUCCESS", 501),
        (b"ORCPT=b@example.net", 501),
        (b"ORCPT=rfc822;a+zz", 501),
        (b"XFORWARD=1", 555),
    ],
)
def test_bad_rcpt_parameters(parameters: bytes, code: int) -> None:
    session = open_session()
    ehlo(session)
    session.envelope()
    reply = session.send(b"RCPT TO:<b@example.net> " + parameters + b"\r\n")[0]
    assert (reply.code, reply.enhanced) == (code, "5.5.4")


def test_parameters_after_helo_are_refused() -> None:
    session = open_session()
    session.send(b"HELO c.example\r\n")
    assert session.codes(b"MAIL FROM:<a@test.example> BODY=8BITMIME\r\n") == [555]


def test_non_ascii_address_needs_smtputf8() -> None:
    session = open_session()
    ehlo(session)
    reply = session.send("MAIL FROM:<jörg@test.example>\r\n".encode())[0]
    assert (reply.code, reply.enhanced) == (553, "5.6.7")
    assert session.codes(b"MAIL FROM:<a@test.example>\r\n") == [250]
    reply = session.send("RCPT TO:<jörg@example.net>\r\n".encode())[0]
    assert (reply.code, reply.enhanced) == (553, "5.6.7")


def test_auth_mail_parameter_accepted_when_auth_offered(
    ca: CertificateAuthority,
) -> None:
    session = open_session(ca, portal=users_portal())
    session.start_tls()
    ehlo(session)
    assert session.codes(b"MAIL FROM:<a@test.example> AUTH=<>\r\n") == [250]
    session.send(b"RCPT TO:<b@example.net>\r\nDATA\r\n")
    session.send(b"x\r\n.\r\n")
    assert session.store.stored[0][0].mail_parameters == ()


# -- relay policy --------------------------------------------------------------------


def test_client_in_allowed_networks_may_relay() -> None:
    session = open_session()
    ehlo(session)
    assert session.message().code == 250


def test_client_outside_allowed_networks_is_denied_every_recipient() -> None:
    session = open_session(settings=make_settings(allowed_networks=UNTRUSTED))
    ehlo(session)
    assert session.codes(b"MAIL FROM:<a@test.example>\r\n") == [250]
    for recipient in (b"x@external.example", b"postmaster@mx.test.example"):
        reply = session.send(b"RCPT TO:<" + recipient + b">\r\n")[0]
        assert (reply.code, reply.enhanced) == (554, "5.7.1")
        assert reply.lines == ("5.7.1 Relay access denied",)
    assert session.codes(b"DATA\r\n") == [554]


def test_authenticated_client_may_relay_from_anywhere(ca: CertificateAuthority) -> None:
    settings = make_settings(ca, allowed_networks=UNTRUSTED)
    session = open_session(ca, settings=settings, portal=users_portal())
    session.start_tls()
    ehlo(session)
    assert session.codes(b"AUTH PLAIN " + PLAIN + b"\r\n") == [235]
    assert session.message().code == 250
    entry, content = session.store.stored[0]
    assert entry.authenticated_as == "alice"
    assert b"with ESMTPSA" in content.split(b"\r\n\r\n")[0]


def test_ipv6_loopback_and_mapped_ipv4_are_trusted() -> None:
    for address in (
        IPv6Address("TCP", "::1", 2525),
        IPv6Address("TCP", "::ffff:127.0.0.1", 2525),
    ):
        session = open_session(client_address=cast(IPv4Address, address))
        ehlo(session)
        assert session.message().code == 250
        entry = session.store.stored[0][0]
        assert entry.client_address == address.host


def test_trusted_client_source_route_is_ignored() -> None:
    """RFC 5321 4.1.1.3: we accept the source route and ignore it."""
    session = open_session()
    ehlo(session)
    session.send(b"MAIL FROM:<a@test.example>\r\n")
    assert session.codes(
        b"RCPT TO:<@hop.example,@relay.example:x@external.example>\r\n"
    ) == [250]
    session.send(b"DATA\r\n")
    session.send(b"x\r\n.\r\n")
    assert session.store.stored[0][0].recipients[0].address == "x@external.example"


def test_unix_socket_clients_are_local() -> None:
    factory = RelayServerFactory(
        make_settings(), cast(IMessageStore, FakeStore()), Clock()
    )
    server = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=cast(IPv4Address, UNIXAddress(None)))
    server.makeConnection(transport)
    server.dataReceived(b"EHLO local\r\n")
    server.dataReceived(b"MAIL FROM:<a@test.example>\r\n")
    server.dataReceived(b"RCPT TO:<b@example.net>\r\n")
    server.dataReceived(b"DATA\r\n")
    server.dataReceived(b"x\r\n.\r\n")
    codes = [r.code for r in parse_replies(transport.value())]
    assert codes == [220, 250, 250, 250, 354, 250]
    store = cast(FakeStore, factory.store)
    entry, content = store.stored[0]
    assert entry.client_address is None
    assert content.startswith(b"Received: from local (unix socket)\r\n")


# -- the store -----------------------------------------------------------------------


def test_disk_error_is_452_431_and_nothing_is_kept() -> None:
    store = FakeStore("fail")
    session = open_session(store=store)
    ehlo(session)
    reply = session.message()
    assert (reply.code, reply.enhanced) == (452, "4.3.1")
    assert store.stored == []
    assert session.codes(b"RCPT TO:<b@example.net>\r\n") == [503]
    store.mode = "ok"
    assert session.message().code == 250


def test_unexpected_store_failure_is_451(logs: Sequence[LogEvent]) -> None:
    session = open_session(store=FakeStore("crash"))
    ehlo(session)
    reply = session.message()
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    failures = [event["log_failure"] for event in logs if "log_failure" in event]
    assert [str(failure.value) for failure in failures] == ["store bug"]


def test_entry_carries_the_session_facts() -> None:
    session = open_session(clock=clock_at(1_800_000_000))
    ehlo(session, b"client.test.example")
    assert session.message(b"Subject: x\r\n\r\nbody\r\n").code == 250
    entry, content = session.store.stored[0]
    assert entry.sender == "a@test.example"
    assert entry.client_address == "127.0.0.1"
    assert entry.client_helo == "client.test.example"
    assert entry.authenticated_as is None
    assert entry.arrival_time == 1_800_000_000
    assert entry.size == len(content)
    assert strip_received(content) == b"Subject: x\r\n\r\nbody\r\n"


def test_data_is_unstuffed_and_empty_message_accepted() -> None:
    session = open_session()
    ehlo(session)
    assert session.message(b"..leading dot\r\n..\r\n").code == 250
    assert session.store.bodies[0] == b".leading dot\r\n.\r\n"
    assert session.message(b"").code == 250
    assert session.store.bodies[1] == b""


def test_normalize_mode_turns_bare_line_endings_into_crlf() -> None:
    session = open_session(settings=make_settings(bare_line_endings="normalize"))
    ehlo(session)
    assert session.message(b"a\nb\rc\r\n").code == 250
    assert session.store.bodies == [b"a\r\nb\r\nc\r\n"]


def test_connection_lost_during_data_keeps_nothing() -> None:
    session = open_session()
    ehlo(session)
    session.envelope("b@example.net")
    assert session.codes(b"DATA\r\n") == [354]
    session.send(b"Subject: half\r\n")
    session.client.transport.loseConnection()  # type: ignore[union-attr]
    session.connection.pump()
    assert session.closed
    assert session.store.calls == 0


# -- Received: header ----------------------------------------------------------------


def received_of(content: bytes) -> str:
    head = content.split(b"\r\n")
    lines = [head[0]]
    for line in head[1:]:
        if not line.startswith(b"\t"):
            break
        lines.append(line)
    return b"\r\n".join(lines).decode("ascii")


def test_received_header_over_starttls(ca: CertificateAuthority) -> None:
    session = open_session(ca, clock=clock_at(1_800_000_000))
    session.start_tls()
    ehlo(session, b"laptop.test.example")
    assert session.message().code == 250
    entry, content = session.store.stored[0]
    header = received_of(content)
    first, second, third, fourth = header.split("\r\n")
    assert first == "Received: from laptop.test.example ([127.0.0.1])"
    assert second.startswith(
        "\tby mx.test.example (txstarttls) with ESMTPS (using TLSv1.3 with cipher "
    )
    assert third == f"\tid {entry.queue_id}"
    assert fourth.startswith("\tfor <b@example.net>; ")
    date = email.utils.parsedate_to_datetime(fourth.split("; ", 1)[1])
    assert date.timestamp() == 1_800_000_000


def test_received_header_plain_helo_and_several_recipients() -> None:
    session = open_session()
    session.send(b"HELO old.example\r\n")
    session.envelope("b@example.net", "c@example.net")
    session.send(b"DATA\r\n")
    session.send(b"x\r\n.\r\n")
    header = received_of(session.store.contents[0])
    assert "with SMTP\r\n" in header
    assert " for " not in header and "b@example.net" not in header


def test_received_header_sanitises_a_forging_helo() -> None:
    session = open_session()
    helo = b"evil.example (via bank.example) by bank.example; Bcc: x@y"
    assert session.codes(b"EHLO " + helo + b"\r\n") == [250]
    assert session.message().code == 250
    header = received_of(session.store.contents[0])
    first = header.split("\r\n")[0]
    assert first == (
        "Received: from evil.example??via?bank.example??by?bank.example??Bcc:?x?y "
        "([127.0.0.1])"
    )


@pytest.mark.parametrize(
    "helo",
    [
        "a\r\nBcc: victim@example.net",
        "a\nX-Forged: yes",
        "a\rb",
        "ünïcode.example",
        "a\x00b",
        "x" * 300,
        "",
    ],
)
def test_received_header_function_never_breaks_the_line(helo: str) -> None:
    header = received_header(
        helo=helo,
        client_address="192.0.2.1\r\nX: y",
        hostname="mx\r\nBcc: z",
        protocol="ESMTP\r\nA: b",
        queue_id="ID\r\nC: d",
        timestamp=0,
        recipients=("a@b.example\r\nE: f",),
        tls=TLSDetails("TLSv1.3\r\nG: h", "CIPHER\nI: j", 256),
    )
    lines = header.split(b"\r\n")
    assert lines[-1] == b""
    assert lines[0].startswith(b"Received: ")
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    assert b"\n" not in header.replace(b"\r\n", b"")
    assert b"\r" not in header.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in lines)
    assert header.isascii()
    assert b" for " not in header


def test_received_header_ipv6_literal_and_bits() -> None:
    header = received_header(
        helo="h.example",
        client_address="::1",
        hostname="mx.example",
        protocol="ESMTPS",
        queue_id="ABC",
        timestamp=0,
        recipients=("a@b.example",),
        tls=TLSDetails("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384", 256),
    ).decode()
    assert header.startswith("Received: from h.example ([IPv6:::1])\r\n")
    assert (
        "(using TLSv1.2 with cipher ECDHE-RSA-AES256-GCM-SHA384 (256 bits))" in header
    )
    assert "\tfor <a@b.example>; " in header


@pytest.mark.parametrize(
    ("esmtp", "tls", "authenticated", "expected"),
    [
        (False, False, False, "SMTP"),
        (False, True, True, "SMTP"),
        (True, False, False, "ESMTP"),
        (True, True, False, "ESMTPS"),
        (True, False, True, "ESMTPA"),
        (True, True, True, "ESMTPSA"),
    ],
)
def test_transmission_type(
    esmtp: bool, tls: bool, authenticated: bool, expected: str
) -> None:
    assert transmission_type(esmtp=esmtp, tls=tls, authenticated=authenticated) == (
        expected
    )


def test_quoted_recipient_is_not_echoed_in_received() -> None:
    session = open_session()
    ehlo(session)
    assert session.message(b"x\r\n", '"a;b"@example.net').code == 250
    assert b"for <" not in session.store.contents[0].split(b"\r\n\r\n")[0]


# -- AUTH ----------------------------------------------------------------------------


def auth_session(ca: CertificateAuthority, **settings: Any) -> Session:
    session = open_session(
        ca, settings=make_settings(ca, **settings), portal=users_portal()
    )
    session.start_tls()
    ehlo(session)
    return session


def test_auth_plain_with_initial_response(ca: CertificateAuthority) -> None:
    session = auth_session(ca)
    reply = session.send(b"AUTH PLAIN " + PLAIN + b"\r\n")[0]
    assert (reply.code, reply.enhanced) == (235, "2.7.0")
    assert session.server.authenticated_as == "alice"


def test_auth_plain_after_empty_challenge(ca: CertificateAuthority) -> None:
    session = auth_session(ca)
    [challenge] = session.send(b"AUTH PLAIN\r\n")
    assert (challenge.code, challenge.lines) == (334, ("",))
    assert session.codes(PLAIN + b"\r\n") == [235]


def test_auth_login(ca: CertificateAuthority) -> None:
    session = auth_session(ca)
    [first] = session.send(b"AUTH LOGIN\r\n")
    assert first.lines == ("VXNlcm5hbWU6",)
    [second] = session.send(base64.b64encode(USER) + b"\r\n")
    assert second.lines == ("UGFzc3dvcmQ6",)
    assert session.codes(base64.b64encode(PASSWORD) + b"\r\n") == [235]


def test_auth_login_with_initial_response(ca: CertificateAuthority) -> None:
    session = auth_session(ca)
    [prompt] = session.send(b"AUTH LOGIN " + base64.b64encode(USER) + b"\r\n")
    assert prompt.lines == ("UGFzc3dvcmQ6",)
    assert session.codes(base64.b64encode(PASSWORD) + b"\r\n") == [235]


def test_auth_cancel_and_bad_base64(ca: CertificateAuthority) -> None:
    session = auth_session(ca)
    session.send(b"AUTH LOGIN\r\n")
    reply = session.send(b"*\r\n")[0]
    assert (reply.code, reply.enhanced) == (501, "5.0.0")
    session.send(b"AUTH PLAIN\r\n")
    reply = session.send(b"not base64!\r\n")[0]
    assert (reply.code, reply.enhanced) == (501, "5.5.2")
    reply = session.send(b"AUTH PLAIN " + base64.b64encode(b"no-nuls") + b"\r\n")[0]
    assert (reply.code, reply.enhanced) == (501, "5.5.2")
    assert session.codes(b"AUTH PLAIN " + PLAIN + b"\r\n") == [235]


def test_auth_failure_is_delayed_then_535(ca: CertificateAuthority) -> None:
    session = auth_session(ca, auth_failure_delay=1.0)
    assert session.send(b"AUTH PLAIN " + WRONG_PLAIN + b"\r\nNOOP\r\n") == []
    session.clock.advance(0.99)
    assert session.pump() == []
    session.clock.advance(0.01)
    replies = session.pump()
    assert [(r.code, r.enhanced) for r in replies] == [(535, "5.7.8"), (250, "2.0.0")]
    assert session.server.authenticated_as is None


def test_too_many_auth_failures_421_and_close(ca: CertificateAuthority) -> None:
    session = auth_session(ca, max_auth_failures=3)
    for attempt in range(3):
        session.send(b"AUTH PLAIN " + WRONG_PLAIN + b"\r\n")
        session.clock.advance(1)
        [reply] = session.pump()
        if attempt < 2:
            assert reply.code == 535
        else:
            assert (reply.code, reply.enhanced) == (421, "4.7.0")
    assert session.closed


def test_auth_with_someone_elses_authzid_fails(ca: CertificateAuthority) -> None:
    session = auth_session(ca)
    response = base64.b64encode(b"root\0" + USER + b"\0" + PASSWORD)
    session.send(b"AUTH PLAIN " + response + b"\r\n")
    session.clock.advance(1)
    assert [r.code for r in session.pump()] == [535]


def test_auth_twice_and_during_transaction_and_unknown_mechanism(
    ca: CertificateAuthority,
) -> None:
    session = auth_session(ca)
    assert session.codes(b"AUTH CRAM-MD5\r\n") == [504]
    session.send(b"MAIL FROM:<a@test.example>\r\n")
    assert session.codes(b"AUTH PLAIN " + PLAIN + b"\r\n") == [503]
    session.send(b"RSET\r\n")
    assert session.codes(b"AUTH PLAIN " + PLAIN + b"\r\n") == [235]
    reply = session.send(b"AUTH PLAIN " + PLAIN + b"\r\n")[0]
    assert (reply.code, reply.enhanced) == (503, "5.5.1")


def test_auth_needs_ehlo_after_tls(ca: CertificateAuthority) -> None:
    session = open_session(ca, portal=users_portal())
    session.start_tls()
    assert session.codes(b"AUTH PLAIN " + PLAIN + b"\r\n") == [503]


def test_auth_checker_error_is_454(ca: CertificateAuthority) -> None:
    @implementer(ICredentialsChecker)
    class Broken:
        credentialInterfaces = (IUsernamePassword,)

        def requestAvatarId(self, credentials: object) -> Deferred[bytes | tuple[()]]:
            return fail(OSError("users file vanished"))

    session = open_session(ca, portal=make_portal(Broken()))
    session.start_tls()
    ehlo(session)
    reply = session.send(b"AUTH PLAIN " + PLAIN + b"\r\n")[0]
    assert (reply.code, reply.enhanced) == (454, "4.7.0")


def test_auth_logs_user_and_outcome_never_credentials(
    ca: CertificateAuthority, logs: Sequence[LogEvent]
) -> None:
    session = auth_session(ca)
    session.send(b"AUTH PLAIN " + WRONG_PLAIN + b"\r\n")
    session.clock.advance(1)
    session.pump()
    session.send(b"AUTH LOGIN\r\n")
    session.send(base64.b64encode(USER) + b"\r\n")
    session.send(base64.b64encode(PASSWORD) + b"\r\n")
    text = log_text(logs)
    assert "authentication failed, sasl_username=alice" in text
    assert "sasl_method=LOGIN, sasl_username=alice" in text
    for secret in (
        PASSWORD,
        b"wrong password",
        PLAIN,
        WRONG_PLAIN,
        base64.b64encode(PASSWORD),
    ):
        assert secret.decode() not in text


def test_auth_response_line_too_long_ends_the_exchange(
    ca: CertificateAuthority,
) -> None:
    session = auth_session(ca)
    session.send(b"AUTH PLAIN\r\n")
    assert session.codes(b"A" * 600 + b"\r\n") == [500]
    assert session.codes(b"NOOP\r\n") == [250]


# -- shutdown ------------------------------------------------------------------------


def test_shutdown_says_421_432_to_every_client() -> None:
    first = open_session()
    second = open_session(factory=first.factory)
    ehlo(first)
    done = first.factory.shutdown()
    for session in (first, second):
        [reply] = session.pump()
        assert (reply.code, reply.enhanced) == (421, "4.3.2")
        assert session.closed
    assert done.called
    assert first.factory.connections == frozenset()


def test_shutdown_mid_data_never_acknowledges() -> None:
    session = open_session()
    ehlo(session)
    session.envelope("b@example.net")
    session.send(b"DATA\r\n")
    session.send(b"Subject: half\r\n")
    done = session.factory.shutdown()
    session.client.send(b"rest\r\n.\r\n")
    replies = session.pump()
    assert [r.code for r in replies] == [421]
    assert session.store.calls == 0
    assert done.called


def test_shutdown_lets_a_store_in_flight_finish_with_250_then_421() -> None:
    store = FakeStore("manual")
    session = open_session(store=store)
    ehlo(session)
    session.envelope("b@example.net")
    session.send(b"DATA\r\n")
    session.send(b"body\r\n.\r\n")
    done = session.factory.shutdown()
    assert session.pump() == []
    assert not done.called
    store.finish()
    replies = session.pump()
    assert [(r.code, r.enhanced) for r in replies] == [(250, "2.0.0"), (421, "4.3.2")]
    assert done.called


def test_connection_during_shutdown_is_refused() -> None:
    first = open_session()
    first.factory.shutdown()
    late = open_session(factory=first.factory)
    assert [r.code for r in parse_replies(bytes(late.client.received))] == [421]
    assert late.closed


def test_shutdown_with_no_clients_fires_at_once() -> None:
    factory = RelayServerFactory(
        make_settings(), cast(IMessageStore, FakeStore()), Clock()
    )
    assert factory.shutdown().called


def test_shutdown_drops_a_client_that_never_lets_go() -> None:
    session = open_session()
    # The peer stops reading: our close never completes on its own.
    session.connection.server_to_client._receiver = None
    done = session.factory.shutdown(grace=5)
    session.connection.pump()
    assert not done.called
    session.clock.advance(5)
    session.connection.pump()
    assert done.called


# -- logging -------------------------------------------------------------------------


def test_postfix_style_log_lines(logs: Sequence[LogEvent]) -> None:
    session = open_session()
    ehlo(session)
    session.message()
    session.send(b"RCPT TO:<x@example.net>\r\nQUIT\r\n")
    queue_id = session.store.stored[0][0].queue_id
    size = session.store.stored[0][0].size
    text = log_text(logs)
    assert "connect from [127.0.0.1]" in text
    assert f"{queue_id}: client=[127.0.0.1]" in text
    assert (
        f"{queue_id}: from=<a@test.example>, size={size}, nrcpt=1 (queue active)"
        in text
    )
    assert (
        "disconnect from [127.0.0.1] ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6"
        in text
    )


def test_settings_are_validated() -> None:
    for bad in (
        {"hostname": ""},
        {"hostname": "a b"},
        {"hostname": "mx\r\n"},
        {"bare_line_endings": "ignore"},
        {"max_size": 0},
        {"max_line_length": 100},
        {"idle_timeout": 0},
        {"max_auth_failures": 0},
        {"greet_pause": -1},
    ):
        with pytest.raises(ValueError):
            dataclasses.replace(ListenerSettings(hostname=HOSTNAME), **bad)
