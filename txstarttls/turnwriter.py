"""Bytes to a descriptor from any thread, written once per reactor turn.

The relay's log and a listener process's event pipe both produce a few short
lines per message; a write (and, for a file, a flush) per line is a system
call each. Lines gathered during one turn of the reactor leave in one write.
Whatever is written while the reactor is not running (start-up, after it
stopped) or marked ``now`` leaves at once: no turn would come for it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any


class TurnBufferedWriter:
    def __init__(self, fd: int, reactor: Any) -> None:
        self._fd = fd
        self._reactor = reactor
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        self._reactor_thread = threading.get_ident()
        self._scheduled = False

    def write(self, data: bytes, *, now: bool = False) -> None:
        with self._lock:
            self._pending.append(data)
            schedule = not self._scheduled
            self._scheduled = True
        if now or not self._reactor.running:
            self.flush()
        elif schedule:
            if threading.get_ident() == self._reactor_thread:
                self._reactor.callLater(0, self.flush)
            else:
                self._reactor.callFromThread(self.flush)

    def flush(self) -> None:
        """Write everything pending; a descriptor that fails loses it."""
        with self._lock:
            data, self._pending = b"".join(self._pending), []
            self._scheduled = False
            view = memoryview(data)
            # A reader that went away (a pipe to a dead relay process, a
            # closed log) is no reason to stop: the lines are dropped.
            with contextlib.suppress(OSError):
                while view:
                    view = view[os.write(self._fd, view) :]
