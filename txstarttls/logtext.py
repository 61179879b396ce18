"""Log events as text, the way Twisted's text observers write them, cheaper.

Twisted formats every event through ``string.Formatter`` in Python and every
time stamp through ``strftime``; the relay logs four or five lines per
message, so that shows in profiles. ``render`` lets ``str.format_map`` (in C)
do the common case and leaves the rest (call syntax, legacy events,
tracebacks) to Twisted; ``TimeStamps`` formats a time once per second.
"""

from __future__ import annotations

from twisted.logger import LogEvent, eventAsText, formatTime


def render(event: LogEvent) -> str:
    """The event's text, as Twisted's file observer would write it."""
    text = event.get("log_format")
    if isinstance(text, str) and "log_failure" not in event:
        try:
            return text.format_map(event)
        except Exception:
            pass
    return eventAsText(
        event, includeTraceback=True, includeTimestamp=False, includeSystem=False
    )


class TimeStamps:
    """Twisted's RFC 3339 time stamps, formatted once per second."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second = second
            self._stamp = formatTime(second)
        return self._stamp


def classic_line(event: LogEvent, stamps: TimeStamps) -> str | None:
    """``TIME [system] text`` and a newline, as twistd's log file has it."""
    text = render(event)
    if not text:
        return None
    system = event.get("log_system")
    if system is None:
        name = getattr(event.get("log_level"), "name", "-")
        system = f"{event.get('log_namespace', '-')}#{name}"
    text = text.replace("\n", "\n\t")
    return f"{stamps(event.get('log_time'))} [{system}] {text}\n"
