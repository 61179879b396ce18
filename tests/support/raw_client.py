"""A client protocol for tests that write raw bytes at a server."""

from __future__ import annotations

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IHandshakeListener)
class RawClient(Protocol):
    """Collects whatever the server sends; the test decides what to write."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.handshakes = 0
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def take(self) -> bytes:
        """What arrived since the last take."""
        data = bytes(self.received)
        self.received.clear()
        return data
