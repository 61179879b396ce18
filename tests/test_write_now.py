"""write_now: a short write leaves at once, through TLS when TLS is on."""

from __future__ import annotations

import socket
import ssl as ssl_module
from collections.abc import Callable

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.tcp import Server
from twisted.internet.threads import deferToThread

from txstarttls.testing import CertificateAuthority, server_tls_options
from txstarttls.write_now import write_now


class _Speaker(Protocol):
    def __init__(self, speak: Callable[[ITransport], None]) -> None:
        self.speak = speak

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.speak(self.transport)


async def _what_a_client_reads(speak: Callable[[ITransport], None]) -> bytes:
    factory = ServerFactory()
    factory.buildProtocol = lambda addr: _Speaker(speak)  # type: ignore[method-assign]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    address = port.getHost()
    assert isinstance(address, IPv4Address)

    def read() -> bytes:
        received = b""
        with socket.create_connection(("127.0.0.1", address.port)) as client:
            client.settimeout(0.5)
            try:
                while chunk := client.recv(4096):
                    received += chunk
            except TimeoutError:
                pass
        return received

    try:
        return await deferToThread(read)
    finally:
        await maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_write_on_plain_tcp_leaves_before_the_reactor_turns() -> None:
    buffered: list[int] = []

    def speak(transport: ITransport) -> None:
        assert type(transport) is Server
        write_now(transport, b"220 ready\r\n")
        buffered.append(len(transport._tempDataBuffer) + len(transport.dataBuffer))

    assert await _what_a_client_reads(speak) == b"220 ready\r\n"
    assert buffered == [0]


@pytest_twisted.ensureDeferred
async def test_write_on_plain_tcp_never_registers_the_connection_for_writing() -> None:
    """Each registration is an epoll_ctl() to add and one to remove it again."""
    registered: list[str] = []

    def speak(transport: ITransport) -> None:
        assert type(transport) is Server
        transport.startWriting = lambda: registered.append("start")  # type: ignore[method-assign]
        write_now(transport, b"220 ready\r\n")
        write_now(transport, b"250 ok\r\n")

    assert await _what_a_client_reads(speak) == b"220 ready\r\n250 ok\r\n"
    assert registered == []


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_is_buffered_in_order() -> None:
    """A reply larger than the socket's send buffer: the rest waits for the
    reactor, and a later write goes behind it, never through it."""
    big = bytes(range(256)) * 16384  # 4 MiB, far more than a send buffer

    def speak(transport: ITransport) -> None:
        write_now(transport, big)
        assert transport.dataBuffer or transport._tempDataBuffer  # type: ignore[attr-defined]
        write_now(transport, b"END")

    assert await _what_a_client_reads(speak) == big + b"END"


@pytest_twisted.ensureDeferred
async def test_write_keeps_its_place_behind_buffered_bytes() -> None:
    def speak(transport: ITransport) -> None:
        transport.write(b"first ")
        write_now(transport, b"second\r\n")

    assert await _what_a_client_reads(speak) == b"first second\r\n"


@pytest_twisted.ensureDeferred
async def test_write_after_starttls_is_never_sent_in_plaintext() -> None:
    """Once TLS has begun on the connection, a write must pass through it:
    flushing must never put application bytes on the wire in the clear."""
    issued = CertificateAuthority("write-through test CA").issue("mx.test.example")
    options = server_tls_options(issued)

    def speak(transport: ITransport) -> None:
        transport.startTLS(options)  # type: ignore[attr-defined]
        write_now(transport, b"250 secret reply\r\n")

    received = await _what_a_client_reads(speak)
    assert b"secret" not in received
    await task.deferLater(reactor, 0)


@pytest_twisted.ensureDeferred
async def test_write_under_tls_is_encrypted_and_sent_before_the_reactor_turns() -> None:
    """Twisted's TLS layer holds small writes for a turn; write_now releases
    them at once, encrypted: the peer reads the plaintext only through TLS."""
    issued = CertificateAuthority("write-now TLS test CA").issue("mx.test.example")
    options = server_tls_options(issued)
    pending: list[int] = []

    class Greeter(Protocol):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.startTLS(options)  # type: ignore[attr-defined]

        def dataReceived(self, data: bytes) -> None:
            # TLS is up (the client's first application bytes arrived).
            transport = self.transport
            assert transport is not None
            write_now(transport, b"250 through TLS\r\n")
            pending.append(
                len(transport._tempDataBuffer)  # type: ignore[attr-defined]
                + len(transport.dataBuffer)  # type: ignore[attr-defined]
                + len(transport.protocol._aggregator._buffer)  # type: ignore[attr-defined]
            )

    factory = ServerFactory()
    factory.buildProtocol = lambda addr: Greeter()  # type: ignore[method-assign]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    address = port.getHost()
    assert isinstance(address, IPv4Address)

    def talk() -> bytes:
        context = ssl_module.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl_module.CERT_NONE
        raw = socket.create_connection(("127.0.0.1", address.port))
        with context.wrap_socket(raw, server_hostname="mx.test.example") as tls:
            tls.settimeout(5)
            tls.sendall(b"hello\r\n")
            return tls.recv(100)

    try:
        assert await deferToThread(talk) == b"250 through TLS\r\n"
    finally:
        await maybeDeferred(port.stopListening)
    assert pending == [0]
