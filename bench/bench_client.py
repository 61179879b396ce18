"""Client throughput: txstarttls against aiosmtplib, smtplib and Twisted's client.

Run by hand, never as a test::

    python bench/bench_client.py [-n 2000] [--conn-n N] [--big-mb 200]
                                 [--rounds 3] [--only NAME ...] [--json PATH]
                                 [--skip-verify-check]

It needs a C compiler, the OpenSSL headers (``libssl-dev``) and aiosmtplib.

Every sender talks to the same local sink (``bench/sink/sink.c``, built here
with ``cc`` into a temporary directory) over loopback, verifies the sink's
certificate against a throwaway CA for ``mx.test.example`` and authenticates
with AUTH PLAIN; the sink refuses MAIL before AUTH and counts the messages it
accepts, and the driver checks that each sender delivered exactly what it was
asked to. Each sender runs in a subprocess of its own, so its CPU time and
peak RSS are its own:

- ``txstarttls-1``: ``ConnectionPool`` with one connection, PIPELINING,
  ``deliver()`` called sequentially;
- ``txstarttls-8``: the same pool with 8 connections and 8 deliveries in flight;
- ``aiosmtplib-1`` / ``aiosmtplib-8``: ``aiosmtplib.SMTP``, one client per
  connection, STARTTLS with a verifying SSLContext, ``login()``;
- ``smtplib-1``: ``smtplib.SMTP``, ``starttls()``, ``login()``, ``sendmail()``;
- ``twisted-sendmail``: ``twisted.mail.smtp.sendmail()``, one connection per
  message as its API works, with requireTransportSecurity and
  requireAuthentication; it verifies against the platform trust store, so the
  child points ``SSL_CERT_FILE`` at the test CA;
- ``txstarttls-conn``: the pool with ``max_messages_per_connection=1``, so
  every message pays for a new connection, STARTTLS and AUTH;
- ``smtplib-conn``: smtplib doing exactly that work (connect, EHLO,
  STARTTLS, EHLO, AUTH, the message, QUIT) for every message: the reference
  for what a new connection costs a client that does the same exchange;
- ``tls-anchor``: the floor for a new connection: Python's ``ssl`` connects,
  reads the greeting, sends STARTTLS and completes a verified handshake, then
  closes, in a loop;
- ``txstarttls-big``: one large message (``--big-mb``) given as a path and
  streamed; its MB/s and the sender's peak RSS.

Before the timed runs each sender is pointed once at a CA that did not issue
the sink's certificate, and must fail: that proves it verifies.

The machine is shared and noisy: the ratios between senders of one round
matter, not the bare rates. Client CPU is the sender's user+sys time over the
sending phase (interpreter start-up and imports excluded), divided by the
messages; sink CPU is the sink's own getrusage() over the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SINK_SOURCE = HERE / "sink" / "sink.c"

SERVER_NAME = "mx.test.example"
CLIENT_NAME = "client.test.example"
SENDER = "bench@client.test.example"
RECIPIENT = "sink@mx.test.example"
USER = "bench"
PASSWORD = "bench-password-1"  # the sink's fixed test credential, loopback only
CHILD_TIMEOUT = 300.0
BIG_LINE = b"y" * 76 + b"\r\n"


def make_message(size: int = 2048) -> bytes:
    """A plain-text message of exactly ``size`` octets with CRLF line ends."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\n"
        "Subject: benchmark message\r\n"
        "Date: Sun, 29 Nov 2026 12:00:00 +0000\r\n"
        "Message-ID: <bench@client.test.example>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 0123456789"
    body = b""
    while len(head) + len(body) < size:
        body += line + b"\r\n"
    message = head + body
    return message[: size - 2] + b"\r\n"


# --------------------------------------------------------------------------
# Children: one sender each. They print one JSON line and exit 0, or print
# {"error": ...} and exit 1.


@dataclass
class ChildArgs:
    mode: str
    port: int
    ca: str
    count: int
    concurrency: int
    message_path: str | None


class Meter:
    """Wall time and this process's CPU over the sending phase."""

    def __init__(self) -> None:
        self.start_wall = 0.0
        self.start_cpu = resource.getrusage(resource.RUSAGE_SELF)
        self.elapsed = 0.0
        self.cpu_user = 0.0
        self.cpu_sys = 0.0

    def start(self) -> None:
        self.start_cpu = resource.getrusage(resource.RUSAGE_SELF)
        self.start_wall = time.perf_counter()

    def stop(self) -> None:
        self.elapsed = time.perf_counter() - self.start_wall
        end = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_user = end.ru_utime - self.start_cpu.ru_utime
        self.cpu_sys = end.ru_stime - self.start_cpu.ru_stime

    def result(self, messages: int, **extra: Any) -> dict[str, Any]:
        return {
            "messages": messages,
            "elapsed": self.elapsed,
            "cpu_user": self.cpu_user,
            "cpu_sys": self.cpu_sys,
            "peak_rss_kb": peak_rss_kb(),
            **extra,
        }


def peak_rss_kb() -> int:
    """This process's peak RSS since exec, from /proc (VmHWM).

    Not ru_maxrss: on Linux a child's ru_maxrss starts at the RSS of the
    parent it was forked from, which would credit the driver's memory to
    every sender.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def verifying_context(ca: str) -> ssl.SSLContext:
    """Python's defaults: CERT_REQUIRED, host name checked, TLS 1.2 minimum."""
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def run_on_reactor(main: Callable[[Any], Any]) -> Any:
    """Run ``async def main(reactor)`` on the global reactor and return its value."""
    from twisted.internet import defer, reactor
    from twisted.logger import globalLogBeginner
    from twisted.python.failure import Failure

    # Events are still emitted (and their cost counted); they are dropped
    # instead of piling up in the 64K-event start-up buffer.
    globalLogBeginner.beginLoggingTo(
        [lambda event: None], discardBuffer=True, redirectStandardIO=False
    )
    outcome: list[Any] = []

    def start() -> None:
        d = defer.ensureDeferred(main(reactor))

        def done(value: Any) -> None:
            outcome.append(value)
            reactor.stop()  # type: ignore[attr-defined]

        d.addBoth(done)

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    value = outcome[0]
    if isinstance(value, Failure):
        value.raiseException()
    return value


def child_txstarttls(args: ChildArgs) -> dict[str, Any]:
    from txstarttls import Credentials, Envelope, TLSPolicy, Upstream
    from txstarttls.message import prepare
    from txstarttls.pool import ConnectionPool, PoolLimits

    upstream = Upstream(
        host="127.0.0.1",
        port=args.port,
        tls=TLSPolicy(hostname=SERVER_NAME, ca_file=args.ca),
        credentials=Credentials(USER, password=PASSWORD),
        ehlo_name=CLIENT_NAME,
    )
    envelope = Envelope(SENDER, (RECIPIENT,))
    per_connection = 1 if args.mode == "txstarttls-conn" else max(args.count, 1)
    limits = PoolLimits(
        max_connections=args.concurrency,
        max_messages_per_connection=per_connection,
    )
    meter = Meter()
    extra: dict[str, Any] = {}
    # Bytes are prepared (encoded) by deliver() for every message, as a
    # program handing over fresh messages would have them.
    payload: list[Any] = [make_message()]

    async def main(reactor: Any) -> dict[str, Any]:
        pool = ConnectionPool(reactor, upstream, limits)
        remaining = args.count
        tls_seen: list[str] = []

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                result = await pool.deliver(envelope, payload[0])
                if len(result.delivered) != 1:
                    raise RuntimeError(f"not delivered: {result}")
                if not tls_seen and result.tls is not None:
                    tls_seen.append(f"{result.tls.version} {result.tls.cipher}")

        if args.mode == "txstarttls-big":
            assert args.message_path is not None
            meter.start()
            prepared = prepare(args.message_path)
            extra["prepare_seconds"] = time.perf_counter() - meter.start_wall
            extra["size"] = prepared.size
            payload[0] = prepared
        else:
            meter.start()
        try:
            await _gather([worker() for _ in range(args.concurrency)])
        finally:
            await pool.close()
        meter.stop()
        return meter.result(args.count, tls=tls_seen[0] if tls_seen else "?", **extra)

    return run_on_reactor(main)  # type: ignore[no-any-return]


async def _gather(coroutines: list[Any]) -> None:
    from twisted.internet import defer

    await defer.gatherResults(
        [defer.ensureDeferred(c) for c in coroutines], consumeErrors=True
    )


def child_aiosmtplib(args: ChildArgs) -> dict[str, Any]:
    import aiosmtplib

    message = make_message()
    context = verifying_context(args.ca)
    meter = Meter()

    async def main() -> dict[str, Any]:
        remaining = args.count
        tls_seen: list[str] = []

        async def worker() -> None:
            nonlocal remaining
            client = aiosmtplib.SMTP(
                hostname="127.0.0.1",
                port=args.port,
                local_hostname=CLIENT_NAME,
                start_tls=False,
                tls_context=context,
            )
            await client.connect()
            await client.starttls(server_hostname=SERVER_NAME)
            await client.login(USER, PASSWORD)
            if not tls_seen:
                ssl_object = client.get_transport_info("ssl_object")
                tls_seen.append(f"{ssl_object.version()} {ssl_object.cipher()[0]}")
            try:
                while remaining > 0:
                    remaining -= 1
                    refused, _ = await client.sendmail(SENDER, [RECIPIENT], message)
                    if refused:
                        raise RuntimeError(f"refused: {refused}")
            finally:
                await client.quit()

        meter.start()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        meter.stop()
        return meter.result(args.count, tls=tls_seen[0] if tls_seen else "?")

    return asyncio.run(main())


def loopback_smtp(port: int) -> Any:
    """smtplib.SMTP that verifies SERVER_NAME while connecting to 127.0.0.1."""
    import smtplib

    class LoopbackSMTP(smtplib.SMTP):
        def _get_socket(self, host: str, port: int, timeout: float) -> Any:
            return socket.create_connection(("127.0.0.1", port), timeout)

    return LoopbackSMTP(SERVER_NAME, port, local_hostname=CLIENT_NAME)


def child_smtplib(args: ChildArgs) -> dict[str, Any]:
    message = make_message()
    context = verifying_context(args.ca)
    meter = Meter()
    meter.start()
    client = loopback_smtp(args.port)
    client.starttls(context=context)
    client.login(USER, PASSWORD)
    tls = f"{client.sock.version()} {client.sock.cipher()[0]}"
    for _ in range(args.count):
        refused = client.sendmail(SENDER, [RECIPIENT], message)
        if refused:
            raise RuntimeError(f"refused: {refused}")
    client.quit()
    meter.stop()
    return meter.result(args.count, tls=tls)


def child_smtplib_per_message(args: ChildArgs) -> dict[str, Any]:
    message = make_message()
    context = verifying_context(args.ca)
    meter = Meter()
    tls = "?"
    meter.start()
    for _ in range(args.count):
        with loopback_smtp(args.port) as client:
            client.starttls(context=context)
            client.login(USER, PASSWORD)
            tls = f"{client.sock.version()} {client.sock.cipher()[0]}"
            if client.sendmail(SENDER, [RECIPIENT], message):
                raise RuntimeError("refused")
    meter.stop()
    return meter.result(args.count, tls=tls)


def child_twisted_sendmail(args: ChildArgs) -> dict[str, Any]:
    from twisted.mail.smtp import sendmail

    message = make_message()
    meter = Meter()

    class Loopback:
        """The reactor, but SERVER_NAME connects to 127.0.0.1."""

        def __init__(self, reactor: Any) -> None:
            self._reactor = reactor

        def connectTCP(self, host: str, port: int, factory: Any, *a: Any) -> Any:
            if host != SERVER_NAME:
                raise ValueError(f"unexpected host {host}")
            return self._reactor.connectTCP("127.0.0.1", port, factory, *a)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._reactor, name)

    async def main(reactor: Any) -> dict[str, Any]:
        loopback = Loopback(reactor)
        meter.start()
        for _ in range(args.count):
            accepted, _ = await sendmail(
                SERVER_NAME,
                SENDER,
                [RECIPIENT],
                message,
                senderDomainName=CLIENT_NAME,
                port=args.port,
                reactor=loopback,
                username=USER,
                password=PASSWORD,
                requireAuthentication=True,
                requireTransportSecurity=True,
            )
            if accepted != 1:
                raise RuntimeError("not delivered")
        meter.stop()
        return meter.result(args.count, tls="(not reported by its API)")

    return run_on_reactor(main)  # type: ignore[no-any-return]


def read_reply(sock: socket.socket) -> bytes:
    """One whole SMTP reply from a blocking socket (shared with
    bench_conn_postfix.py)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
        # The last line of a reply has a space (or nothing) after the code.
        lines = data.split(b"\r\n")
        if len(lines) > 1 and lines[-2][3:4] != b"-":
            return data


def child_twisted_floor(args: ChildArgs) -> dict[str, Any]:
    """The least a Twisted client over TLSMemoryBIOProtocol can do per message.

    The same exchange as txstarttls-1 (EHLO, STARTTLS with a verified
    handshake, EHLO, AUTH PLAIN, then MAIL+RCPT+DATA in one write and the
    body in another), as a bare state machine: no validation, no timers, no
    Deferreds, the body encoded once. Not a usable client: a floor.
    """
    import base64

    from twisted.internet import defer
    from twisted.internet.protocol import ClientFactory
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    from twisted.protocols.basic import LineReceiver

    from txstarttls.data import encode_body

    body = encode_body(make_message())
    batch = (
        f"MAIL FROM:<{SENDER}> SIZE={len(body)}\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n"
    ).encode("ascii")
    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    trust = Certificate.loadPEM(Path(args.ca).read_bytes())
    creator = optionsForClientTLS(SERVER_NAME, trustRoot=trust)
    meter = Meter()
    done: defer.Deferred[None] = defer.Deferred()

    class Floor(LineReceiver):
        def __init__(self) -> None:
            self.step = "greeting"
            self.left = args.count
            self.pending = 0

        def lineReceived(self, line: bytes) -> None:
            if line[3:4] == b"-":
                return
            code = line[:3]
            step = self.step
            if step == "greeting":
                self.sendLine(f"EHLO {CLIENT_NAME}".encode())
                self.step = "ehlo1"
            elif step == "ehlo1":
                self.sendLine(b"STARTTLS")
                self.step = "starttls"
            elif step == "starttls":
                if code != b"220":
                    raise RuntimeError("STARTTLS refused")
                self.transport.startTLS(creator)  # type: ignore[union-attr]
                # Held by the TLS layer until the verified handshake is done.
                self.sendLine(f"EHLO {CLIENT_NAME}".encode())
                self.step = "ehlo2"
            elif step == "ehlo2":
                self.sendLine(f"AUTH PLAIN {plain}".encode())
                self.step = "auth"
            elif step == "auth":
                if code != b"235":
                    raise RuntimeError("AUTH refused")
                meter.start()
                self.next_message()
            elif step == "envelope":
                self.pending -= 1
                if self.pending == 0:
                    if code != b"354":
                        raise RuntimeError(f"refused: {line!r}")
                    self.transport.write(body)  # type: ignore[union-attr]
                    self.step = "body"
            elif step == "body":
                if code != b"250":
                    raise RuntimeError(f"refused: {line!r}")
                self.left -= 1
                self.next_message()
            elif step == "quit":
                self.transport.loseConnection()  # type: ignore[union-attr]
                self.step = "closed"
                meter.stop()
                done.callback(None)

        def next_message(self) -> None:
            if self.left == 0:
                self.sendLine(b"QUIT")
                self.step = "quit"
                return
            self.transport.write(batch)  # type: ignore[union-attr]
            self.pending = 3
            self.step = "envelope"

        def connectionLost(self, reason: Any = None) -> None:
            if not done.called:
                done.errback(reason)

    async def main(reactor: Any) -> dict[str, Any]:
        factory = ClientFactory.forProtocol(Floor)
        reactor.connectTCP("127.0.0.1", args.port, factory)
        await done
        return meter.result(args.count, tls="TLS via optionsForClientTLS")

    return run_on_reactor(main)  # type: ignore[no-any-return]


def child_tls_anchor(args: ChildArgs) -> dict[str, Any]:
    context = verifying_context(args.ca)
    meter = Meter()
    tls = "?"
    meter.start()
    for _ in range(args.count):
        with socket.create_connection(("127.0.0.1", args.port)) as sock:
            if not read_reply(sock).startswith(b"220 "):
                raise RuntimeError("bad greeting")
            sock.sendall(b"STARTTLS\r\n")
            if not read_reply(sock).startswith(b"220 "):
                raise RuntimeError("STARTTLS refused")
            with context.wrap_socket(sock, server_hostname=SERVER_NAME) as tls_sock:
                tls = f"{tls_sock.version()} {tls_sock.cipher()[0]}"
    meter.stop()
    return meter.result(args.count, tls=tls)


CHILDREN: dict[str, Callable[[ChildArgs], dict[str, Any]]] = {
    "txstarttls-1": child_txstarttls,
    "txstarttls-8": child_txstarttls,
    "aiosmtplib-1": child_aiosmtplib,
    "aiosmtplib-8": child_aiosmtplib,
    "smtplib-1": child_smtplib,
    "twisted-sendmail": child_twisted_sendmail,
    "txstarttls-conn": child_txstarttls,
    "smtplib-conn": child_smtplib_per_message,
    "tls-anchor": child_tls_anchor,
    "twisted-floor": child_twisted_floor,
    "txstarttls-big": child_txstarttls,
}


def child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, choices=sorted(CHILDREN))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--message-path")
    ns = parser.parse_args(argv)
    args = ChildArgs(
        ns.child, ns.port, ns.ca, ns.count, ns.concurrency, ns.message_path
    )
    try:
        result = CHILDREN[args.mode](args)
    except BaseException as error:
        print(json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------
# The driver.


@dataclass(frozen=True)
class Spec:
    name: str
    label: str
    concurrency: int = 1
    per_connection: bool = False


SPECS = (
    Spec("txstarttls-1", "txstarttls, 1 connection (pipelined)"),
    Spec("aiosmtplib-1", "aiosmtplib, 1 connection"),
    Spec("smtplib-1", "smtplib, 1 connection"),
    Spec("twisted-floor", "floor: bare Twisted TLS client, same exchange"),
    Spec("txstarttls-8", "txstarttls, pool of 8 connections", concurrency=8),
    Spec("aiosmtplib-8", "aiosmtplib, 8 connections", concurrency=8),
    Spec(
        "twisted-sendmail",
        "twisted.mail.smtp.sendmail(), connection per message",
        per_connection=True,
    ),
    Spec("txstarttls-conn", "txstarttls, connection per message", per_connection=True),
    Spec("smtplib-conn", "smtplib, connection per message", per_connection=True),
    Spec("tls-anchor", "anchor: ssl connect+STARTTLS+handshake", per_connection=True),
)
BIG = Spec("txstarttls-big", "txstarttls, one large message from a path")
ALL_NAMES = [s.name for s in SPECS] + [BIG.name]


@dataclass
class Result:
    spec: Spec
    messages: int
    elapsed: float
    client_cpu: float
    sink_cpu: float
    peak_rss_kb: int
    total_cpu: float
    tls: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.messages / self.elapsed

    @property
    def client_us(self) -> float:
        return self.client_cpu / self.messages * 1e6

    @property
    def sink_us(self) -> float:
        return self.sink_cpu / self.messages * 1e6

    @property
    def sink_busy(self) -> float:
        return self.sink_cpu / self.elapsed

    @property
    def peak_mb(self) -> float:
        return self.peak_rss_kb / 1024


class BenchError(Exception):
    pass


class Sink:
    """The C sink as a child process, with its counters read by signal."""

    def __init__(self, binary: Path, workdir: Path, cert: Path, key: Path) -> None:
        self.stats_path = workdir / "sink.stats"
        self.log_path = workdir / "sink.out"
        self._seq = 0
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    str(binary),
                    "0",
                    str(cert),
                    str(key),
                    USER,
                    PASSWORD,
                    str(self.stats_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.port = self._wait_for_port()

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for line in self.log_path.read_text().splitlines():
                if line.startswith("port "):
                    return int(line.split()[1])
            if self.process.poll() is not None:
                raise BenchError(f"sink exited: {self.log_path.read_text()}")
            time.sleep(0.01)
        raise BenchError("sink did not report its port")

    def stats(self) -> dict[str, float]:
        if self.process.poll() is not None:
            raise BenchError(f"sink died: {self.log_path.read_text()[-500:]}")
        self._seq += 1
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                fields = dict(
                    item.split("=", 1) for item in self.stats_path.read_text().split()
                )
                if int(fields["seq"]) >= self._seq:
                    return {key: float(value) for key, value in fields.items()}
            time.sleep(0.002)
        raise BenchError("sink did not report its counters")

    def quiet_stats(self) -> dict[str, float]:
        """Counters once every connection has been closed (or after 5 s)."""
        deadline = time.monotonic() + 5
        while True:
            stats = self.stats()
            if stats["open"] == 0 or time.monotonic() > deadline:
                return stats
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_child(
    spec: Spec,
    sink: Sink,
    ca: Path,
    count: int,
    message_path: Path | None,
    env: dict[str, str],
) -> tuple[dict[str, Any], resource.struct_rusage | None]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        spec.name,
        "--port",
        str(sink.port),
        "--ca",
        str(ca),
        "--count",
        str(count),
        "--concurrency",
        str(spec.concurrency),
    ]
    if message_path is not None:
        command += ["--message-path", str(message_path)]
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, env=env, cwd=ROOT)
        usage = None
        deadline = time.monotonic() + CHILD_TIMEOUT
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    process.returncode = os.waitstatus_to_exitcode(status)
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{spec.name} took over {CHILD_TIMEOUT:g} s")
                time.sleep(0.005)
        finally:
            if process.returncode is None:
                process.kill()
                process.wait()
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line), usage
    return {"error": f"no result (exit {process.returncode}): {text[-800:]}"}, usage


def child_env(workdir: Path, ca: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    )
    # Only twisted.mail.smtp.sendmail() reads these (it trusts the platform
    # store); the others are given the CA explicitly.
    empty = workdir / "empty-cert-dir"
    empty.mkdir(exist_ok=True)
    env["SSL_CERT_FILE"] = str(ca)
    env["SSL_CERT_DIR"] = str(empty)
    return env


def measure(
    spec: Spec,
    sink: Sink,
    ca: Path,
    count: int,
    env: dict[str, str],
    message_path: Path | None = None,
) -> Result:
    before = sink.quiet_stats()
    data, usage = run_child(spec, sink, ca, count, message_path, env)
    after = sink.quiet_stats()
    if "error" in data:
        raise BenchError(f"{spec.name} failed: {data['error']}")
    received = int(after["accepted"] - before["accepted"])
    expected = 0 if spec.name == "tls-anchor" else count
    if received != expected:
        raise BenchError(f"{spec.name}: sink received {received}, expected {expected}")
    sink_cpu = (after["cpu_user"] + after["cpu_sys"]) - (
        before["cpu_user"] + before["cpu_sys"]
    )
    assert usage is not None
    extra = {
        k: v
        for k, v in data.items()
        if k not in ("messages", "elapsed", "cpu_user", "cpu_sys", "tls", "peak_rss_kb")
    }
    extra["connections"] = int(after["connections"] - before["connections"])
    return Result(
        spec=spec,
        messages=count,
        elapsed=data["elapsed"],
        client_cpu=data["cpu_user"] + data["cpu_sys"],
        sink_cpu=sink_cpu,
        peak_rss_kb=data["peak_rss_kb"],
        total_cpu=usage.ru_utime + usage.ru_stime,
        tls=data.get("tls", "?"),
        extra=extra,
    )


def check_verification(
    specs: list[Spec], sink: Sink, wrong_ca: Path, env: dict[str, str]
) -> dict[str, str]:
    """Each sender, pointed at the wrong CA, must refuse to deliver."""
    env = dict(env, SSL_CERT_FILE=str(wrong_ca))
    verdicts = {}
    for spec in specs:
        before = sink.quiet_stats()
        data, _ = run_child(spec, sink, wrong_ca, 1, None, env)
        after = sink.quiet_stats()
        delivered = int(after["accepted"] - before["accepted"])
        if "error" in data and delivered == 0:
            verdicts[spec.name] = "refused an untrusted certificate: verifies"
        else:
            verdicts[spec.name] = (
                f"DID NOT VERIFY: delivered {delivered} with an untrusted CA"
            )
    return verdicts


def build_sink(workdir: Path) -> Path:
    binary = workdir / "sink"
    compiler = os.environ.get("CC", "cc")
    command = [
        compiler,
        "-O2",
        "-Wall",
        "-o",
        str(binary),
        str(SINK_SOURCE),
        "-lssl",
        "-lcrypto",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(
            f"cannot build the sink ({' '.join(command)}):\n{done.stderr}\n"
            "install a C compiler and the OpenSSL headers (libssl-dev)"
        )
    return binary


def make_certificates(workdir: Path) -> tuple[Path, Path, Path, Path]:
    from txstarttls.testing import CertificateAuthority

    authority = CertificateAuthority("bench CA")
    ca = authority.write(workdir, "ca")
    cert, key = authority.issue(SERVER_NAME).write(workdir, "server")
    wrong_ca = CertificateAuthority("some other CA").write(workdir, "wrong-ca")
    return ca, cert, key, wrong_ca


def make_big_message(path: Path, megabytes: int) -> int:
    """A text file of ``megabytes`` MiB; every 50th line starts with a dot."""
    block = (BIG_LINE * 49 + b"." + BIG_LINE[1:]) * 1000
    target = megabytes * 1024 * 1024
    written = 0
    with path.open("wb") as out:
        out.write(b"Subject: large benchmark message\r\n\r\n")
        while written < target:
            piece = block[: target - written]
            out.write(piece)
            written += len(piece)
        out.write(b"\r\n")
    return path.stat().st_size


# --------------------------------------------------------------------------
# Reporting.


def format_table(results: list[Result]) -> str:
    reference = next((r for r in results if r.spec.name == "txstarttls-1"), None)
    header = (
        "| sender | msgs | msgs/s | vs txstarttls-1 | client CPU µs/msg "
        "| sink CPU µs/msg | sink busy | peak RSS MB |"
    )
    lines = [header, "|" + "---|" * 8]
    for r in results:
        ratio = f"{r.rate / reference.rate:.2f}x" if reference else "-"
        lines.append(
            f"| {r.spec.label} | {r.messages} | {r.rate:,.0f} | {ratio} "
            f"| {r.client_us:,.0f} | {r.sink_us:,.0f} | {r.sink_busy:.0%} "
            f"| {r.peak_mb:.1f} |"
        )
    return "\n".join(lines)


def format_new_connections(results: list[Result]) -> str:
    by_name = {r.spec.name: r for r in results}
    anchor = by_name.get("tls-anchor")
    if anchor is None:
        return ""
    lines = [
        "| connection per message | per s | vs handshake anchor "
        "| client CPU µs | sink CPU µs |",
        "|---|---|---|---|---|",
    ]
    for name in ("txstarttls-conn", "smtplib-conn", "twisted-sendmail", "tls-anchor"):
        r = by_name.get(name)
        if r is not None:
            lines.append(
                f"| {r.spec.label} | {r.rate:,.0f} | {r.rate / anchor.rate:.2f}x "
                f"| {r.client_us:,.0f} | {r.sink_us:,.0f} |"
            )
    return "\n".join(lines)


def format_big(result: Result) -> str:
    size = result.extra.get("size", 0)
    mb = size / 1e6
    prepare_s = result.extra.get("prepare_seconds", 0.0)
    send_s = result.elapsed - prepare_s
    return (
        f"one message of {size:,} octets ({mb:,.0f} MB encoded), as a path:\n"
        f"  total {result.elapsed:.2f} s = {mb / result.elapsed:,.0f} MB/s "
        f"(scan pass {prepare_s:.2f} s, then sending {send_s:.2f} s = "
        f"{mb / send_s:,.0f} MB/s on the wire)\n"
        f"  sender CPU {result.client_cpu:.2f} s, sink CPU {result.sink_cpu:.2f} s, "
        f"sender peak RSS {result.peak_mb:.1f} MB (target < 64 MB: "
        f"{'met' if result.peak_mb < 64 else 'MISSED'})"
    )


# (label, numerator, denominator, goal): a rate ratio that must reach goal.
RATE_TARGETS = (
    ("txstarttls-1 / aiosmtplib-1 >= 2", "txstarttls-1", "aiosmtplib-1", 2.0),
    ("txstarttls-1 / smtplib-1 >= 1.5", "txstarttls-1", "smtplib-1", 1.5),
    ("txstarttls-8 / aiosmtplib-8 >= 1.5", "txstarttls-8", "aiosmtplib-8", 1.5),
)
# (label, numerator, denominator): context ratios without a goal.
RATE_CONTEXT = (
    ("txstarttls-1 / floor (bare Twisted client)", "txstarttls-1", "twisted-floor"),
    ("floor / smtplib-1", "twisted-floor", "smtplib-1"),
    ("txstarttls-conn / handshake anchor", "txstarttls-conn", "tls-anchor"),
    ("txstarttls-conn / twisted sendmail()", "txstarttls-conn", "twisted-sendmail"),
    ("txstarttls-conn / smtplib-conn (same work)", "txstarttls-conn", "smtplib-conn"),
    ("smtplib-conn / handshake anchor", "smtplib-conn", "tls-anchor"),
)


def targets(rounds: list[list[Result]]) -> list[str]:
    """Each ratio taken within a round (senders measured minutes apart on a
    noisy machine are not compared), then the median over the rounds."""
    out = []

    def per_round(a: str, b: str, figure: Callable[[Result], float]) -> list[float]:
        values = []
        for results in rounds:
            by = {r.spec.name: r for r in results}
            if a in by and b in by:
                values.append(figure(by[a]) / figure(by[b]))
        return values

    def show(values: list[float]) -> str:
        text = f"{statistics.median(values):.2f}x"
        if len(values) > 1:
            text += " (rounds: " + ", ".join(f"{v:.2f}" for v in values) + ")"
        return text

    for label, a, b, goal in RATE_TARGETS:
        if values := per_round(a, b, lambda r: r.rate):
            verdict = "met" if statistics.median(values) >= goal else "MISSED"
            out.append(f"{label}: {show(values)}: {verdict}")
    if values := per_round("txstarttls-1", "smtplib-1", lambda r: r.client_us):
        verdict = "met" if statistics.median(values) < 1 else "MISSED"
        out.append(
            f"client CPU per message, txstarttls-1 / smtplib-1 < 1: {show(values)}: "
            f"{verdict}"
        )
    for label, a, b in RATE_CONTEXT:
        if values := per_round(a, b, lambda r: r.rate):
            out.append(f"{label}: {show(values)}")
    return out


def machine_note() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from OpenSSL import SSL

    from twisted import version as twisted_version

    try:
        import aiosmtplib

        aio = aiosmtplib.__version__
    except ImportError:
        aio = "not installed"
    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs ({model}); "
        f"Python {platform.python_version()} ({ssl.OPENSSL_VERSION}); "
        f"pyOpenSSL on {SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()}; "
        f"Twisted {twisted_version.short()}; aiosmtplib {aio}"
    )


def source_version() -> str:
    """The commit the library was measured at (read-only git query)."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def median_results(rounds: list[list[Result]]) -> list[Result]:
    """Per sender, the round with the median rate (a real run, not a blend)."""
    merged = []
    for index in range(len(rounds[0])):
        runs = sorted((r[index] for r in rounds), key=lambda r: r.rate)
        merged.append(runs[(len(runs) - 1) // 2])
    return merged


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"] or any(a.startswith("--child") for a in argv):
        return child_main(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=2000)
    parser.add_argument(
        "--conn-n",
        type=int,
        default=None,
        help="messages for the connection-per-message senders (default: -n)",
    )
    parser.add_argument("--big-mb", type=int, default=200, help="0 to skip")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=ALL_NAMES, default=None)
    parser.add_argument("--skip-verify-check", action="store_true")
    parser.add_argument("--json", type=Path, help="also write raw results here")
    args = parser.parse_args(argv)
    if args.messages < 1:
        parser.error("-n must be at least 1")
    conn_n = args.conn_n or args.messages
    wanted = set(args.only or ALL_NAMES)
    specs = [s for s in SPECS if s.name in wanted]
    started = time.monotonic()
    # A plain SIGTERM would skip the clean-up below and orphan the sink.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    workdir = Path(tempfile.mkdtemp(prefix="bench-client-"))
    sink: Sink | None = None
    try:
        print(f"machine: {machine_note()}")
        print(f"txstarttls: {source_version()}")
        print("note: shared, noisy machine: compare ratios, not bare numbers\n")
        binary = build_sink(workdir)
        ca, cert, key, wrong_ca = make_certificates(workdir)
        sink = Sink(binary, workdir, cert, key)
        env = child_env(workdir, ca)
        print(f"sink on 127.0.0.1:{sink.port}, pid {sink.process.pid}")

        if not args.skip_verify_check:
            check_specs = [s for s in specs if s.name != "tls-anchor"]
            for name, verdict in check_verification(
                check_specs, sink, wrong_ca, env
            ).items():
                print(f"verification check, {name}: {verdict}")
            print()

        big_path = None
        if BIG.name in wanted and args.big_mb > 0:
            big_path = workdir / "big.eml"
            make_big_message(big_path, args.big_mb)

        rounds: list[list[Result]] = []
        big_results: list[Result] = []
        record: list[dict[str, Any]] = []
        for number in range(1, args.rounds + 1):
            results = []
            # Each round starts with another sender, so that no sender is
            # always first (or last) on a machine whose load drifts.
            shift = (number - 1) % max(len(specs), 1)
            for spec in specs[shift:] + specs[:shift]:
                count = conn_n if spec.per_connection else args.messages
                result = measure(spec, sink, ca, count, env)
                results.append(result)
                print(
                    f"  {spec.name}: {result.rate:,.0f}/s "
                    f"({result.elapsed:.2f} s, {result.tls})",
                    flush=True,
                )
            results.sort(key=lambda r: [s.name for s in specs].index(r.spec.name))
            rounds.append(results)
            print(f"\nround {number}, N={args.messages}, connection N={conn_n}:")
            print(format_table(results))
            print()
            if table := format_new_connections(results):
                print(table)
                print()
            if big_path is not None:
                big = measure(BIG, sink, ca, 1, env, message_path=big_path)
                big_results.append(big)
                print(format_big(big))
                print()
            for line in targets([results]):
                print(f"  {line}")
            print()
            record.append(
                {
                    "round": number,
                    "results": [_raw(r) for r in results],
                    "big": _raw(big_results[-1]) if big_path else None,
                }
            )
        if args.rounds > 1 and specs:
            merged = median_results(rounds)
            print(f"median of {args.rounds} rounds (per sender, the median run):")
            print(format_table(merged))
            print()
            if table := format_new_connections(merged):
                print(table)
                print()
            if big_results:
                big_results.sort(key=lambda r: r.rate)
                print(format_big(big_results[(len(big_results) - 1) // 2]))
                print()
            print(f"ratios, median of the {args.rounds} per-round ratios:")
            for line in targets(rounds):
                print(f"  {line}")
            print()
        if args.json is not None:
            args.json.write_text(json.dumps(record, indent=2))
        print(f"whole run: {time.monotonic() - started:.0f} s")
        return 0
    except BenchError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    finally:
        if sink is not None:
            sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _raw(result: Result) -> dict[str, Any]:
    return {
        "sender": result.spec.name,
        "messages": result.messages,
        "elapsed": result.elapsed,
        "rate": result.rate,
        "client_cpu": result.client_cpu,
        "sink_cpu": result.sink_cpu,
        "peak_rss_kb": result.peak_rss_kb,
        "total_cpu": result.total_cpu,
        "tls": result.tls,
        **result.extra,
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
