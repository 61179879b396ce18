"""Queue ids: unique across processes, sorted by age, and safe as file names."""

from __future__ import annotations

import re
import secrets
import threading
import time
from typing import Final

from txstarttls.queue.errors import InvalidQueueId

_QUEUE_ID: Final = re.compile(r"[0-9A-F]{18}")

_id_lock = threading.Lock()
_last_micros = 0


def new_queue_id() -> str:
    """A unique id that sorts by creation time and is safe as a file name.

    13 hex digits of microseconds since the epoch (monotonic within a
    process) and 5 random ones against other processes, like Postfix's long
    queue ids.
    """
    global _last_micros
    with _id_lock:
        micros = max(time.time_ns() // 1000, _last_micros + 1)
        _last_micros = micros
    return f"{micros:013X}{secrets.randbits(20):05X}"


def valid_queue_id(queue_id: object) -> bool:
    """Whether ``queue_id`` is exactly one of our ids (no path can hide in it)."""
    return isinstance(queue_id, str) and _QUEUE_ID.fullmatch(queue_id) is not None


def checked_id(queue_id: str) -> str:
    """``queue_id`` itself, or InvalidQueueId before it can become a path."""
    if not valid_queue_id(queue_id):
        raise InvalidQueueId(queue_id)
    return queue_id
