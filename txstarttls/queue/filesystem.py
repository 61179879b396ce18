"""The default message store: one locked directory, written by one thread.

One message is one file in ``messages/``, ``ID.msg`` (header, envelope,
content), plus ``ID.json`` once its envelope was updated; messages of the
older two-file layout (``ID.eml`` and ``ID.json``) are read and handled too.
Reads happen here, in the caller's thread; every write is an operation for
the :class:`BatchWriter`, whose Deferred fires only once it is durable.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from zope.interface import implementer

from txstarttls.queue.entry import QueueEntry, check_size
from txstarttls.queue.errors import StoreError, StoreLocked, disk
from txstarttls.queue.files import (
    Layout,
    ensure_directory,
    fsync_directory,
    is_regular,
)
from txstarttls.queue.ids import checked_id, valid_queue_id
from txstarttls.queue.incoming import Adopt
from txstarttls.queue.interface import IMessageStore, RecoveryReport
from txstarttls.queue.messagefile import open_content, read_entry
from txstarttls.queue.operations import Add, Remove, Update
from txstarttls.queue.recovery import recover
from txstarttls.queue.writer import BatchWriter


@implementer(IMessageStore)
class FilesystemStore:
    """The default store: a directory, one writer thread, group commit."""

    def __init__(
        self,
        directory: Path | str,
        reactor: IReactorFromThreads,
        *,
        durable: bool = True,
        locked: bool = True,
    ) -> None:
        """``locked=False`` is for a listener process only: it adds messages
        to a queue whose lock its relay process holds (and shares with it)."""
        self.directory = Path(directory)
        self._durable = durable
        self._layout = Layout(self.directory)
        self._lock_fd = self._lock() if locked else None
        try:
            with disk("create directory", str(self.directory)):
                for path in ("tmp", "messages", "corrupt", "incoming"):
                    ensure_directory(self.directory / path, durable)
        except BaseException:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            raise
        self._writer = BatchWriter(
            self.directory,
            reactor,
            durable=durable,
            on_stopped=self._writer_stopped,
        )
        self._close_waiters: list[Deferred[None]] = []
        self._closed = False

    def _lock(self) -> int:
        root = self.directory
        path = str(root / "lock")
        with disk("create directory", str(root)):
            if not root.is_dir():
                root.mkdir(mode=0o700, parents=True)
                if self._durable:
                    fsync_directory(str(root.parent))
        with disk("lock", path):
            fd = os.open(
                path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            owner = f" (pid {holder})" if holder else ""
            raise StoreLocked(
                f"queue directory {root} is in use by another relay{owner}; "
                "stop it or use another directory",
                errno_code=errno.EWOULDBLOCK,
                path=path,
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError.from_os_error("lock", exc, path) from exc
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return fd

    # -- asynchronous writes ---------------------------------------------------

    def add(self, entry: QueueEntry, content: bytes) -> Deferred[None]:
        check_size(entry, content)
        deferred: Deferred[None] = Deferred()
        self._writer.submit(Add(self._layout, entry, content), deferred)
        return deferred

    def update(self, entry: QueueEntry) -> Deferred[None]:
        deferred: Deferred[None] = Deferred()
        self._writer.submit(Update(self._layout, entry), deferred)
        return deferred

    def remove(self, queue_id: str) -> Deferred[None]:
        deferred: Deferred[None] = Deferred()
        self._writer.submit(Remove(self._layout, checked_id(queue_id)), deferred)
        return deferred

    def adopt_incoming(self) -> Deferred[list[str]]:
        deferred: Deferred[list[str]] = Deferred()
        self._writer.submit(Adopt(self._layout), deferred)
        return deferred

    def add_sync(self, entry: QueueEntry, content: bytes) -> None:
        """Blocking :meth:`add` for a program without a running reactor."""
        check_size(entry, content)
        operation = Add(self._layout, entry, content)
        if not self._writer.run_blocking(operation):
            raise self._writer.closed_error()
        if operation.error is not None:
            raise operation.error

    # -- reads -----------------------------------------------------------------

    def get(self, queue_id: str) -> QueueEntry:
        try:
            return read_entry(self._layout, queue_id)
        except OSError as exc:
            path = exc.filename or self._layout.message(queue_id)
            raise StoreError.from_os_error("read", exc, str(path)) from exc

    def open_content(self, queue_id: str) -> BinaryIO:
        return self._open_content(queue_id)[0]

    def _open_content(self, queue_id: str) -> tuple[BinaryIO, str]:
        try:
            return open_content(self._layout, queue_id)
        except OSError as exc:
            path = exc.filename or self._layout.message(queue_id)
            raise StoreError.from_os_error("read", exc, str(path)) from exc

    def content_path(self, queue_id: str) -> Path | None:
        path = self._layout.content(queue_id)
        return Path(path) if is_regular(path) else None

    def read_content(self, queue_id: str) -> bytes:
        file, path = self._open_content(queue_id)
        with file, disk("read", path):
            return file.read()

    def queue_ids(self) -> list[str]:
        with disk("list", self._layout.messages):
            names = set(os.listdir(self._layout.messages))
        ids = set()
        for name in names:
            queue_id, _, suffix = name.partition(".")
            # An envelope counts alone only in the older two-file layout.
            if suffix == "msg" or (suffix == "json" and f"{queue_id}.eml" in names):
                ids.add(queue_id)
        return sorted(
            queue_id
            for queue_id in ids
            if valid_queue_id(queue_id) and queue_id not in self._writer.in_flight
        )

    # -- start and stop --------------------------------------------------------

    def recover(self) -> RecoveryReport:
        return recover(self._layout, self._writer, durable=self._durable)

    def close(self) -> Deferred[None]:
        deferred: Deferred[None] = Deferred()
        if self._closed:
            deferred.callback(None)
            return deferred
        self._close_waiters.append(deferred)
        self._writer.stop()
        return deferred

    @property
    def lock_fd(self) -> int | None:
        """The locked descriptor: a listener process inherits it, so the
        queue stays locked until the last process writing to it is gone."""
        return self._lock_fd

    def _writer_stopped(self) -> None:
        # Closing, not LOCK_UN: a listener process still sharing the lock
        # keeps it held until it is gone too.
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self._closed = True
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)
