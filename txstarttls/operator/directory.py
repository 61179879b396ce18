"""Which queue directory a command works on, and whether a relay holds it."""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from txstarttls.config import DEFAULT_QUEUE
from txstarttls.operator.errors import EX_NOINPUT, EX_NOPERM, OperatorError, os_error
from txstarttls.operator.files import READ_FLAGS

QUEUE_ENVIRONMENT: Final = "TXSTARTTLS_QUEUE"
"""Names the queue directory when ``--queue`` is not given."""


def resolve_queue(given: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """``--queue``, else ``$TXSTARTTLS_QUEUE``, else the relay's default."""
    environment = os.environ if environ is None else environ
    return Path(given or environment.get(QUEUE_ENVIRONMENT) or DEFAULT_QUEUE)


def check_queue(directory: Path) -> Path:
    """Refuse a path that is not a queue before anything is read or created.

    A relay makes ``messages/`` at its first start, ``txstarttls-sendmail``
    makes ``incoming/``; a directory with neither is a typo, and opening a
    store there would litter it.
    """
    hint = f"give --queue DIR or set {QUEUE_ENVIRONMENT}"
    try:
        info = directory.stat()
    except FileNotFoundError:
        raise OperatorError(
            f"queue directory {directory} does not exist ({hint})", EX_NOINPUT
        ) from None
    except OSError as error:
        raise os_error("read queue directory", directory, error) from None
    if not stat.S_ISDIR(info.st_mode):
        raise OperatorError(
            f"queue directory {directory} is not a directory", EX_NOINPUT
        )
    if not os.access(directory, os.R_OK | os.X_OK):
        raise OperatorError(
            f"cannot read queue directory {directory}: permission denied "
            "(run as the relay's user)",
            EX_NOPERM,
        )
    if not any((directory / name).is_dir() for name in ("messages", "incoming")):
        raise OperatorError(
            f"{directory} is not a txstarttls queue directory (no messages/ or "
            f"incoming/ in it; {hint})",
            EX_NOINPUT,
        )
    return directory


@dataclass(frozen=True, slots=True)
class RelayStatus:
    """Whether a relay holds the queue's lock, and its pid as it wrote it."""

    running: bool
    pid: int | None = None

    def describe(self, directory: Path) -> str:
        owner = f" (pid {self.pid})" if self.pid is not None else ""
        return f"the relay on {directory}{owner}"


def relay_status(directory: Path) -> RelayStatus:
    """Probe ``DIR/lock`` with a shared, non-blocking flock.

    The probe holds the lock for microseconds; it is never used for reads,
    which need no lock at all.
    """
    path = directory / "lock"
    try:
        fd = os.open(path, READ_FLAGS)
    except FileNotFoundError:
        return RelayStatus(running=False)
    except OSError as error:
        raise os_error("open", path, error) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return RelayStatus(running=True, pid=int(text) if text.isdigit() else None)
        except OSError as error:
            raise os_error("lock", path, error) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return RelayStatus(running=False)
    finally:
        os.close(fd)
