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
import sys
from typing import Any

from twisted.logger import ILogObserver, LogEvent, LogLevel
from zope.interface import implementer

from txstarttls.logtext import TimeStamps, classic_line
from txstarttls.turnwriter import TurnBufferedWriter

_URGENT = frozenset({LogLevel.error, LogLevel.critical})


@implementer(ILogObserver)
class TurnBufferedObserver:
    """Log lines to ``fd``, one write per reactor turn; errors at once."""

    def __init__(self, fd: int, reactor: Any) -> None:
        self._out = TurnBufferedWriter(fd, reactor)
        self._stamps = TimeStamps()
        self.flush = self._out.flush

    def __call__(self, event: LogEvent) -> None:
        try:
            line = classic_line(event, self._stamps)
        except Exception:
            # Twisted would disable an observer that raised: every later
            # line would be lost for one odd event.
            line = f"{self._stamps(event.get('log_time'))} [-] UNFORMATTABLE EVENT\n"
        if line is not None:
            self._out.write(
                line.encode("utf-8", "replace"),
                now=event.get("log_level") in _URGENT,
            )


def observer() -> TurnBufferedObserver:
    """The factory ``twistd --logger`` calls: standard output, this reactor."""
    from twisted.internet import reactor

    sys.stdout.flush()
    made = TurnBufferedObserver(sys.stdout.fileno(), reactor)
    atexit.register(made.flush)
    return made
