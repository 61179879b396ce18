"""A connection per message from txstarttls to a private Postfix (run by hand).

Issue 6 asks that a new connection per message not stall against a real
Postfix: Twisted's own sendmail() does, ~40 ms per connection on a delayed
ACK after STARTTLS. This sends N messages, each over a new verified STARTTLS
+ AUTH session, to the private Postfix of the interop tests (its harness is
reused from tests/support, so run it from the repository root, as root, with
Debian's postfix installed) and prints the rate and the time per message.

Beside it, against the same Postfix and interleaved round by round, two
references: the handshake anchor (Python's ``ssl`` connects, reads the
greeting, sends EHLO and STARTTLS and completes a verified handshake, then
closes: issue 6 asks that a connection per message run close to that rate),
and Python's smtplib doing exactly our work (a connection per message:
STARTTLS verified, AUTH, the message, QUIT), which tells how much of the gap
to the anchor is the server's work for a message rather than the client's.

    python bench/bench_conn_postfix.py [N] [ROUNDS]
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_client import read_reply  # this script's own directory
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from tests.support.postfix import PostfixInstance
from tests.support.tls import write_tls_files
from txstarttls import Credentials, Envelope, TLSPolicy, Upstream
from txstarttls.pool import ConnectionPool, PoolLimits
from txstarttls.testing import CertificateAuthority


def handshake_anchor(postfix: PostfixInstance, count: int) -> float:
    """Verified STARTTLS handshakes per second against ``postfix``."""
    context = ssl.create_default_context(cafile=str(postfix.ca_file))
    started = time.perf_counter()
    for _ in range(count):
        with socket.create_connection((postfix.host, postfix.port)) as sock:
            read_reply(sock)
            sock.sendall(b"EHLO client.test.example\r\n")
            read_reply(sock)
            sock.sendall(b"STARTTLS\r\n")
            if not read_reply(sock).startswith(b"220"):
                raise RuntimeError("STARTTLS refused")
            with context.wrap_socket(sock, server_hostname=postfix.tls_hostname):
                pass
    return count / (time.perf_counter() - started)


def smtplib_per_message(postfix: PostfixInstance, count: int, recipient: str) -> float:
    """Messages per second from smtplib, a new verified STARTTLS + AUTH
    connection for each."""
    context = ssl.create_default_context(cafile=str(postfix.ca_file))
    started = time.perf_counter()
    for _ in range(count):
        with smtplib.SMTP(
            postfix.host, postfix.port, local_hostname="client.test.example"
        ) as client:
            # smtplib checks the certificate against the name it connected to.
            client._host = postfix.tls_hostname  # type: ignore[attr-defined]
            client.starttls(context=context)
            client.login(postfix.username, postfix.password)
            client.sendmail(
                "bench@client.test.example",
                [recipient],
                b"Subject: bench\r\n\r\nhello\r\n",
            )
    return count / (time.perf_counter() - started)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    tls = write_tls_files(Path(tempfile.mkdtemp()), CertificateAuthority())
    with PostfixInstance(
        cert_file=tls.good.cert, key_file=tls.good.key, ca_file=tls.ca_file
    ) as postfix:
        ours: list[float] = []
        anchors: list[float] = []
        smtplibs: list[float] = []

        async def run(reactor: Any) -> None:
            upstream = Upstream(
                host=postfix.host,
                port=postfix.port,
                tls=TLSPolicy(
                    hostname=postfix.tls_hostname, ca_file=str(postfix.ca_file)
                ),
                credentials=Credentials(postfix.username, password=postfix.password),
                ehlo_name="client.test.example",
            )
            recipient = postfix.address("c")
            envelope = Envelope("bench@client.test.example", (recipient,))
            for number in range(1, rounds + 1):
                pool = ConnectionPool(
                    reactor,
                    upstream,
                    PoolLimits(max_connections=1, max_messages_per_connection=1),
                )
                started = time.perf_counter()
                for _ in range(count):
                    await pool.deliver(envelope, b"Subject: bench\r\n\r\nhello\r\n")
                elapsed = time.perf_counter() - started
                await pool.close()
                ours.append(count / elapsed)
                # The references block the reactor, which has nothing else to do.
                anchors.append(handshake_anchor(postfix, count))
                smtplibs.append(smtplib_per_message(postfix, count, recipient))
                print(
                    f"round {number}: txstarttls {ours[-1]:.1f} msgs/s "
                    f"({elapsed / count * 1000:.1f} ms per message, a connection "
                    f"each); smtplib, the same work, {smtplibs[-1]:.1f} msgs/s; "
                    f"handshake anchor {anchors[-1]:.1f}/s"
                )
            to_anchor = [o / a for o, a in zip(ours, anchors, strict=True)]
            to_smtplib = [o / s for o, s in zip(ours, smtplibs, strict=True)]
            smtplib_to_anchor = [s / a for s, a in zip(smtplibs, anchors, strict=True)]
            print(
                f"median of {rounds} rounds: txstarttls / handshake anchor "
                f"{statistics.median(to_anchor):.2f}x, txstarttls / smtplib "
                f"{statistics.median(to_smtplib):.2f}x, smtplib / handshake anchor "
                f"{statistics.median(smtplib_to_anchor):.2f}x"
            )

        react(lambda reactor: ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
