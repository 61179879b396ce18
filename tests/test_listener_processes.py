"""--listener-processes: listeners in child processes, the relay delivering.

The event lines between the processes are checked on their own; then real
listener processes run, in this process's reactor and under twistd.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent

from tests.test_service import (
    free_port,
    relay_environment,
    smtplib_send,
    twistd,
    until,
)
from txstarttls.config import build_config
from txstarttls.listener_events import (
    LogLine,
    Metric,
    Queued,
    Ready,
    log_line,
    metric_line,
    parse_line,
    queued_line,
    ready_line,
)
from txstarttls.listener_processes import ListenerProcesses
from txstarttls.logtext import render
from txstarttls.queue import FilesystemStore, StoreLocked
from txstarttls.service import ListenerService, StoreService, build_relay_service
from txstarttls.testing import CertificateAuthority

QUEUE_ID = "6616EE163ED08BC922"

# --- the event lines --------------------------------------------------------------


def test_each_event_line_reads_back_as_itself() -> None:
    assert parse_line(ready_line()) == Ready()
    assert parse_line(queued_line(QUEUE_ID)) == Queued(QUEUE_ID)
    assert parse_line(metric_line("message_received", 2048)) == Metric(
        "message_received", (2048,)
    )
    assert parse_line(metric_line("auth_failed")) == Metric("auth_failed", ())
    assert parse_line(metric_line("inbound_tls", "TLSv1.3")) == Metric(
        "inbound_tls", ("TLSv1.3",)
    )
    event = {
        "log_format": "{queue_id}: from=<{sender}>",
        "queue_id": QUEUE_ID,
        "sender": "cron@legacy.example",
        "log_namespace": "txstarttls.server",
        "log_level": LogLevel.warn,
        "log_time": 1234.5,
    }
    assert parse_line(log_line(event)) == LogLine(
        f"{QUEUE_ID}: from=<cron@legacy.example>",
        "txstarttls.server",
        LogLevel.warn,
        1234.5,
    )


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1, 2]",
        b'{"queued": "../../etc/passwd"}',
        b'{"queued": 17}',
        b'{"metric": "delivery", "args": ["sent", 1.0]}',
        b'{"metric": "__class__", "args": []}',
        b'{"metric": "message_received", "args": ["2048"]}',
        b'{"metric": "message_received", "args": [true]}',
        b'{"metric": "auth_failed", "args": [1]}',
        b'{"log": "x", "namespace": "n", "level": "loud", "time": 1}',
        b'{"log": "x", "namespace": 3, "level": "info", "time": 1}',
        b'{"log": "x", "namespace": "n", "level": "info", "time": "now"}',
        b'{"something": "else"}',
    ],
)
def test_listener_event_that_is_not_ours_is_refused(line: bytes) -> None:
    """A listener process is trusted with the queue, not with the relay
    process: no path through a queue id, no arbitrary method through a
    metric name, no malformed log event."""
    with pytest.raises(ValueError):
        parse_line(line)


def test_render_matches_twisteds_text_and_falls_back_to_it() -> None:
    simple = {"log_format": "{a} and {b!r}", "a": 1, "b": "two"}
    assert render(simple) == formatEvent(simple) == "1 and 'two'"
    # Twisted's call syntax is not str.format's: Twisted's formatter takes it.
    called = {"log_format": "{f()}", "f": lambda: "called"}
    assert render(called) == "called"
    legacy = {"log_format": None, "message": ("legacy", "text"), "log_legacy": True}
    assert render(legacy) == formatEvent(legacy)


def test_render_includes_the_traceback_of_a_failure() -> None:
    events: list[dict[str, Any]] = []
    log = Logger(observer=cast(ILogObserver, events.append))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.failure("it failed")
    text = render(events[0])
    assert text.startswith("it failed\n")
    assert "RuntimeError: boom" in text


# --- listener processes in this reactor -------------------------------------------


class RecordingRunner:
    def __init__(self) -> None:
        self.queued: list[str] = []
        self.pickups = 0

    def notify_queued(self, queue_id: str) -> None:
        self.queued.append(queue_id)

    def pick_up_unscheduled(self) -> int:
        self.pickups += 1
        return 0


class RecordingMetrics:
    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[Any, ...]]] = []

    def message_received(self, size: int) -> None:
        self.events.append(("message_received", (size,)))

    def auth_failed(self) -> None:
        self.events.append(("auth_failed", ()))

    def inbound_tls(self, version: str) -> None:
        self.events.append(("inbound_tls", (version,)))

    def delivery(self, status: str, seconds: float) -> None:
        raise AssertionError("listeners do not deliver")

    def outbound_tls(self, version: str) -> None:
        raise AssertionError("listeners do not deliver")


@pytest_twisted.ensureDeferred
async def test_listener_process_queues_and_reports_to_the_relay_process(
    tmp_path: Path,
) -> None:
    queue = tmp_path / "queue"
    store = FilesystemStore(queue, reactor)  # type: ignore[arg-type]
    runner, metrics = RecordingRunner(), RecordingMetrics()
    logged: list[dict[str, Any]] = []
    description = "tcp:0:interface=127.0.0.1"
    assert store.lock_fd is not None
    service = ListenerProcesses(
        reactor,
        [description],
        1,
        {"queue": str(queue), "listen": [description], "hostname": "relay.test"},
        store.lock_fd,
        runner,
        metrics,
        observer=logged.append,
    )
    service.startService()
    try:
        await service.ready
        port = service.ports[0].getHost().port  # type: ignore[attr-defined]
        reply = await deferToThread(smtplib_send, port, ["a@example.net"])
        queue_id = reply.rsplit(" ", 1)[1]
        await until(lambda: runner.queued == [queue_id])
        assert store.get(queue_id).sender == "cron@legacy.example"
        assert b"by relay.test" in store.read_content(queue_id)
        await until(lambda: ("message_received",) in [(n,) for n, _ in metrics.events])
        await until(lambda: any("disconnect from" in e["log_text"] for e in logged))
        texts = [event["log_text"] for event in logged]
        assert any(
            re.fullmatch(rf"{queue_id}: from=<cron@legacy\.example>, .*", text)
            for text in texts
        ), texts
        assert {e["log_namespace"] for e in logged} >= {"txstarttls.server"}
    finally:
        await service.stopService()
        await store.close()
    assert not service.children
    assert runner.pickups == 0  # the listener stopped as asked, nothing lost


# --- under twistd ---------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"txstarttls.listener_process" in command:
            found.append(int(entry.name))
    return sorted(found)


def wait_for(condition: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def relay_with_listener_processes(
    tmp_path: Path,
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path, Path]]:
    port = free_port()
    queue = tmp_path / "queue"
    log = tmp_path / "relay.log"
    process = subprocess.Popen(
        twistd(
            "--queue",
            str(queue),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--listener-processes",
            "2",
        ),
        env={**relay_environment(), "PYTHONUNBUFFERED": "1"},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: len(children_of(process.pid)) == 2, "two listener processes")
        wait_for(
            lambda: log.read_text().count("RelayServerFactory starting") == 2, "ready"
        )
        yield process, port, queue, log
    finally:
        children = children_of(process.pid)
        if process.poll() is None:
            process.kill()
            process.wait()
        for child in children:
            if not gone(child):
                os.kill(child, signal.SIGKILL)


def sent_lines(log: Path) -> int:
    return len(re.findall(r"status=sent \(250 ", log.read_text()))


def test_listener_processes_accept_and_the_relay_process_delivers_and_logs(
    relay_with_listener_processes: tuple[subprocess.Popen[bytes], int, Path, Path],
) -> None:
    process, port, _, log = relay_with_listener_processes
    children = children_of(process.pid)
    queue_ids = [
        smtplib_send(port, [f"user{n}@example.net"]).rsplit(" ", 1)[1] for n in range(6)
    ]
    wait_for(lambda: sent_lines(log) == 6, "six deliveries")
    text = log.read_text()
    for queue_id in queue_ids:
        # Accepted in a listener process, logged by the relay process.
        assert f"{queue_id}: from=<cron@legacy.example>, size=" in text
        assert re.search(rf"{queue_id}: to=<user\d@example\.net>, .*status=sent", text)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()
    assert all(gone(child) for child in children)
    text = log.read_text()
    assert "Server Shut Down." in text
    assert "Traceback" not in text
    assert "ended unexpectedly" not in text


def test_clients_of_a_listener_process_get_421_when_the_relay_stops(
    relay_with_listener_processes: tuple[subprocess.Popen[bytes], int, Path, Path],
) -> None:
    process, port, _, log = relay_with_listener_processes
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        reader = client.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        client.sendall(b"EHLO legacy.example\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        process.send_signal(signal.SIGTERM)
        assert reader.readline().startswith(b"421 4.3.2 ")
    assert process.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()


def test_a_listener_process_that_dies_is_replaced_and_nothing_is_lost(
    relay_with_listener_processes: tuple[subprocess.Popen[bytes], int, Path, Path],
) -> None:
    process, port, _, log = relay_with_listener_processes
    victim = children_of(process.pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: "ended unexpectedly" in log.read_text(), "the restart notice")
    wait_for(
        lambda: (
            len(children_of(process.pid)) == 2
            and victim not in children_of(process.pid)
        ),
        "a new listener process",
    )
    for n in range(4):
        smtplib_send(port, [f"after{n}@example.net"])
    wait_for(lambda: sent_lines(log) == 4, "four deliveries")


def test_listener_processes_end_when_the_relay_process_is_killed(
    relay_with_listener_processes: tuple[subprocess.Popen[bytes], int, Path, Path],
) -> None:
    """Nothing orphaned: the end of their input stops them, and the queue
    stays locked until the last of them is gone."""
    process, _, queue, _ = relay_with_listener_processes
    children = children_of(process.pid)
    process.kill()
    process.wait()
    wait_for(lambda: all(gone(child) for child in children), "orphans to stop", 15)
    store = FilesystemStore(queue, reactor, durable=False)  # type: ignore[arg-type]
    os.close(store.lock_fd)  # type: ignore[arg-type]


def test_queue_stays_locked_while_a_listener_process_lives(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    store = FilesystemStore(queue, reactor, durable=False)  # type: ignore[arg-type]
    assert store.lock_fd is not None
    holder = subprocess.Popen(
        ["sleep", "30"], pass_fds=(store.lock_fd,), stdin=subprocess.DEVNULL
    )
    try:
        os.close(store.lock_fd)  # what the relay process's close does
        with pytest.raises(StoreLocked):
            FilesystemStore(queue, reactor)  # type: ignore[arg-type]
    finally:
        holder.kill()
        holder.wait()
    other = FilesystemStore(queue, reactor, durable=False)  # type: ignore[arg-type]
    os.close(other.lock_fd)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_an_ssl_listener_stays_in_the_relay_process(tmp_path: Path) -> None:
    """Implicit TLS cannot be handed over as a bare socket: that listener is
    served by the relay process, the others by listener processes."""
    issued = CertificateAuthority("listener test CA").issue("mx.test.example")
    cert, key = issued.write(tmp_path, "relay")
    plain = "tcp:0:interface=127.0.0.1"
    implicit = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    config = build_config(
        {
            "queue": str(tmp_path / "queue"),
            "listen": [plain, implicit],
            "listener-processes": "1",
        }
    )
    service = build_relay_service(reactor, config)
    shared = [s for s in service if isinstance(s, ListenerProcesses)]
    own = [s for s in service if isinstance(s, ListenerService)]
    assert [s.descriptions for s in shared] == [(plain,)]
    assert [s.description for s in own] == [implicit]
    store = next(s for s in service if isinstance(s, StoreService)).store
    await store.close()


def test_events_that_cross_the_pipe_are_json_lines() -> None:
    for line in (ready_line(), queued_line(QUEUE_ID), metric_line("auth_failed")):
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert isinstance(json.loads(line), dict)


def test_log_event_with_odd_fields_still_crosses_the_pipe() -> None:
    """An observer that raised would be disabled by Twisted, and every later
    log line of the listener process lost: whatever the event holds, a line
    comes out."""
    event = {
        "log_format": "{thing}",
        "thing": object(),
        "log_system": object(),
        "log_level": "not a level",
        "log_namespace": "odd",
        "log_time": 5,
    }
    parsed = parse_line(log_line(event))
    assert isinstance(parsed, LogLine)
    assert parsed.text.startswith("<object object at")
    assert parsed.system is None
    assert parsed.level == LogLevel.info
