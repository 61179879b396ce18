"""Let a short write leave at once instead of on the next reactor turn.

Twisted's ``transport.write`` only buffers: the bytes leave when the reactor
next polls and finds the socket writable, a turn of the loop later; under
TLS, Twisted also holds application writes back for a turn to gather them
into one record. An SMTP peer writes one reply, or one pipelined batch of
commands, and then waits for the other side, so those turns are pure
overhead on every exchange (a quarter of a listener's time under
smtp-source). On plain TCP with nothing buffered, :func:`write_now` hands
the bytes straight to the socket, so the connection is not even registered
for writing (two ``epoll_ctl`` calls per reply, an eighth of a listener's
time); whatever the socket does not take is buffered as usual. Otherwise it
writes and then sends what is buffered right away, with the calls the
reactor would make a turn later. Under TLS the bytes always pass through the
TLS layer's own write, so they are encrypted as usual; a connection with a
producer attached (a streamed body) keeps the reactor's pacing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import ITransport
from twisted.internet.tcp import Connection
from twisted.protocols.tls import TLSMemoryBIOProtocol


def write_now(transport: ITransport, data: bytes) -> None:
    if not (
        isinstance(transport, Connection)
        and transport.connected
        and not transport.disconnecting
        and transport.producer is None
    ):
        transport.write(data)
        return
    if transport.TLS:
        if not _encrypt_now(transport.protocol, data):
            return
    elif transport.dataBuffer or transport._tempDataBuffer:
        transport.write(data)  # type: ignore[no-untyped-call]
    else:
        _send_directly(transport, data)
        return
    # An error is left for the reactor: the connection is still registered
    # for writing, and its next doWrite reports the loss.
    transport.doWrite()  # type: ignore[no-untyped-call]


def _send_directly(transport: Connection, data: bytes) -> None:
    """Send on the socket now; buffer what it does not take, as write() would.

    Called only with nothing buffered, so nothing can overtake. A send error
    is not handled here: the bytes are buffered, and the reactor's next
    ``doWrite`` meets the error and reports the loss as usual.
    """
    sent = transport.writeSomeData(data)
    if not isinstance(sent, int) or sent < 0:
        sent = 0
    if sent < len(data):
        transport.write(data[sent:])  # type: ignore[no-untyped-call]


def _encrypt_now(tls: Any, data: bytes) -> bool:
    """Encrypt ``data`` now and pass the records down to the socket's buffer.

    Twisted (24.7 and later) gathers small writes in ``_aggregator`` and
    flushes them from a ``callLater(0)``. Anything already gathered is
    flushed first (order is kept), its call cancelled, and ``data`` then goes
    straight to the TLS layer's own write, with no buffer and no call to
    schedule and cancel. Without those attributes (another Twisted) ``data``
    takes the usual way and simply leaves a turn later: False.
    """
    aggregator = getattr(tls, "_aggregator", None)
    flush = getattr(aggregator, "flush", None)
    if flush is None or not isinstance(tls, TLSMemoryBIOProtocol):
        tls.write(data)
        return False
    scheduled = getattr(aggregator, "_scheduled", None)
    if isinstance(scheduled, DelayedCall) and scheduled.active():
        scheduled.cancel()
        aggregator._scheduled = None  # type: ignore[union-attr]
    flush()
    TLSMemoryBIOProtocol.write(tls, data)  # type: ignore[no-untyped-call]
    return True
