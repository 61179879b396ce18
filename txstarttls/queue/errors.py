"""How the spool fails: one exception per thing a caller must tell apart.

A disk error is always a :class:`StoreError` with a one-line message naming
the path, so the server can answer ``452 4.3.1`` and an operator can act.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


def brief(value: object) -> str:
    """A repr short enough for a one-line error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class CorruptEntry(ValueError):
    """An envelope that does not decode exactly: quarantine it, never guess."""


class InvalidQueueId(ValueError):
    """Not one of our queue ids; such a string never becomes a path."""

    def __init__(self, queue_id: object) -> None:
        super().__init__(
            f"invalid queue id {brief(queue_id)}: expected 18 upper-case hex digits"
        )


class MessageNotFound(KeyError):
    """The queue holds no message with this id (delivered or removed)."""

    def __init__(self, queue_id: str) -> None:
        super().__init__(queue_id)
        self.queue_id = queue_id

    def __str__(self) -> str:
        return f"no message {self.queue_id} in the queue"


class StoreError(Exception):
    """A disk error: the caller answers ``452 4.3.1``; nothing half-written remains."""

    def __init__(
        self, message: str, *, errno_code: int | None = None, path: str | None = None
    ) -> None:
        super().__init__(message)
        self.errno = errno_code
        self.path = path

    @classmethod
    def from_os_error(cls, action: str, exc: OSError, path: str) -> StoreError:
        code = exc.errno
        name = errno.errorcode.get(code, str(code)) if code is not None else "OSError"
        reason = exc.strerror or str(exc)
        return cls(
            f"queue {action} failed: {name} ({reason}) at {path}",
            errno_code=code,
            path=path,
        )


class StoreLocked(StoreError):
    """Another store (another relay) already owns this queue directory."""


@contextlib.contextmanager
def disk(action: str, path: str) -> Iterator[None]:
    """Turn an OSError into a one-line StoreError naming the path."""
    try:
        yield
    except OSError as exc:
        raise StoreError.from_os_error(action, exc, path) from exc
