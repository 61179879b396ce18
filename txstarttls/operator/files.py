"""Careful file calls shared by the readers and the writers of the queue.

Never follow a symbolic link and never read more than a limit: a queue
directory may hold files an attacker put there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from txstarttls.queue import CorruptEntry

READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
CREATE_FLAGS: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
)


def read_small(path: Path, limit: int) -> bytes:
    """A regular file's content, or CorruptEntry when it is not one or too big."""
    fd = os.open(path, READ_FLAGS)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise CorruptEntry(f"{path} is not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise CorruptEntry(f"{path} is larger than {limit} octets")
    return data
