"""The spool's directory layout and the careful file calls every writer uses.

``messages/`` holds, per message, ``ID.msg`` (one file: a header line, the
envelope as first written, then the content) and, once the message has been
updated, ``ID.json`` (the current envelope, which overrides the embedded
one). Spools written before the single-file layout hold ``ID.eml`` (the
content) and ``ID.json`` (the envelope) instead; both layouts are read.

Files are created exclusively, 0600, without following links; a failed
creation leaves nothing behind. Every call goes through ``os.<name>`` at
call time, so tests can wrap the os functions to count, fail or crash them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from twisted.logger import Logger

from txstarttls.queue.errors import CorruptEntry
from txstarttls.queue.ids import checked_id

# The spool logs as one component, whichever of its modules speaks.
log = Logger(namespace="txstarttls.queue")

MAX_ENVELOPE_BYTES: Final = 16 * 1024 * 1024
CREATE_FLAGS: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
)
READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
JOIN_BELOW: Final = 64 * 1024
"""Parts of a new file up to this size go out in one write() call."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Where everything lives under one queue directory.

    The directories are joined once: every message asks for them several
    times, and a pathlib join is far dearer than reading a string.
    """

    root: Path
    tmp: str = field(init=False)
    messages: str = field(init=False)
    corrupt: str = field(init=False)
    incoming: str = field(init=False)

    def __post_init__(self) -> None:
        for name in ("tmp", "messages", "corrupt", "incoming"):
            object.__setattr__(self, name, str(self.root / name))

    def message(self, queue_id: str) -> str:
        """The message file: header, envelope as first written, content."""
        return f"{self.messages}/{checked_id(queue_id)}.msg"

    def envelope(self, queue_id: str) -> str:
        """The current envelope when it was updated (or of an older spool)."""
        return f"{self.messages}/{checked_id(queue_id)}.json"

    def content(self, queue_id: str) -> str:
        """The content file of a message queued in the older two-file layout."""
        return f"{self.messages}/{checked_id(queue_id)}.eml"

    def quarantine(self, path: str) -> str:
        """Move ``path`` into ``corrupt/`` under a name that replaces nothing."""
        name = os.path.basename(path)
        target = f"{self.corrupt}/{name}"
        if os.path.lexists(target):
            target = f"{target}.{time.time_ns()}"
        os.replace(path, target)
        return target


def create_file(path: str, *parts: bytes) -> int:
    """Create ``path`` (0600, exclusively) holding ``parts``; return its open fd.

    On failure nothing is left behind.
    """
    fd = os.open(path, CREATE_FLAGS, 0o600)
    try:
        if len(parts) > 1 and sum(map(len, parts)) <= JOIN_BELOW:
            parts = (b"".join(parts),)
        for part in parts:
            write_all(fd, part)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _find_renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without it
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2: Final = _find_renameat2()
_AT_FDCWD: Final = -100
_RENAME_NOREPLACE: Final = 1


def rename_no_replace(source: str, target: str) -> None:
    """Rename ``source`` to ``target``; FileExistsError if ``target`` exists.

    One ``renameat2(RENAME_NOREPLACE)`` on Linux: the check and the rename
    are one atomic call instead of a ``lstat`` and a ``rename``, and on the
    queue writer's thread every system call is a hand-over of the GIL with
    the reactor thread. Elsewhere, or on a file system that cannot do it,
    a check and then ``os.replace``.
    """
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(
            _AT_FDCWD,
            os.fsencode(source),
            _AT_FDCWD,
            os.fsencode(target),
            _RENAME_NOREPLACE,
        ):
            code = ctypes.get_errno()
            if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise OSError(code, os.strerror(code), source, None, target)
        else:
            return
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target)
    os.replace(source, target)


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


START_WRITEBACK = hasattr(os, "posix_fadvise")


def start_writeback(fd: int) -> None:
    """Ask the kernel to write a file out now, without waiting for it.

    Done for every file of a batch before the first fsync, so that the
    journal commit this fsync forces also holds the block allocations of the
    others (ext4 allocates at writeback) and their fsyncs find little to do.
    """
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def remove_quietly(path: str) -> bool:
    """Unlink during clean-up, where a second error must not hide the first."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warn("queue: cannot remove {path}: {error}", path=path, error=exc)
        return False
    return True


def read_small_file(path: str) -> bytes:
    """An envelope's bytes; a link, a device or a huge file is corrupt."""
    fd = os.open(path, READ_FLAGS)
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CorruptEntry(f"{path} is not a regular file")
        if info.st_size > MAX_ENVELOPE_BYTES:
            raise CorruptEntry(f"{path} is larger than {MAX_ENVELOPE_BYTES} octets")
        return file.read(MAX_ENVELOPE_BYTES + 1)


def ensure_directory(path: Path, durable: bool) -> None:
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)
            ) from None
        return
    if durable:
        fsync_directory(str(path.parent))


def is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def same_file(first: str, second: str) -> bool:
    try:
        a, b = os.lstat(first), os.lstat(second)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def older_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.lstat(path).st_mtime > seconds
    except FileNotFoundError:
        return False
