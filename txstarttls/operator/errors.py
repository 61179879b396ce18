"""How an operator command fails: one line, and a sysexits(3) status.

The statuses are listed in the package's docstring; an :class:`OSError` or
:class:`~txstarttls.queue.StoreError` becomes one of them here, so every
command says the same thing about the same failure.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Final

from txstarttls.queue import StoreError

EX_OK: Final = 0
EX_USAGE: Final = 64
EX_DATAERR: Final = 65
EX_NOINPUT: Final = 66
EX_NOUSER: Final = 67
EX_UNAVAILABLE: Final = 69
EX_CANTCREAT: Final = 73
EX_TEMPFAIL: Final = 75
EX_NOPERM: Final = 77
EX_CONFIG: Final = 78


class OperatorError(Exception):
    """A one-line message for the operator and the sysexits status to exit with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def os_error(action: str, path: Path | str, error: OSError) -> OperatorError:
    """Permission problems are 77; a missing directory 66; the rest try-again."""
    reason = error.strerror or str(error)
    if error.errno in (errno.EACCES, errno.EPERM):
        return OperatorError(
            f"cannot {action} {path}: {reason} (run as the relay's user)", EX_NOPERM
        )
    if error.errno == errno.EROFS:
        return OperatorError(f"cannot {action} {path}: {reason}", EX_CANTCREAT)
    return OperatorError(f"cannot {action} {path}: {reason}", EX_TEMPFAIL)


def store_error(error: StoreError) -> OperatorError:
    if error.errno in (errno.EACCES, errno.EPERM):
        return OperatorError(f"{error} (run as the relay's user)", EX_NOPERM)
    return OperatorError(str(error), EX_TEMPFAIL)
