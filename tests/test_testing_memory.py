"""Tests for txstarttls.testing.connect_in_memory: real TLS, split reads, injection."""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IHandshakeListener,
    IPullProducer,
    IPushProducer,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from txstarttls.testing import (
    CertificateAuthority,
    IssuedCertificate,
    MemoryConnection,
    MemoryTransport,
    connect_in_memory,
    self_signed,
    server_tls_options,
)

HOSTNAME = "mx.test.example"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def good(ca: CertificateAuthority) -> IssuedCertificate:
    return ca.issue(HOSTNAME)


@implementer(IHandshakeListener)
class ToyServer(LineReceiver):
    """Greets, echoes lines, and answers STARTTLS with GO then starts TLS."""

    def __init__(self, certificate: IssuedCertificate) -> None:
        self.certificate = certificate
        self.lines: list[bytes] = []
        self.handshakes = 0
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        send_line(self, b"HELLO")

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)
        if line == b"STARTTLS":
            send_line(self, b"GO")
            options = server_tls_options(self.certificate)
            transport_of(self).startTLS(options)
        else:
            send_line(self, b"ECHO " + line)

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


@implementer(IHandshakeListener)
class ToyClient(LineReceiver):
    """Starts TLS, trusting ``ca`` for ``hostname``, when the server says GO."""

    def __init__(self, ca: CertificateAuthority, hostname: str = HOSTNAME) -> None:
        self.ca = ca
        self.hostname = hostname
        self.lines: list[bytes] = []
        self.handshakes = 0
        self.lost: Failure | None = None

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)
        if line == b"GO":
            trust = Certificate.loadPEM(self.ca.certificate_pem)
            options = optionsForClientTLS(self.hostname, trustRoot=trust)
            transport_of(self).startTLS(options)

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


def send_line(protocol: Protocol, line: bytes) -> None:
    assert protocol.transport is not None
    protocol.transport.write(line + b"\r\n")


def failed_with(reason: Failure | None, *kinds: type[BaseException]) -> bool:
    return reason is not None and isinstance(reason.value, kinds)


def transport_of(protocol: Protocol) -> MemoryTransport:
    assert isinstance(protocol.transport, MemoryTransport)
    return protocol.transport


def upgrade(
    ca: CertificateAuthority, certificate: IssuedCertificate, hostname: str = HOSTNAME
) -> tuple[ToyClient, ToyServer, MemoryConnection]:
    client, server = ToyClient(ca, hostname), ToyServer(certificate)
    connection = connect_in_memory(client, server)
    connection.pump()
    send_line(client, b"STARTTLS")
    connection.pump()
    return client, server, connection


def test_starttls_runs_a_real_handshake(
    ca: CertificateAuthority, good: IssuedCertificate
) -> None:
    client, server, connection = upgrade(ca, good)
    assert client.lines == [b"HELLO", b"GO"]
    assert (client.handshakes, server.handshakes) == (1, 1)
    assert client.lost is None and server.lost is None
    client_transport = transport_of(client)
    assert ISSLTransport.providedBy(client_transport)
    assert ISSLTransport.providedBy(transport_of(server))
    handle = client_transport.getHandle()
    assert isinstance(handle, SSL.Connection)
    assert handle.get_protocol_version_name() in ("TLSv1.2", "TLSv1.3")
    assert handle.get_cipher_name()
    peer = client_transport.getPeerCertificate()
    assert isinstance(peer, SSL.X509)  # type: ignore[attr-defined]

    send_line(client, b"a secret line")
    connection.pump()
    assert server.lines == [b"STARTTLS", b"a secret line"]
    assert client.lines[-1] == b"ECHO a secret line"
    # On the wire the line is encrypted; only the pre-TLS part is readable.
    assert b"secret" not in connection.client_to_server.delivered
    assert b"secret" not in connection.server_to_client.delivered
    assert connection.client_to_server.delivered.startswith(b"STARTTLS\r\n\x16\x03")


def test_transport_is_ssl_only_after_starttls(
    ca: CertificateAuthority, good: IssuedCertificate
) -> None:
    client, server = ToyClient(ca), ToyServer(good)
    connection = connect_in_memory(client, server)
    connection.pump()
    transport = transport_of(client)
    assert not ISSLTransport.providedBy(transport)
    assert transport.getHandle() is None
    assert transport.getPeerCertificate() is None
    assert not transport.tls_active


def test_wrong_name_fails_verification(ca: CertificateAuthority) -> None:
    client, server, connection = upgrade(ca, ca.issue("other.example"))
    assert client.handshakes == 0
    assert client.lost is not None
    assert failed_with(client.lost, VerificationError)
    assert server.lost is not None
    assert connection.closed


@pytest.mark.parametrize("issuer", ["other CA", "self-signed"])
def test_untrusted_certificate_fails(ca: CertificateAuthority, issuer: str) -> None:
    certificate = (
        CertificateAuthority("another CA").issue(HOSTNAME)
        if issuer == "other CA"
        else self_signed(HOSTNAME)
    )
    client, _, connection = upgrade(ca, certificate)
    assert client.handshakes == 0
    assert client.lost is not None
    assert failed_with(client.lost, SSL.Error)
    assert connection.closed


def test_writes_before_the_handshake_wait_for_it(
    ca: CertificateAuthority, good: IssuedCertificate
) -> None:
    client, server = ToyClient(ca), ToyServer(good)
    connection = connect_in_memory(client, server)
    connection.pump()
    send_line(client, b"STARTTLS")
    connection.pump_once()  # server saw STARTTLS, GO is on its way
    connection.pump_once()  # client reads GO and sends its ClientHello
    send_line(client, b"early")  # buffered by the TLS layer until it is ready
    connection.pump()
    assert server.lines == [b"STARTTLS", b"early"]
    assert b"early" not in connection.client_to_server.delivered


def test_tls_close_is_clean_on_both_sides(
    ca: CertificateAuthority, good: IssuedCertificate
) -> None:
    client, server, connection = upgrade(ca, good)
    transport_of(client).loseConnection()
    connection.pump()
    assert connection.closed
    assert failed_with(client.lost, error.ConnectionDone)
    assert failed_with(server.lost, error.ConnectionDone)


def test_plain_close_delivers_pending_bytes_first(good: IssuedCertificate) -> None:
    client, server = ToyClient(CertificateAuthority()), ToyServer(good)
    connection = connect_in_memory(client, server)
    send_line(client, b"last words")
    transport_of(client).loseConnection()
    send_line(client, b"too late")
    connection.pump()
    assert server.lines == [b"last words"]
    assert failed_with(client.lost, error.ConnectionDone)
    assert failed_with(server.lost, error.ConnectionDone)
    # The client stopped reading when it closed: it never saw the greeting.
    assert client.lines == []


def test_abort_discards_pending_bytes(good: IssuedCertificate) -> None:
    client, server = ToyClient(CertificateAuthority()), ToyServer(good)
    connection = connect_in_memory(client, server)
    send_line(client, b"never delivered")
    transport_of(client).abortConnection()
    connection.pump()
    assert server.lines == []
    assert failed_with(client.lost, error.ConnectionAborted)
    assert failed_with(server.lost, error.ConnectionLost)


def test_abort_after_tls(ca: CertificateAuthority, good: IssuedCertificate) -> None:
    client, server, connection = upgrade(ca, good)
    transport_of(server).abortConnection()
    connection.pump()
    assert connection.closed
    # As over TCP, the TLS layer reports its own abort as a lost connection.
    assert server.lost is not None
    assert failed_with(server.lost, error.ConnectionAborted, error.ConnectionLost)
    assert failed_with(client.lost, error.ConnectionLost)


@pytest.mark.parametrize("split", [1, 2, 7, 1000])
def test_split_delivery(
    ca: CertificateAuthority, good: IssuedCertificate, split: int
) -> None:
    client, server = ToyClient(ca), ToyServer(good)
    connection = connect_in_memory(client, server)
    connection.client_to_server.split = split
    connection.server_to_client.split = split
    connection.pump()
    data = b"one\r\ntwo\r\nSTARTTLS\r\n"
    transport_of(client).write(data)
    connection.pump()
    assert server.lines[:3] == [b"one", b"two", b"STARTTLS"]
    assert connection.client_to_server.reads >= -(-len(data) // split)
    assert client.handshakes == 1
    send_line(client, b"over TLS")
    connection.pump()
    assert server.lines[-1] == b"over TLS"
    assert client.lines[-1] == b"ECHO over TLS"


def test_one_segment_holds_every_pending_write(good: IssuedCertificate) -> None:
    client, server = ToyClient(CertificateAuthority()), ToyServer(good)
    connection = connect_in_memory(client, server)
    send_line(client, b"one")
    send_line(client, b"two")
    assert connection.client_to_server.pending == b"one\r\ntwo\r\n"
    connection.pump()
    assert connection.client_to_server.reads == 1
    assert server.lines == [b"one", b"two"]


def test_one_byte_reads(good: IssuedCertificate) -> None:
    client, server = ToyClient(CertificateAuthority()), ToyServer(good)
    connection = connect_in_memory(client, server)
    connection.client_to_server.split = 1
    send_line(client, b"abc")
    connection.pump()
    assert connection.client_to_server.reads == 5
    assert server.lines == [b"abc"]


def test_injection_before_tls_reaches_the_application(good: IssuedCertificate) -> None:
    client, server = ToyClient(CertificateAuthority()), ToyServer(good)
    connection = connect_in_memory(client, server)
    connection.server_to_client.inject(b"INJECTED\r\n")
    connection.pump()
    assert client.lines == [b"HELLO", b"INJECTED"]


def test_injection_after_tls_bypasses_it(
    ca: CertificateAuthority, good: IssuedCertificate
) -> None:
    client, _, connection = upgrade(ca, good)
    connection.server_to_client.inject(b"250 injected in clear\r\n")
    connection.pump()
    # The client's TLS layer saw a bogus record, not an SMTP line.
    assert client.lines == [b"HELLO", b"GO"]
    assert failed_with(client.lost, SSL.Error)
    assert connection.closed


def test_addresses() -> None:
    client, server = Protocol(), Protocol()
    connect_in_memory(client, server)
    client_transport, server_transport = transport_of(client), transport_of(server)
    assert client_transport.getPeer() == IPv4Address("TCP", "127.0.0.1", 25)
    assert server_transport.getPeer() == client_transport.getHost()
    assert server_transport.getHost() == client_transport.getPeer()
    assert client_transport.getHost().host == "127.0.0.1"


@implementer(IPushProducer)
class PushProducer:
    def __init__(self) -> None:
        self.stopped = False

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IPullProducer)
class PullProducer:
    def __init__(self, transport: MemoryTransport, chunks: list[bytes]) -> None:
        self.transport = transport
        self.chunks = chunks

    def resumeProducing(self) -> None:
        if self.chunks:
            self.transport.write(self.chunks.pop(0))
        else:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        pass


def test_streaming_producer_is_stopped_when_the_connection_goes() -> None:
    client, server = Protocol(), Protocol()
    connection = connect_in_memory(client, server)
    producer = PushProducer()
    transport_of(client).registerProducer(producer, True)
    transport_of(server).loseConnection()
    connection.pump()
    assert producer.stopped


def test_pull_producer_is_asked_for_more_on_each_pump(good: IssuedCertificate) -> None:
    client, server = Protocol(), ToyServer(good)
    connection = connect_in_memory(client, server)
    transport = transport_of(client)
    transport.registerProducer(PullProducer(transport, [b"a\r\n", b"b\r\n"]), False)
    connection.pump()
    assert server.lines == [b"a", b"b"]


def test_pump_gives_up_on_endless_chatter() -> None:
    class Chatter(Protocol):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.write(b"x")

        def dataReceived(self, data: bytes) -> None:
            assert self.transport is not None
            self.transport.write(data)

    connection = connect_in_memory(Chatter(), Chatter())
    with pytest.raises(RuntimeError, match="still busy"):
        connection.pump(max_rounds=50)
