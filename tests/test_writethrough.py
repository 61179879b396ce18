"""write_through: replies leave at once on plain TCP, never around TLS."""

from __future__ import annotations

import socket
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
from txstarttls.writethrough import write_through


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
async def test_reply_on_plain_tcp_leaves_before_the_reactor_turns() -> None:
    buffered: list[int] = []

    def speak(transport: ITransport) -> None:
        assert type(transport) is Server
        write_through(transport, b"220 ready\r\n")
        buffered.append(len(transport._tempDataBuffer) + len(transport.dataBuffer))

    assert await _what_a_client_reads(speak) == b"220 ready\r\n"
    assert buffered == [0]


@pytest_twisted.ensureDeferred
async def test_reply_keeps_its_place_behind_buffered_bytes() -> None:
    def speak(transport: ITransport) -> None:
        transport.write(b"first ")
        write_through(transport, b"second\r\n")

    assert await _what_a_client_reads(speak) == b"first second\r\n"


@pytest_twisted.ensureDeferred
async def test_reply_after_starttls_is_never_sent_in_plaintext() -> None:
    """Once TLS has begun on the connection, a reply must pass through it:
    handing it to the socket would put it on the wire in the clear."""
    issued = CertificateAuthority("write-through test CA").issue("mx.test.example")
    options = server_tls_options(issued)

    def speak(transport: ITransport) -> None:
        transport.startTLS(options)  # type: ignore[attr-defined]
        write_through(transport, b"250 secret reply\r\n")

    received = await _what_a_client_reads(speak)
    assert b"secret" not in received
    await task.deferLater(reactor, 0)
