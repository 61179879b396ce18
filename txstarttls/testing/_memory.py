"""Connect a client and a server protocol in memory, with real TLS for STARTTLS.

``twisted.test.iosim`` fakes TLS: its ``startTLS`` exchanges a marker object
and never runs a handshake, so a certificate that should fail verification
passes. Here ``startTLS`` does what ``twisted.internet._newtls.startTLS``
does for a real TCP connection: it puts a ``TLSMemoryBIOProtocol`` between
the wire and the application protocol, so OpenSSL really handshakes,
verifies, encrypts and decrypts, and the bytes in flight are TLS records.

Nothing moves until the test says so: :meth:`MemoryConnection.pump` delivers
what each side wrote, both ways, until the connection is quiet. Each
direction is a :class:`Pipe` a test can inspect (``delivered`` is the wire as
an eavesdropper saw it), split (``split = 1`` delivers one byte per read) or
write to directly (``inject``), as a man in the middle would.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol as TypingProtocol
from typing import cast

from OpenSSL import SSL
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IConsumer,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    IProducer,
    IPullProducer,
    ISSLTransport,
    ITCPTransport,
    ITLSTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

__all__ = ["MemoryConnection", "MemoryTransport", "Pipe", "connect_in_memory"]

log = Logger()

DEFAULT_CLIENT_ADDRESS = IPv4Address("TCP", "127.0.0.1", 49152)
DEFAULT_SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 25)

_MAX_ROUNDS = 100_000

_Address = IPv4Address | IPv6Address


class _TLSLayer(TypingProtocol):
    """What we use of TLSMemoryBIOProtocol, typed (Twisted's is not)."""

    def makeConnection(self, transport: ITransport) -> None: ...
    def dataReceived(self, data: bytes) -> None: ...
    def connectionLost(self, reason: Failure) -> None: ...
    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: IProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def getHandle(self) -> SSL.Connection: ...
    def getPeerCertificate(self) -> object: ...


def _failure(exception: Exception) -> Failure:
    return Failure(exception)  # type: ignore[no-untyped-call]


class Pipe:
    """One direction of a connection: bytes written by one side for the other.

    ``split`` sets how pending bytes are cut into reads: ``None`` delivers
    everything pending as one ``dataReceived`` (one TCP segment), an integer
    ``n`` delivers reads of at most ``n`` bytes.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.split: int | None = None
        self._pending = bytearray()
        self._delivered = bytearray()
        self._reads = 0
        self._receiver: MemoryTransport | None = None

    def __repr__(self) -> str:
        return f"<Pipe {self.name}: {len(self._pending)} bytes pending>"

    @property
    def pending(self) -> bytes:
        """Bytes written but not yet read by the other side."""
        return bytes(self._pending)

    @property
    def delivered(self) -> bytes:
        """Every byte the other side has read so far: the wire, as seen on it."""
        return bytes(self._delivered)

    @property
    def reads(self) -> int:
        """How many ``dataReceived`` calls this direction has made."""
        return self._reads

    def inject(self, data: bytes) -> None:
        """Put raw bytes on the wire after what is pending, bypassing any TLS.

        This is what a man in the middle does: after STARTTLS the receiver's
        TLS layer sees these bytes as (broken) records.
        """
        self._pending += data

    def deliver(self) -> bool:
        """Hand pending bytes to the receiver; return whether any moved."""
        receiver = self._receiver
        if receiver is None or not receiver.reading or not self._pending:
            return False
        data = bytes(self._pending)
        self._pending.clear()
        size = len(data) if self.split is None else max(1, self.split)
        for start in range(0, len(data), size):
            if not receiver.reading:
                # The receiver closed mid-way; like a socket, it reads no more.
                break
            chunk = data[start : start + size]
            self._delivered += chunk
            self._reads += 1
            receiver.protocol.dataReceived(chunk)
        return True

    def _write(self, data: bytes) -> None:
        self._pending += data

    def _discard(self) -> None:
        self._pending.clear()


@implementer(ITransport, IConsumer)
class _Wire:
    """The transport under the TLS layer: writes go straight to the wire.

    Plays the part of ``twisted.internet._newtls._BypassTLS``.
    """

    def __init__(self, transport: MemoryTransport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        self._transport._wire_write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self._transport._wire_write(b"".join(data))

    def loseConnection(self) -> None:
        self._transport._wire_lose()

    def abortConnection(self) -> None:
        self._transport._wire_abort()

    def getPeer(self) -> _Address:
        return self._transport.getPeer()

    def getHost(self) -> _Address:
        return self._transport.getHost()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._transport._wire_register_producer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport._wire_unregister_producer()


@implementer(ITransport, ITCPTransport, ITLSTransport, IConsumer)
class MemoryTransport:
    """One side's transport; after ``startTLS`` it also provides ISSLTransport.

    ``protocol`` is what reads from the wire (the TLS layer once started);
    ``application`` stays the protocol the test connected.
    """

    def __init__(
        self,
        protocol: Protocol,
        *,
        is_client: bool,
        host: _Address,
        peer: _Address,
        outgoing: Pipe,
    ) -> None:
        self.protocol: Protocol = protocol
        self.application: Protocol = protocol
        self.is_client = is_client
        self.outgoing = outgoing
        self.disconnecting = False
        self.disconnected = False
        self._host = host
        self._peer = peer
        self._tls: _TLSLayer | None = None
        self._wire_closing = False
        self._wire_aborted = False
        self._producer: IProducer | None = None
        self._streaming = False

    def __repr__(self) -> str:
        side = "client" if self.is_client else "server"
        return f"<MemoryTransport {side} tls={self._tls is not None}>"

    # -- ITransport -----------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.disconnecting or self.disconnected:
            return
        if self._tls is not None:
            self._tls.write(data)
        else:
            self._wire_write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Close after pending bytes are sent; with TLS, send close_notify first."""
        if self.disconnecting or self.disconnected:
            return
        self.disconnecting = True
        if self._tls is not None:
            self._tls.loseConnection()
        else:
            self._wire_lose()

    def abortConnection(self) -> None:
        """Drop the connection now, discarding anything not yet delivered."""
        if self.disconnected:
            return
        self.disconnecting = True
        if self._tls is not None:
            self._tls.abortConnection()
        else:
            self._wire_abort()

    def getPeer(self) -> _Address:
        return self._peer

    def getHost(self) -> _Address:
        return self._host

    def logPrefix(self) -> str:
        return "memory-client" if self.is_client else "memory-server"

    # -- ITCPTransport (the parts a TCP-less test can honour) -------------------

    def loseWriteConnection(self) -> None:
        self.loseConnection()

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    # -- IConsumer --------------------------------------------------------------

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self._tls is not None:
            self._tls.registerProducer(producer, streaming)
        else:
            self._wire_register_producer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self._tls is not None:
            self._tls.unregisterProducer()
        else:
            self._wire_unregister_producer()

    # -- ITLSTransport / ISSLTransport ----------------------------------------

    def startTLS(
        self,
        contextFactory: IOpenSSLClientConnectionCreator
        | IOpenSSLServerConnectionCreator,
        normal: bool = True,
    ) -> None:
        """Put a real TLS layer under the application protocol, as _newtls does."""
        if self._tls is not None:
            raise RuntimeError("TLS is already active on this transport")
        client = self.is_client if normal else not self.is_client
        producer, streaming = self._producer, self._streaming
        if producer is not None:
            self._wire_unregister_producer()
        # A private clock: the factory must not reach for the global reactor.
        tls_factory = TLSMemoryBIOFactory(contextFactory, client, Factory(), Clock())
        tls = cast(
            _TLSLayer,
            TLSMemoryBIOProtocol(  # type: ignore[no-untyped-call]
                tls_factory, self.protocol, False
            ),
        )
        self.protocol = cast(Protocol, tls)
        self._tls = tls
        alsoProvides(self, ISSLTransport)
        tls.makeConnection(_Wire(self))
        if producer is not None:
            self.registerProducer(producer, streaming)

    @property
    def tls_active(self) -> bool:
        """Whether ``startTLS`` has been called on this side."""
        return self._tls is not None

    def getHandle(self) -> SSL.Connection | None:
        """The pyOpenSSL connection after ``startTLS`` (for version, cipher)."""
        if self._tls is None:
            return None
        return self._tls.getHandle()

    def getPeerCertificate(self) -> object:
        """The peer's X509 certificate, or None before TLS or without one."""
        if self._tls is None:
            return None
        return self._tls.getPeerCertificate()

    # -- the wire ---------------------------------------------------------------

    @property
    def reading(self) -> bool:
        """Whether bytes can still be delivered to this side."""
        return not (self.disconnected or self._wire_closing or self._wire_aborted)

    def _wire_write(self, data: bytes) -> None:
        if not (self.disconnected or self._wire_closing or self._wire_aborted):
            self.outgoing._write(data)

    def _wire_lose(self) -> None:
        self._wire_closing = True

    def _wire_abort(self) -> None:
        self._wire_aborted = True
        self.outgoing._discard()

    def _wire_register_producer(self, producer: IProducer, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError("a producer is already registered")
        self._producer = producer
        self._streaming = streaming

    def _wire_unregister_producer(self) -> None:
        self._producer = None
        self._streaming = False

    def _poll_producer(self) -> None:
        # A pull producer is asked for more whenever the test pumps, the way
        # a socket asks once its send buffer drains.
        if self._producer is not None and not self._streaming:
            cast(IPullProducer, self._producer).resumeProducing()

    def _closing_done(self) -> bool:
        if self.disconnected:
            return False
        return self._wire_aborted or (self._wire_closing and not self.outgoing.pending)

    def _connection_lost(self, reason: Failure) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        self.disconnecting = True
        self.outgoing._discard()
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        self.protocol.connectionLost(reason)


class MemoryConnection:
    """A client and a server protocol joined by two :class:`Pipe` objects."""

    def __init__(
        self,
        client: Protocol,
        server: Protocol,
        client_transport: MemoryTransport,
        server_transport: MemoryTransport,
        client_to_server: Pipe,
        server_to_client: Pipe,
    ) -> None:
        self.client = client
        self.server = server
        self.client_transport = client_transport
        self.server_transport = server_transport
        self.client_to_server = client_to_server
        self.server_to_client = server_to_client

    @property
    def closed(self) -> bool:
        """Whether both sides have seen ``connectionLost``."""
        return self.client_transport.disconnected and self.server_transport.disconnected

    def pump_once(self) -> bool:
        """Deliver one round of pending bytes both ways; return whether anything
        happened (bytes moved or the connection closed)."""
        moved = False
        for transport in (self.client_transport, self.server_transport):
            transport._poll_producer()
        for pipe in (self.client_to_server, self.server_to_client):
            moved = pipe.deliver() or moved
        for closer, other in (
            (self.client_transport, self.server_transport),
            (self.server_transport, self.client_transport),
        ):
            if closer._closing_done():
                self._close(closer, other)
                moved = True
        return moved

    def pump(self, max_rounds: int = _MAX_ROUNDS) -> None:
        """Deliver bytes both ways until neither side has anything to say."""
        for _ in range(max_rounds):
            if not self.pump_once():
                return
        raise RuntimeError(f"the connection was still busy after {max_rounds} rounds")

    def _close(self, closer: MemoryTransport, other: MemoryTransport) -> None:
        if closer._wire_aborted:
            closer_reason = _failure(error.ConnectionAborted())
            other_reason = _failure(error.ConnectionLost())
        else:
            closer_reason = _failure(error.ConnectionDone())
            other_reason = _failure(error.ConnectionDone())
        log.debug(
            "in-memory connection closed by {side}",
            side="client" if closer.is_client else "server",
        )
        closer._connection_lost(closer_reason)
        other._connection_lost(other_reason)


def connect_in_memory(
    client_protocol: Protocol,
    server_protocol: Protocol,
    *,
    client_address: IPv4Address = DEFAULT_CLIENT_ADDRESS,
    server_address: IPv4Address = DEFAULT_SERVER_ADDRESS,
) -> MemoryConnection:
    """Connect the two protocols; nothing is delivered until you pump.

    The server's ``connectionMade`` runs first, as with a real listener, so a
    greeting is pending for the client after the first :meth:`pump`.
    """
    client_to_server = Pipe("client->server")
    server_to_client = Pipe("server->client")
    client_transport = MemoryTransport(
        client_protocol,
        is_client=True,
        host=client_address,
        peer=server_address,
        outgoing=client_to_server,
    )
    server_transport = MemoryTransport(
        server_protocol,
        is_client=False,
        host=server_address,
        peer=client_address,
        outgoing=server_to_client,
    )
    client_to_server._receiver = server_transport
    server_to_client._receiver = client_transport
    server_protocol.makeConnection(server_transport)  # type: ignore[no-untyped-call]
    client_protocol.makeConnection(client_transport)  # type: ignore[no-untyped-call]
    return MemoryConnection(
        client_protocol,
        server_protocol,
        client_transport,
        server_transport,
        client_to_server,
        server_to_client,
    )
