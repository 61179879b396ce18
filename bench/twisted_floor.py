"""The acceptance anchor: the least a Twisted SMTP listener can cost here.

``python bench/twisted_floor.py PORT`` answers smtp-source's dialogue on
127.0.0.1:PORT with canned replies: no argument parsing or checks, no
``Received:`` header, no queue, no log. Replies leave through
:func:`txstarttls.write_now.write_now`, as the relay's do. On SIGTERM it
prints how many messages it acknowledged and exits (Twisted's own SIGTERM
handler stops the reactor).

``bench_acceptance.py --anchor`` runs it in the same rounds as the relay and
Postfix, so the relay's rate and CPU per message can be read against what
Twisted and the kernel alone cost for the same connections on the same
machine at the same time. It is not a mail server: it keeps nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from txstarttls.write_now import write_now

EHLO_REPLY = b"250-floor.bench.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


class FloorSession(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1000
    acknowledged = 0

    def connectionMade(self) -> None:
        self.in_data = False
        self.send(b"220 floor.bench.example ESMTP\r\n")

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        write_now(self.transport, data)

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            if line == b".":
                self.in_data = False
                FloorSession.acknowledged += 1
                self.send(b"250 2.0.0 Ok: not kept\r\n")
            return
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            self.send(EHLO_REPLY)
        elif verb == b"DATA":
            self.in_data = True
            self.send(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"QUIT":
            self.send(b"221 2.0.0 Bye\r\n")
            assert self.transport is not None
            self.transport.loseConnection()
        else:
            self.send(b"250 2.0.0 Ok\r\n")


def main() -> None:
    port = int(sys.argv[1])
    description = f"tcp:{port}:interface=127.0.0.1"
    endpoint = serverFromString(reactor, description)  # type: ignore[no-untyped-call]
    endpoint.listen(Factory.forProtocol(FloorSession))
    reactor.run()
    print(f"acknowledged {FloorSession.acknowledged}", flush=True)


if __name__ == "__main__":
    main()
