"""A connection per message from txstarttls to a private Postfix (run by hand).

Issue 6 asks that a new connection per message not stall against a real
Postfix: Twisted's own sendmail() does, ~40 ms per connection on a delayed
ACK after STARTTLS. This sends N messages, each over a new verified STARTTLS
+ AUTH session, to the private Postfix of the interop tests (its harness is
reused from tests/support, so run it from the repository root, as root, with
Debian's postfix installed) and prints the rate and the time per message.

    python bench/bench_conn_postfix.py [N]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from tests.support.postfix import PostfixInstance
from tests.support.tls import write_tls_files
from txstarttls import Credentials, Envelope, TLSPolicy, Upstream
from txstarttls.pool import ConnectionPool, PoolLimits
from txstarttls.testing import CertificateAuthority


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    tls = write_tls_files(Path(tempfile.mkdtemp()), CertificateAuthority())
    with PostfixInstance(
        cert_file=tls.good.cert, key_file=tls.good.key, ca_file=tls.ca_file
    ) as postfix:

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
            pool = ConnectionPool(
                reactor,
                upstream,
                PoolLimits(max_connections=1, max_messages_per_connection=1),
            )
            envelope = Envelope("bench@client.test.example", (postfix.address("c"),))
            started = time.perf_counter()
            for _ in range(count):
                await pool.deliver(envelope, b"Subject: bench\r\n\r\nhello\r\n")
            elapsed = time.perf_counter() - started
            await pool.close()
            print(
                f"{count} messages, a connection each: {count / elapsed:.1f} msgs/s, "
                f"{elapsed / count * 1000:.1f} ms per message"
            )

        react(lambda reactor: ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
