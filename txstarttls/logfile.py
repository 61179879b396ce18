"""A cheaper log for twistd: ``twistd --logger txstarttls.logfile.observer``.

The same lines as twistd's own ``--logfile=-`` (``TIME [namespace#level]
text``) on standard output, for systemd's journal or a pipe, at a fraction
of the cost: text through :func:`txstarttls.logtext.render`, a time stamp
formatted once a second, and the lines of one reactor turn written together
instead of a write and a flush per line. Under load the relay logs four or
five lines per message, and twistd's observer was about a sixth of the relay
process's reactor thread.

Errors and worse are written at once, and so is everything logged while the
reactor is not running (start-up, and twistd's last lines); a process killed
outright loses at most the lines of its last reactor turn. For ``twistd
--nodaemon`` (as under systemd): a daemonised twistd has no standard output.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import Any

from twisted.logger import ILogObserver, LogEvent, LogLevel
from zope.interface import implementer

from txstarttls.logtext import TimeStamps, classic_line

_URGENT = frozenset({LogLevel.error, LogLevel.critical})


@implementer(ILogObserver)
class TurnBufferedObserver:
    """Writes event lines to ``fd``, one write per reactor turn."""

    def __init__(self, fd: int, reactor: Any) -> None:
        self._fd = fd
        self._reactor = reactor
        self._stamps = TimeStamps()
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._reactor_thread = threading.get_ident()
        self._scheduled = False

    def __call__(self, event: LogEvent) -> None:
        try:
            line = classic_line(event, self._stamps)
        except Exception:
            # Twisted would disable an observer that raised: every later
            # line would be lost for one odd event.
            line = f"{self._stamps(event.get('log_time'))} [-] UNFORMATTABLE EVENT\n"
        if line is None:
            return
        with self._lock:
            self._pending.append(line)
            schedule = not self._scheduled
            self._scheduled = True
        if event.get("log_level") in _URGENT or not self._reactor.running:
            # Before the reactor runs and after it stopped (twistd's last
            # lines, then perhaps death by the signal that stopped it) no
            # turn will come to write them.
            self.flush()
        elif schedule:
            if threading.get_ident() == self._reactor_thread:
                self._reactor.callLater(0, self.flush)
            else:
                self._reactor.callFromThread(self.flush)

    def flush(self) -> None:
        with self._lock:
            lines, self._pending = self._pending, []
            self._scheduled = False
            if not lines:
                return
            data = memoryview("".join(lines).encode("utf-8", "replace"))
            with contextlib.suppress(OSError):  # nowhere to log to: nothing to do
                while data:
                    data = data[os.write(self._fd, data) :]


def observer() -> TurnBufferedObserver:
    """The factory ``twistd --logger`` calls: standard output, this reactor."""
    from twisted.internet import reactor

    sys.stdout.flush()
    made = TurnBufferedObserver(sys.stdout.fileno(), reactor)
    atexit.register(made.flush)
    return made
