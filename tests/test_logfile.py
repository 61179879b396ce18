"""The cheaper twistd log: the same lines as twistd's, one write per turn."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet import task
from twisted.logger import ILogObserver, Logger, LogLevel, textFileLogObserver

from tests.test_service import free_port, relay_environment, smtplib_send, twistd
from txstarttls.logfile import TurnBufferedObserver
from txstarttls.logtext import TimeStamps, classic_line


class FakeReactor(task.Clock):
    running = True

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.callLater(0, f, *args)


def events() -> list[dict[str, Any]]:
    captured: list[dict[str, Any]] = []
    log = Logger(
        namespace="txstarttls.test", observer=cast(ILogObserver, captured.append)
    )
    log.info(
        "{queue_id}: from=<{sender}>, size={size}", queue_id="A1", sender="a@b", size=3
    )
    log.warn("two\nlines {x!r}", x="y")
    log.info("call syntax {f()}", f=lambda: "works")
    try:
        raise ValueError("boom")
    except ValueError:
        log.failure("it failed")
    captured.append({"log_format": "system given", "log_system": "-", "log_time": 1.5})
    captured.append({"message": ("legacy",), "log_legacy": True, "log_time": 2.0})
    captured.append({"log_namespace": "nothing to say", "log_time": 3.0})
    for event in captured:
        event["log_time"] = 1_795_979_430.25
    return captured


def test_lines_are_the_ones_twistds_own_observer_writes() -> None:
    for event in events():
        theirs = io.StringIO()
        textFileLogObserver(theirs)(event)
        assert (classic_line(event, TimeStamps()) or "") == theirs.getvalue()


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read, write = os.pipe()
    os.set_blocking(read, False)
    yield read, write
    os.close(read)
    os.close(write)


def drain(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""


def test_lines_of_one_turn_leave_in_one_write(pipe: tuple[int, int]) -> None:
    read, write = pipe
    reactor = FakeReactor()
    observer = TurnBufferedObserver(write, reactor)
    log = Logger(namespace="t", observer=observer)
    for n in range(3):
        log.info("line {n}", n=n)
    assert drain(read) == b""  # nothing yet: the turn has not ended
    reactor.advance(0)
    text = drain(read).decode()
    assert [line.split("] ", 1)[1] for line in text.splitlines()] == [
        "line 0",
        "line 1",
        "line 2",
    ]
    assert drain(read) == b""


def test_errors_and_lines_outside_the_reactor_are_written_at_once(
    pipe: tuple[int, int],
) -> None:
    read, write = pipe
    reactor = FakeReactor()
    log = Logger(namespace="t", observer=TurnBufferedObserver(write, reactor))
    log.info("buffered")
    log.error("urgent")
    assert drain(read).decode().count("\n") == 2  # the error took the rest along
    reactor.running = False
    log.info("after the reactor stopped")
    assert b"after the reactor stopped" in drain(read)
    assert LogLevel.error.name == "error"


def test_twistd_with_the_cheaper_log_keeps_every_line(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "relay.log"
    command = twistd(
        "--queue",
        str(tmp_path / "queue"),
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
    )
    command.insert(
        command.index("starttls-relay"), "--logger=txstarttls.logfile.observer"
    )
    process = subprocess.Popen(
        command,
        env=relay_environment(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while f"listening on tcp:{port}" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, (
                log.read_text()
            )
            time.sleep(0.05)
        queue_id = smtplib_send(port, ["admin@example.net"]).rsplit(" ", 1)[1]
        while "status=sent" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"
    assert re.search(
        rf"^{stamp} \[txstarttls\.server#info\] {queue_id}: from=<", text, re.M
    )
    assert re.search(
        rf"^{stamp} \[txstarttls\.delivery#info\] {queue_id}: to=<", text, re.M
    )
    # twistd's last line comes after the reactor stopped: written at once.
    assert text.rstrip().endswith("Server Shut Down.")


def test_an_event_that_cannot_be_formatted_costs_one_line_not_the_log(
    pipe: tuple[int, int],
) -> None:
    class Hostile:
        def __str__(self) -> str:
            raise RuntimeError("no")

    read, write = pipe
    reactor = FakeReactor()
    reactor.running = False
    observer = TurnBufferedObserver(write, reactor)
    observer({"log_format": "x", "log_system": Hostile(), "log_time": 1.0})
    observer({"log_format": "still logging", "log_time": 1.0})
    lines = drain(read).decode().splitlines()
    assert lines[0].endswith("UNFORMATTABLE EVENT")
    assert lines[1].endswith("still logging")
