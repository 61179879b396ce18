"""The writes the store's writer thread runs, each as a few batch phases.

An operation never fsyncs a directory itself: the writer does that once per
batch for every directory the batch touched (group commit), and only then
does an operation's Deferred fire.

Adding a message creates one file, ``tmp/ID.N.msg.tmp`` (header, envelope,
content), fsyncs it and renames it to ``messages/ID.msg``: that rename is the
commit point. An update renames a new ``ID.json`` over the old one. A
removal unlinks ``ID.msg`` (the commit point), and only once the directory
is fsynced its ``ID.json``: were the envelope to go first, a crash could
bring the message back with the envelope it arrived with, undoing updates
already acknowledged. Messages of the older two-file layout (``ID.eml`` and
``ID.json``) are updated and removed as that layout always was.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import threading
from typing import Any

from twisted.internet.defer import Deferred

from txstarttls.queue import files
from txstarttls.queue.entry import QueueEntry
from txstarttls.queue.errors import MessageNotFound, StoreError, disk
from txstarttls.queue.files import Layout, create_file, remove_quietly
from txstarttls.queue.messagefile import encode_head

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

    def temporary_path(self, suffix: str, name: str | None = None) -> str:
        name = name or self.queue_id or "adopt"
        return f"{self.layout.tmp}/{name}.{next(_sequence)}{suffix}.tmp"

    def write_temporary(self, suffix: str, *parts: bytes) -> str:
        path = self.temporary_path(suffix)
        with disk("write", path):
            self.fds.append(create_file(path, *parts))
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

    def rename_new_message(self, source: str, queue_id: str, taken: str) -> str:
        """Rename ``source`` to ``messages/ID.msg``; StoreError ``taken`` (EEXIST)
        rather than replace a message or envelope already there."""
        message = self.layout.message(queue_id)
        try:
            # An envelope alone is a message of the older two-file layout.
            if os.path.lexists(self.layout.envelope(queue_id)):
                raise FileExistsError(errno.EEXIST, taken, message)
            # Looked up at call time, like the os calls, so tests can wrap it.
            files.rename_no_replace(source, message)
        except FileExistsError:
            raise StoreError(taken, errno_code=errno.EEXIST, path=message) from None
        except OSError as exc:
            raise StoreError.from_os_error("rename", exc, message) from exc
        self._placed(source, message)
        return message

    def rename(self, source: str, target: str) -> None:
        with disk("rename", target):
            os.replace(source, target)
        self._placed(source, target)

    def _placed(self, source: str, target: str) -> None:
        self.temporary.remove(source)
        self.touched.add(os.path.dirname(target))


class Add(Operation):
    hidden_until_done = True

    def __init__(self, layout: Layout, entry: QueueEntry, content: bytes) -> None:
        super().__init__(layout)
        self.queue_id = entry.queue_id
        self.head = encode_head(entry.to_json())
        self.content = content
        self.weight = len(content) + len(self.head)

    def prepare(self) -> None:
        self.message_tmp = self.write_temporary(".msg", self.head, self.content)

    def commit(self) -> None:
        assert self.queue_id is not None
        self.rename_new_message(
            self.message_tmp,
            self.queue_id,
            f"queue id {self.queue_id} is already in use in {self.layout.messages}",
        )

    def rollback(self) -> None:
        assert self.queue_id is not None
        remove_quietly(self.layout.message(self.queue_id))


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
            os.path.lexists(self.layout.message(self.queue_id))
            or (
                os.path.lexists(envelope)
                and os.path.lexists(self.layout.content(self.queue_id))
            )
        ):
            raise MessageNotFound(self.queue_id)
        self.rename(self.envelope_tmp, envelope)


class Remove(Operation):
    def __init__(self, layout: Layout, queue_id: str) -> None:
        super().__init__(layout)
        self.queue_id = queue_id
        self.single_file = False

    def commit(self) -> None:
        assert self.queue_id is not None
        message = self.layout.message(self.queue_id)
        try:
            with disk("remove", message):
                os.unlink(message)
            self.single_file = True
        except StoreError as exc:
            if exc.errno != errno.ENOENT:
                raise
            self.remove_two_files()
        self.touched.add(self.layout.messages)

    def remove_two_files(self) -> None:
        """The older layout: envelope first, then the content (an orphan)."""
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

    def finish(self) -> None:
        assert self.queue_id is not None
        # ID.msg is durably gone now; an updated message leaves its envelope.
        if self.single_file and remove_quietly(self.layout.envelope(self.queue_id)):
            self.touched.add(self.layout.messages)
