"""The writes the store's writer thread runs, each as a few batch phases.

An operation never fsyncs a directory itself: the writer does that once per
batch for every directory the batch touched (group commit), and only then
does an operation's Deferred fire.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import threading
from typing import Any

from twisted.internet.defer import Deferred

from txstarttls.queue.entry import QueueEntry
from txstarttls.queue.errors import MessageNotFound, StoreError, disk
from txstarttls.queue.files import Layout, create_file, remove_quietly

_sequence = itertools.count()


class Operation:
    """One request to the writer, driven through the phases of a batch.

    ``prepare`` writes temporary files, ``sync`` fsyncs them, ``commit``
    renames them into place (in submission order), the batch then fsyncs each
    directory in ``touched`` once, and ``finish`` does what must wait for
    that (``adopt`` unlinks its ``incoming/`` names).
    """

    queue_id: str | None = None
    weight = 0
    hidden_until_done = False
    """Whether :meth:`FilesystemStore.queue_ids` must not list it meanwhile."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.error: Exception | None = None
        self.result: object = None
        self.deferred: Deferred[Any] | None = None
        self.event: threading.Event | None = None
        self.touched: set[str] = set()
        self.temporary: list[str] = []
        self.fds: list[int] = []

    def write_temporary(self, suffix: str, data: bytes) -> str:
        name = self.queue_id or "adopt"
        path = f"{self.layout.tmp}/{name}.{next(_sequence)}{suffix}.tmp"
        with disk("write", path):
            self.fds.append(create_file(path, data))
        self.temporary.append(path)
        return path

    def prepare(self) -> None:
        pass

    def sync(self, durable: bool) -> None:
        fds, self.fds = self.fds, []
        try:
            if durable:
                for fd, path in zip(fds, self.temporary, strict=True):
                    with disk("fsync", path):
                        os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)

    def commit(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def rollback(self) -> None:
        """Undo ``commit`` after the directory fsync failed."""

    def abort(self, error: Exception) -> None:
        self.error = error
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        for path in self.temporary:
            remove_quietly(path)
        self.temporary.clear()

    def rename(self, source: str, target: str) -> None:
        with disk("rename", target):
            os.replace(source, target)
        self.temporary.remove(source)
        self.touched.add(os.path.dirname(target))


class Add(Operation):
    hidden_until_done = True

    def __init__(self, layout: Layout, entry: QueueEntry, content: bytes) -> None:
        super().__init__(layout)
        self.queue_id = entry.queue_id
        self.envelope = entry.to_json()
        self.content = content
        self.weight = len(content) + len(self.envelope)

    def prepare(self) -> None:
        self.content_tmp = self.write_temporary(".eml", self.content)
        self.envelope_tmp = self.write_temporary(".json", self.envelope)

    def commit(self) -> None:
        assert self.queue_id is not None
        content = self.layout.content(self.queue_id)
        envelope = self.layout.envelope(self.queue_id)
        if os.path.lexists(content) or os.path.lexists(envelope):
            raise StoreError(
                f"queue id {self.queue_id} is already in use in {self.layout.messages}",
                errno_code=errno.EEXIST,
                path=envelope,
            )
        self.rename(self.content_tmp, content)
        try:
            self.rename(self.envelope_tmp, envelope)
        except StoreError:
            remove_quietly(content)
            raise

    def rollback(self) -> None:
        assert self.queue_id is not None
        remove_quietly(self.layout.envelope(self.queue_id))
        remove_quietly(self.layout.content(self.queue_id))


class Update(Operation):
    def __init__(self, layout: Layout, entry: QueueEntry) -> None:
        super().__init__(layout)
        self.queue_id = entry.queue_id
        self.envelope = entry.to_json()
        self.weight = len(self.envelope)

    def prepare(self) -> None:
        self.envelope_tmp = self.write_temporary(".json", self.envelope)

    def commit(self) -> None:
        assert self.queue_id is not None
        envelope = self.layout.envelope(self.queue_id)
        # Never let an update resurrect a removed message as a bare envelope.
        if not (
            os.path.lexists(envelope)
            and os.path.lexists(self.layout.content(self.queue_id))
        ):
            raise MessageNotFound(self.queue_id)
        self.rename(self.envelope_tmp, envelope)


class Remove(Operation):
    def __init__(self, layout: Layout, queue_id: str) -> None:
        super().__init__(layout)
        self.queue_id = queue_id

    def commit(self) -> None:
        assert self.queue_id is not None
        envelope = self.layout.envelope(self.queue_id)
        try:
            with disk("remove", envelope):
                os.unlink(envelope)
        except StoreError as exc:
            if exc.errno != errno.ENOENT:
                raise
        # Without its envelope the content is an orphan that recovery removes.
        remove_quietly(self.layout.content(self.queue_id))
        self.touched.add(self.layout.messages)
