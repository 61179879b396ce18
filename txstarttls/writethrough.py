"""Send a reply at once when nothing is queued ahead of it.

Twisted's ``transport.write`` only buffers: the bytes leave on the next
reactor turn, after an ``epoll_ctl`` to watch for writability, a wake-up, and
another ``epoll_ctl`` to stop watching. An SMTP server writes one short reply
per command, and the client waits for it, so that is three system calls and
a reactor turn per reply for nothing: a listener under smtp-source spent an
eighth of its time there. On a plain TCP connection with an empty buffer the
reply is handed to the socket directly; whatever the socket does not take
goes the usual way, in order, and so does everything on any other transport
or once STARTTLS has begun (then bytes must pass through TLS).
"""

from __future__ import annotations

from twisted.internet.interfaces import ITransport
from twisted.internet.tcp import Server


def write_through(transport: ITransport, data: bytes) -> None:
    if (
        type(transport) is Server
        and not transport.TLS  # after STARTTLS, writes must go through TLS
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.producer is None
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)
