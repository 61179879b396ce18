"""A hostile upstream in memory: run one client session against scripted bytes.

Shared by ``tests/test_security_client.py`` and ``tests/test_session.py``.
:func:`start` connects a real :class:`ESMTPClient` to a
:class:`ScriptedSMTPServerFactory` server with real TLS over
:func:`connect_in_memory` and starts :func:`run_session`; the test pumps,
injects and then asks what the client concluded and what each side saw:

* ``client_lines()``: every line the client meant to send (its transcript,
  AUTH redacted), whether or not it reached the wire;
* ``server_commands()``: the verbs the server received;
* ``wire_to_server``: the raw bytes on the wire, as an eavesdropper saw them.

"No leak" (:meth:`HostileRun.assert_no_leak`) checks all three.
"""

from __future__ import annotations

import base64
import functools
import gc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import (
    ILogObserver,
    LogEvent,
    globalLogBeginner,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from zope.interface import provider

from txstarttls.client import ESMTPClient, Timeouts
from txstarttls.errors import SMTPError
from txstarttls.message import PreparedMessage
from txstarttls.sasl import Credentials
from txstarttls.session import Envelope, SendResult, run_session
from txstarttls.testing import (
    CertificateAuthority,
    IssuedCertificate,
    MemoryConnection,
    ScriptedSMTPServer,
    ScriptedSMTPServerFactory,
    connect_in_memory,
    self_signed,
    server_tls_options,
)
from txstarttls.tls import ClientTLS, TLSMode, TLSPolicy
from txstarttls.upstream import Upstream, prepare_tls

__all__ = [
    "BODY_MARKER",
    "EHLO_NAME",
    "HOST",
    "MESSAGE",
    "PASSWORD",
    "RECIPIENT",
    "SEGMENTS",
    "SEGMENT_IDS",
    "SENDER",
    "USERNAME",
    "Certificates",
    "HostileRun",
    "certificates",
    "credentials",
    "failure_of",
    "nth_time",
    "secrets",
    "start",
    "unhandled_deferred_errors",
]

HOST = "smtp.example.net"
"""The upstream host name the client is configured with (SECURITY-CASES 9)."""

EHLO_NAME = "client.example"
USERNAME = "alice"
PASSWORD = "s3cret-Horse-battery"
SENDER = "sender@client.example"
RECIPIENT = "rcpt@example.net"
BODY_MARKER = b"BODY-MARKER-7f3a"
MESSAGE = b"Subject: hostile test\r\n\r\n" + BODY_MARKER + b"\r\n"

SEGMENTS: list[int | None] = [None, 1]
"""How the hostile bytes arrive: one segment (None) or one byte per read."""

SEGMENT_IDS = ["one-segment", "split"]

_CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 49152)

_T = TypeVar("_T")


def credentials(**overrides: Any) -> Credentials:
    """A password login as ``alice`` (override any Credentials field)."""
    settings: dict[str, Any] = {"username": USERNAME, "password": PASSWORD}
    settings.update(overrides)
    return Credentials(**settings)


def secrets() -> list[bytes]:
    """Every form in which the password could appear on the wire."""
    plain = b"\0" + USERNAME.encode() + b"\0" + PASSWORD.encode()
    return [
        PASSWORD.encode(),
        base64.b64encode(plain),
        base64.b64encode(PASSWORD.encode()),
    ]


# -- certificates ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Certificates:
    """A CA and server certificates for :data:`HOST`, good and bad."""

    ca: CertificateAuthority
    trust_root: IOpenSSLTrustRoot
    good: IssuedCertificate
    wildcard: IssuedCertificate
    self_signed: IssuedCertificate
    other_self_signed: IssuedCertificate
    unknown_root: IssuedCertificate
    other_name: IssuedCertificate
    expired: IssuedCertificate
    ip_address: IssuedCertificate


@functools.cache
def certificates() -> Certificates:
    """Made once per test process; EC keys make this take milliseconds."""
    ca = CertificateAuthority("txstarttls hostile-test CA")
    other = CertificateAuthority("txstarttls unknown CA")
    trust_root: IOpenSSLTrustRoot = ssl.trustRootFromCertificates(
        [ssl.Certificate.loadPEM(ca.certificate_pem)]
    )
    return Certificates(
        ca=ca,
        trust_root=trust_root,
        good=ca.issue(HOST),
        wildcard=ca.issue("*.example.net"),
        self_signed=self_signed(HOST),
        other_self_signed=self_signed(HOST),
        unknown_root=other.issue(HOST),
        other_name=ca.issue("mail.example.org"),
        expired=ca.issue_expired(HOST),
        ip_address=ca.issue("127.0.0.1", "::1"),
    )


# -- reading Deferreds synchronously --------------------------------------------


def _outcome(d: Deferred[_T]) -> list[_T | Failure]:
    box: list[_T | Failure] = []

    def keep(value: _T | Failure) -> None:
        box.append(value)

    d.addBoth(keep)
    return box


def failure_of(d: Deferred[Any]) -> BaseException:
    """The exception of a Deferred that has already failed (consumed here)."""
    box = _outcome(d)
    assert box, "the Deferred has not fired"
    value = box[0]
    assert isinstance(value, Failure), f"expected a failure, got {value!r}"
    assert value.value is not None
    return value.value


# -- watching for Deferreds whose errors nobody handled -----------------------


@contextmanager
def unhandled_deferred_errors() -> Iterator[list[LogEvent]]:
    """Collect "Unhandled error in Deferred" log events raised inside the block.

    Until logging begins, Twisted keeps every log event in a buffer, and with
    it every object an event names (a client, its Deferreds): such a Deferred
    would be reported long after the test that leaked it, or never. So the
    buffer is detached for the block. Objects that exist on entry are frozen
    out of garbage collection, which keeps the collection on the way out cheap
    and limited to what the block left behind.
    """
    events: list[LogEvent] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "twisted.internet.defer" and event.get(
            "isError"
        ):
            events.append(event)

    buffering = globalLogBeginner._temporaryObserver
    if buffering is not None:
        globalLogPublisher.removeObserver(buffering)
    gc.freeze()
    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        gc.collect()
        globalLogPublisher.removeObserver(observe)
        gc.unfreeze()
        if buffering is not None:
            globalLogPublisher.addObserver(buffering)


# -- script helpers ---------------------------------------------------------------


def nth_time(n: int) -> Callable[[str], bool]:
    """A ``match`` for a script rule that fires on the n-th use only (1-based)."""
    seen = 0

    def match(argument: str) -> bool:
        nonlocal seen
        seen += 1
        return seen == n

    return match


# -- one hostile session ------------------------------------------------------------


@dataclass(eq=False)
class HostileRun:
    """A client session in progress against a scripted server, in memory."""

    factory: ScriptedSMTPServerFactory
    server: ScriptedSMTPServer
    client: ESMTPClient
    connection: MemoryConnection
    clock: Clock
    outcome: Deferred[SendResult]
    transcript: list[tuple[str, bytes]] = field(default_factory=list)
    _outcome: list[SendResult | Failure] | None = field(default=None, repr=False)

    # -- driving ------------------------------------------------------------

    def pump(self) -> HostileRun:
        self.connection.pump()
        return self

    def pump_until(self, condition: Callable[[], bool], rounds: int = 10_000) -> None:
        """Pump one round at a time until ``condition()`` holds."""
        for _ in range(rounds):
            if condition():
                return
            if not self.connection.pump_once():
                break
        assert condition(), "the condition never held"

    def inject(self, data: bytes) -> None:
        """Raw bytes on the server-to-client wire, as a man in the middle."""
        self.connection.server_to_client.inject(data)

    # -- outcome ------------------------------------------------------------

    def result(self) -> SendResult:
        value = self._settled()
        if isinstance(value, Failure):
            raise AssertionError(f"expected a result, got {value.value!r}") from (
                value.value
            )
        return value

    def failure(self) -> SMTPError:
        value = self._settled()
        assert isinstance(value, Failure), f"expected a failure, got {value!r}"
        error = value.value
        assert isinstance(error, SMTPError), f"not a typed error: {error!r}"
        return error

    def _settled(self) -> SendResult | Failure:
        """The outcome, taken from the Deferred once and kept (may be asked
        for again)."""
        if self._outcome is None:
            self._outcome = _outcome(self.outcome)
        assert self._outcome, "the session has not finished"
        return self._outcome[0]

    # -- what each side saw -------------------------------------------------

    def client_lines(self) -> list[bytes]:
        """Every line the client wrote (or tried to), in order."""
        return [line for who, line in self.transcript if who == "C"]

    def client_verbs(self) -> list[str]:
        return [_verb(line) for line in self.client_lines()]

    def server_lines(self) -> list[bytes]:
        """Every client line the server read, AUTH payloads redacted."""
        return [data for who, data in self.server.session.transcript if who == "C"]

    def server_commands(self) -> list[str]:
        """The verbs the server read outside DATA."""
        verbs: list[str] = []
        in_data = False
        for who, data in self.server.session.transcript:
            if who == "S":
                in_data = data.startswith(b"354")
                continue
            if not in_data:
                verbs.append(_verb(data))
        return verbs

    @property
    def wire_to_server(self) -> bytes:
        return self.connection.client_to_server.delivered

    def assert_no_leak(self) -> None:
        """The peer never saw AUTH, credentials, MAIL, RCPT, DATA or the body,
        and the client never even tried to send them."""
        forbidden = {"AUTH", "MAIL", "RCPT", "DATA"}
        assert not forbidden & set(self.client_verbs()), self.client_lines()
        assert b"<message body>" not in self.client_lines()
        assert not forbidden & set(self.server_commands()), self.server_lines()
        wire = self.wire_to_server
        seen = b"".join(self.server_lines())
        for secret in [*secrets(), BODY_MARKER]:
            assert secret not in wire
            assert secret not in seen
        assert self.factory.messages == []

    def assert_plaintext_wire_clean(self) -> None:
        """Nothing but EHLO, STARTTLS and QUIT in clear text on the wire."""
        for line in self.wire_to_server.split(b"\r\n"):
            if line:
                assert _verb(line) in {"EHLO", "STARTTLS", "QUIT"}, line

    def commands_after(self, verb: str) -> list[str]:
        """The verbs the server read after the first ``verb``."""
        commands = self.server_commands()
        assert verb in commands, commands
        return commands[commands.index(verb) + 1 :]


def _verb(line: bytes) -> str:
    return line.split(b" ", 1)[0].strip().decode("ascii", "replace").upper()


def start(
    *,
    mode: TLSMode = TLSMode.REQUIRED,
    split: int | None = None,
    certificate: IssuedCertificate | None = None,
    fingerprint: str | None = None,
    host: str = HOST,
    configure: Callable[[ScriptedSMTPServerFactory], object] | None = None,
    creds: Credentials | None = None,
    allow_plaintext_auth: bool = False,
    recipients: Sequence[str] = (RECIPIENT,),
    sender: str = SENDER,
    message: bytes = MESSAGE,
    timeouts: Timeouts | None = None,
    server_tls: bool = True,
    server_address: IPv4Address | None = None,
    **server_knobs: Any,
) -> HostileRun:
    """Connect a client to a scripted server in memory and start a session.

    Nothing moves until the caller pumps. ``split`` applies to both
    directions; ``configure`` scripts the factory before the server greets.
    """
    certs = certificates()
    issued = certificate or certs.good
    server_knobs.setdefault("users", {USERNAME: PASSWORD})
    factory = ScriptedSMTPServerFactory(
        hostname=HOST,
        tls_options=server_tls_options(issued) if server_tls else None,
        **server_knobs,
    )
    if configure is not None:
        configure(factory)
    upstream = Upstream(
        host=host,
        port=587,
        tls=TLSPolicy(mode, fingerprint=fingerprint),
        credentials=creds,
        ehlo_name=EHLO_NAME,
        timeouts=timeouts or Timeouts(),
        allow_plaintext_auth=allow_plaintext_auth,
    )
    tls: ClientTLS | None = prepare_tls(upstream, trust_root=certs.trust_root)
    clock = Clock()
    transcript: list[tuple[str, bytes]] = []

    def record(direction: str, line: bytes) -> None:
        transcript.append((direction, line))

    client = ESMTPClient(
        clock,
        timeouts=upstream.timeouts,
        implicit_tls=tls if mode is TLSMode.IMPLICIT else None,
        transcript=record,
    )
    server = factory.buildProtocol(_CLIENT_ADDRESS)
    address: dict[str, IPv4Address] = {}
    if server_address is not None:
        address["server_address"] = server_address
    connection = connect_in_memory(client, server, **address)
    connection.server_to_client.split = split
    connection.client_to_server.split = split
    outcome = ensureDeferred(
        run_session(
            client,
            upstream,
            tls,
            Envelope(sender, tuple(recipients)),
            PreparedMessage.from_bytes(message),
        )
    )
    return HostileRun(
        factory=factory,
        server=server,
        client=client,
        connection=connection,
        clock=clock,
        outcome=outcome,
        transcript=transcript,
    )
