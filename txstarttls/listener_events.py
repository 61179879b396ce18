"""What a listener process tells its relay process: one JSON line an event.

A listener process accepts mail and queues it; the relay process delivers it
and owns the log and the metrics. Four kinds of line cross the pipe between
them: the process is ready, a message is queued, a metric event, and a log
event already rendered as text in the listener process (where the
formatting work belongs). The relay process checks every line: a listener
process is trusted with the queue, not with the relay process's memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from twisted.logger import InvalidLogLevelError, LogEvent, LogLevel

from txstarttls.logtext import render
from txstarttls.queue import valid_queue_id

MAX_LINE_OCTETS: Final = 1024 * 1024
"""Longer lines (a runaway traceback) are dropped, not buffered forever."""

FORWARDED_METRICS: Final = {
    "message_received": int,
    "auth_failed": None,
    "inbound_tls": str,
}
"""The listener's metric events and the type of their one argument, if any."""


def ready_line() -> bytes:
    return b'{"ready":true}\n'


def queued_line(queue_id: str) -> bytes:
    return json.dumps({"queued": queue_id}).encode() + b"\n"


def metric_line(name: str, *args: object) -> bytes:
    return json.dumps({"metric": name, "args": list(args)}).encode() + b"\n"


def log_line(event: LogEvent) -> bytes:
    level = getattr(event.get("log_level"), "name", "info")
    system = event.get("log_system")
    return (
        json.dumps(
            {
                "log": render(event),
                "namespace": str(event.get("log_namespace", "-")),
                "level": level,
                "time": float(event.get("log_time") or 0.0),
                "system": system if isinstance(system, str) else None,
            }
        ).encode()
        + b"\n"
    )


@dataclass(frozen=True, slots=True)
class Ready:
    pass


@dataclass(frozen=True, slots=True)
class Queued:
    queue_id: str


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class LogLine:
    text: str
    namespace: str
    level: LogLevel
    time: float
    system: str | None = None


Event = Ready | Queued | Metric | LogLine


def parse_line(line: bytes) -> Event:
    """One line from a listener process; ValueError if it is not one of ours."""
    try:
        fields = json.loads(line)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(fields, dict):
        raise ValueError("not a JSON object")
    if fields.get("ready") is True:
        return Ready()
    if "queued" in fields:
        if not valid_queue_id(fields["queued"]):
            raise ValueError("not a queue id")
        return Queued(fields["queued"])
    if "metric" in fields:
        return _metric(fields)
    if "log" in fields:
        return _log(fields)
    raise ValueError("unknown event")


def _metric(fields: dict[str, Any]) -> Metric:
    name, args = fields["metric"], fields.get("args")
    if name not in FORWARDED_METRICS or not isinstance(args, list):
        raise ValueError("unknown metric")
    wanted = FORWARDED_METRICS[name]
    if wanted is None:
        if args:
            raise ValueError("unexpected metric argument")
    elif len(args) != 1 or type(args[0]) is not wanted:
        raise ValueError("bad metric argument")
    return Metric(name, tuple(args))


def _log(fields: dict[str, Any]) -> LogLine:
    text, namespace = fields["log"], fields.get("namespace")
    try:
        level = LogLevel.levelWithName(str(fields.get("level")))
    except InvalidLogLevelError:
        raise ValueError("bad log level") from None
    when = fields.get("time")
    if not isinstance(text, str) or not isinstance(namespace, str):
        raise ValueError("bad log event")
    if not isinstance(when, int | float):
        raise ValueError("bad log time")
    system = fields.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("bad log system")
    return LogLine(text, namespace, level, float(when), system)
