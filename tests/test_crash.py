"""A relay killed with SIGKILL under load loses nothing it acknowledged.

The relay runs as a real process with a smarthost that refuses connections,
so every accepted message stays queued. Load comes from Postfix's
``smtp-source`` and, in parallel, from clients here that remember each
``250 ... queued as ID``. After SIGKILL, a fresh store recovers the queue:
every acknowledged id is there exactly once, its content intact.
"""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import pytest
from twisted.internet import reactor

from tests.support.requirements import require_binary
from tests.test_service import free_port, relay_environment, twistd
from txstarttls.queue import FilesystemStore

pytestmark = pytest.mark.interop

QUEUED = re.compile(r"queued as ([0-9A-F]+)")


def message(worker: int, number: int) -> bytes:
    return (
        f"Subject: crash {worker}-{number}\r\n\r\n".encode()
        + f"worker {worker} message {number}\r\n".encode() * 20
    )


def client_load(
    port: int,
    worker: int,
    acknowledged: dict[str, bytes],
    lock: threading.Lock,
    stop: threading.Event,
) -> None:
    """Send until stopped or the relay dies; record every 250 with its id."""
    number = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("legacy.example")
                while not stop.is_set():
                    number += 1
                    body = message(worker, number)
                    client.mail(f"w{worker}@legacy.example")
                    client.rcpt("admin@example.net")
                    code, text = client.data(body)
                    if code == 250:
                        found = QUEUED.search(text.decode())
                        assert found, text
                        with lock:
                            acknowledged[found[1]] = body
        except (OSError, smtplib.SMTPException):
            return


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(log.read_text()) from None
            time.sleep(0.05)


def test_sigkill_under_load_loses_no_acknowledged_message(tmp_path: Path) -> None:
    smtp_source = require_binary("smtp-source")
    port = free_port()
    queue = tmp_path / "queue"
    log = tmp_path / "relay.log"
    relay = subprocess.Popen(
        twistd(
            "--queue",
            str(queue),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--smarthost",
            "127.0.0.1:1",
            "--tls",
            "none",
        ),
        env=relay_environment(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    wait_for_port(port, relay, log)
    load = subprocess.Popen(
        [
            smtp_source,
            "-s",
            "10",
            "-m",
            "100000",
            "-l",
            "2048",
            "-c",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    acknowledged: dict[str, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    workers = [
        threading.Thread(
            target=client_load, args=(port, n, acknowledged, lock, stop), daemon=True
        )
        for n in range(4)
    ]
    for worker in workers:
        worker.start()
    try:
        time.sleep(2.5)
        relay.send_signal(signal.SIGKILL)
        relay.wait(timeout=10)
    finally:
        stop.set()
        load.kill()
        load.wait()
        for worker in workers:
            worker.join(timeout=15)
        if relay.poll() is None:
            relay.kill()
    with lock:
        acknowledged_now = dict(acknowledged)
    assert len(acknowledged_now) > 20, "the load never got going"

    store = FilesystemStore(queue, reactor)  # type: ignore[arg-type]
    try:
        report = store.recover()
        kept = set(store.queue_ids())
        missing = set(acknowledged_now) - kept
        assert not missing, f"acknowledged but lost: {sorted(missing)[:5]}"
        assert report.quarantined == ()
        contents: dict[bytes, int] = {}
        for queue_id, body in acknowledged_now.items():
            stored = store.read_content(queue_id)
            # The relay prepends its Received: header; the rest is the message.
            assert stored.endswith(body), queue_id
            assert stored.startswith(b"Received: ")
            contents[body] = contents.get(body, 0) + 1
        assert all(count == 1 for count in contents.values())
        # smtp-source's messages were kept too, each intact with its headers.
        assert len(kept) >= len(acknowledged_now)
    finally:
        store.close()
