"""Let a short write leave at once instead of on the next reactor turn.

Twisted's ``transport.write`` only buffers: the bytes leave when the reactor
next polls and finds the socket writable, a turn of the loop later; under
TLS, Twisted also holds application writes back for a turn to gather them
into one record. An SMTP peer writes one reply, or one pipelined batch of
commands, and then waits for the other side, so those turns are pure
overhead on every exchange (a quarter of a listener's time under
smtp-source). After writing, :func:`write_now` sends what is buffered right
away, with the calls the reactor would make a turn later. The bytes always
go through ``transport.write`` first, so under TLS they are encrypted as
usual; a connection with a producer attached (a streamed body) keeps the
reactor's pacing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import ITransport
from twisted.internet.tcp import Connection


def write_now(transport: ITransport, data: bytes) -> None:
    transport.write(data)
    if not (
        isinstance(transport, Connection)
        and transport.connected
        and not transport.disconnecting
        and transport.producer is None
    ):
        return
    if transport.TLS and not _release_tls_records(transport.protocol):
        return
    # An error is left for the reactor: the connection is still registered
    # for writing, and its next doWrite reports the loss.
    transport.doWrite()  # type: ignore[no-untyped-call]


def _release_tls_records(tls: Any) -> bool:
    """Encrypt and pass down what Twisted's TLS layer holds for the next turn.

    Twisted (24.7 and later) gathers small writes in ``_aggregator`` and
    flushes them from a ``callLater(0)``; that call is cancelled (it would
    find nothing) and the buffer flushed now. Without those attributes
    (another Twisted) nothing is flushed early and nothing is lost: the
    bytes simply leave a turn later.
    """
    aggregator = getattr(tls, "_aggregator", None)
    flush = getattr(aggregator, "flush", None)
    if flush is None:
        return False
    scheduled = getattr(aggregator, "_scheduled", None)
    if isinstance(scheduled, DelayedCall) and scheduled.active():
        scheduled.cancel()
        aggregator._scheduled = None  # type: ignore[union-attr]
    flush()
    return True
