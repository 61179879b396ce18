"""The relay service in-process, and twistd starttls-relay as a real process."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.threads import deferToThread

from txstarttls.config import build_config
from txstarttls.operator import FLUSH_REQUEST
from txstarttls.queue import FilesystemStore
from txstarttls.service import (
    ListenerService,
    RelayService,
    build_relay_service,
    parse_smarthost,
)

REPOSITORY = Path(__file__).resolve().parent.parent
MESSAGE = b"Subject: relayed\r\n\r\nhello\r\n"


def test_parse_smarthost() -> None:
    assert parse_smarthost("smtp.example.net") == ("smtp.example.net", None)
    assert parse_smarthost("smtp.example.net:587") == ("smtp.example.net", 587)
    assert parse_smarthost("[::1]:2525") == ("::1", 2525)
    assert parse_smarthost("127.0.0.1:25") == ("127.0.0.1", 25)
    assert parse_smarthost("tcp:host=a.example:port=25") == "tcp:host=a.example:port=25"


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds)


async def until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await sleep(0.02)


@pytest_twisted.async_yield_fixture
async def relay(tmp_path: Path) -> AsyncIterator[tuple[RelayService, int, Path]]:
    queue = tmp_path / "queue"
    config = build_config(
        {"queue": str(queue), "listen": ["tcp:0:interface=127.0.0.1"]}
    )
    service = build_relay_service(reactor, config)
    assert isinstance(service, RelayService)
    service.startService()
    listener = next(s for s in service if isinstance(s, ListenerService))
    assert listener.listening is not None
    await listener.listening
    assert listener.port is not None
    yield service, listener.port.getHost().port, queue  # type: ignore[attr-defined]
    if service.running:
        await service.stopService()


def smtplib_send(port: int, recipients: list[str]) -> str:
    with smtplib.SMTP("127.0.0.1", port) as client:
        code, text = client.ehlo("legacy.example")
        assert code == 250
        client.mail("cron@legacy.example")
        for recipient in recipients:
            client.rcpt(recipient)
        code, text = client.data(MESSAGE)
        assert code == 250, text
        return text.decode()


@pytest_twisted.ensureDeferred
async def test_relay_accepts_queues_and_delivers_to_the_builtin_upstream(
    relay: tuple[RelayService, int, Path],
) -> None:
    service, port, queue = relay
    reply = await deferToThread(smtplib_send, port, ["a@example.net", "b@example.net"])
    assert reply.startswith("2.0.0 Ok: queued as ")
    store_dir = queue / "messages"
    await until(lambda: not any(store_dir.iterdir()))
    await service.stopService()
    # The lock is released: another store (a restarted relay) can open it.
    store = FilesystemStore(queue, reactor)  # type: ignore[arg-type]
    await store.close()


@pytest_twisted.ensureDeferred
async def test_stop_closes_clients_with_421_and_keeps_the_store_consistent(
    relay: tuple[RelayService, int, Path],
) -> None:
    service, port, queue = relay

    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.settimeout(5)
        assert sock.recv(1024).startswith(b"220 ")
        return sock

    sock = await deferToThread(connect)
    await service.stopService()
    data = await deferToThread(sock.recv, 1024)
    assert data.startswith(b"421 4.3.2"), data
    sock.close()
    # The queue directory is free again and recovers cleanly.
    store = FilesystemStore(queue, reactor)  # type: ignore[arg-type]
    report = store.recover()
    assert report.quarantined == ()
    await store.close()


@pytest_twisted.ensureDeferred
async def test_flush_request_file_retries_now(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    config = build_config(
        {
            "queue": str(queue),
            "listen": ["tcp:0:interface=127.0.0.1"],
            # Connection refused: every message is deferred.
            "smarthost": ["127.0.0.1:1"],
            "tls": "none",
        }
    )
    service = build_relay_service(reactor, config)
    service.startService()
    listener = next(s for s in service if isinstance(s, ListenerService))
    assert listener.listening is not None
    await listener.listening
    assert listener.port is not None
    port = listener.port.getHost().port  # type: ignore[attr-defined]
    await deferToThread(smtplib_send, port, ["a@example.net"])
    messages = queue / "messages"

    def attempts() -> int:
        envelopes = list(messages.glob("*.json"))
        if not envelopes:
            return 0
        found = re.search(rb'"attempts":(\d+)', envelopes[0].read_bytes())
        return int(found[1]) if found else 0

    await until(lambda: attempts() == 1)
    (queue / FLUSH_REQUEST).touch()
    await until(lambda: attempts() == 2, timeout=5)
    assert not (queue / FLUSH_REQUEST).exists()
    await service.stopService()


# --- twistd as a real process ---------------------------------------------------


def twistd(*args: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "--nodaemon",
        "--pidfile=",
        "starttls-relay",
        *args,
    ]


def relay_environment() -> dict[str, str]:
    # twisted.plugins finds our plugin through a sys.path entry holding twisted/plugins.
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPOSITORY}{os.pathsep}{path}"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def relay_process(
    tmp_path: Path,
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port()
    queue = tmp_path / "queue"
    log = tmp_path / "relay.log"
    process = subprocess.Popen(
        twistd("--queue", str(queue), "--listen", f"tcp:{port}:interface=127.0.0.1"),
        env={**relay_environment(), "PYTHONUNBUFFERED": "1"},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(log.read_text()) from None
            time.sleep(0.05)
    yield process, port, queue
    if process.poll() is None:
        process.kill()
        process.wait()


def test_twistd_relay_delivers_logs_postfix_line_and_stops_gracefully_on_sigterm(
    relay_process: tuple[subprocess.Popen[bytes], int, Path], tmp_path: Path
) -> None:
    process, port, _ = relay_process
    reply = smtplib_send(port, ["admin@example.net"])
    queue_id = reply.rsplit(" ", 1)[1]
    log = tmp_path / "relay.log"
    deadline = time.monotonic() + 15
    pattern = re.compile(
        rf"{queue_id}: to=<admin@example\.net>, relay=\S+, delay=[\d.]+, "
        rf"delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn=2\.0\.0, status=sent \(250 "
    )
    while not pattern.search(log.read_text()):
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    # twistd shuts down cleanly, then ends with the signal that stopped it.
    assert process.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()
    text = log.read_text()
    assert "Server Shut Down." in text
    assert "Traceback" not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-size", "lots"], "--max-size: must be a positive integer"),
        (["--listen", "tcp:2599:interface=0.0.0.0"], "--listen:"),
        (["--smarthost", "a.example", "--username", "u"], "--username needs"),
        (["--ca-file", "/nonexistent/ca.pem"], "--ca-file: no such file"),
        (["--frobnicate"], "frobnicate"),
    ],
)
def test_bad_configuration_is_one_line_and_a_non_zero_exit_before_listening(
    tmp_path: Path, args: list[str], message: str
) -> None:
    completed = subprocess.run(
        twistd("--queue", str(tmp_path / "queue"), *args),
        env=relay_environment(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode != 0
    output = (completed.stdout + completed.stderr).decode()
    assert message in output, output
    assert "Traceback" not in output
    assert not (tmp_path / "queue" / "messages").exists()


def test_twistd_lists_the_plugin() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "twisted", "--help"],
        env=relay_environment(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert b"starttls-relay" in completed.stdout


@pytest_twisted.ensureDeferred
async def test_metrics_endpoint_serves_prometheus_text(tmp_path: Path) -> None:
    import urllib.request

    from txstarttls.service import MetricsService

    config = build_config(
        {
            "queue": str(tmp_path / "queue"),
            "listen": ["tcp:0:interface=127.0.0.1"],
            "metrics": "tcp:0:interface=127.0.0.1",
        }
    )
    service = build_relay_service(reactor, config)
    service.startService()
    try:
        listener = next(s for s in service if isinstance(s, ListenerService))
        assert listener.listening is not None
        await listener.listening
        assert listener.port is not None
        port = listener.port.getHost().port  # type: ignore[attr-defined]
        await deferToThread(smtplib_send, port, ["a@example.net"])
        exporter = next(s for s in service if isinstance(s, MetricsService))
        await until(lambda: exporter.port is not None)
        assert exporter.port is not None
        url = f"http://127.0.0.1:{exporter.port.getHost().port}/metrics"  # type: ignore[attr-defined]

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=5) as response:
                text: str = response.read().decode()
                return text

        text = ""

        async def delivered() -> bool:
            nonlocal text
            text = await deferToThread(scrape)
            return 'txstarttls_recipient_outcomes_total{status="sent"} 1.0' in text

        deadline = time.monotonic() + 10
        while not await delivered():
            assert time.monotonic() < deadline, text
            await sleep(0.05)
        assert "txstarttls_messages_received_total 1.0" in text
        assert "txstarttls_queue_messages 0.0" in text
        assert (
            'txstarttls_tls_sessions_total{direction="outbound",version="TLSv1.3"}'
            in text
        )
        assert "txstarttls_delivery_latency_seconds_bucket" in text
    finally:
        await service.stopService()


def test_broken_users_file_is_a_one_line_error_at_start(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice:not-a-hash\n")
    completed = subprocess.run(
        twistd("--queue", str(tmp_path / "queue"), "--users", str(users)),
        env=relay_environment(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    output = (completed.stdout + completed.stderr).decode()
    assert completed.returncode != 0
    assert "--users:" in output, output
    assert "Traceback" not in output
