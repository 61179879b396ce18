"""An IMessageStore in memory with synchronous Deferreds, for runner tests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from txstarttls.queue import (
    IMessageStore,
    MessageNotFound,
    QueueEntry,
    RecoveryReport,
)


@implementer(IMessageStore)
class MemoryStore:
    """Keeps entries and contents in dicts; records every write."""

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self._clock = clock
        self.entries: dict[str, QueueEntry] = {}
        self.contents: dict[str, bytes] = {}
        self.incoming: list[tuple[QueueEntry, bytes]] = []
        self.writes: list[tuple[str, str]] = []

    def add(self, entry: QueueEntry, content: bytes) -> Deferred[None]:
        self.entries[entry.queue_id] = entry
        self.contents[entry.queue_id] = content
        self.writes.append(("add", entry.queue_id))
        return self._done()

    def update(self, entry: QueueEntry) -> Deferred[None]:
        if entry.queue_id not in self.entries:
            raise MessageNotFound(entry.queue_id)
        self.entries[entry.queue_id] = entry
        self.writes.append(("update", entry.queue_id))
        return self._done()

    def remove(self, queue_id: str) -> Deferred[None]:
        self.entries.pop(queue_id, None)
        self.contents.pop(queue_id, None)
        self.writes.append(("remove", queue_id))
        return self._done()

    def _done(self) -> Deferred[None]:
        """Fire now, or (with a clock) on its next tick, as a disk write would."""
        if self._clock is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._clock.callLater(0, done.callback, None)
        return done

    def get(self, queue_id: str) -> QueueEntry:
        try:
            return self.entries[queue_id]
        except KeyError:
            raise MessageNotFound(queue_id) from None

    def open_content(self, queue_id: str) -> BinaryIO:
        return io.BytesIO(self.read_content(queue_id))

    def content_path(self, queue_id: str) -> Path | None:
        return None

    def read_content(self, queue_id: str) -> bytes:
        try:
            return self.contents[queue_id]
        except KeyError:
            raise MessageNotFound(queue_id) from None

    def queue_ids(self) -> list[str]:
        return sorted(self.entries)

    def adopt_incoming(self) -> Deferred[list[str]]:
        adopted = []
        while self.incoming:
            entry, content = self.incoming.pop(0)
            self.entries[entry.queue_id] = entry
            self.contents[entry.queue_id] = content
            adopted.append(entry.queue_id)
        return succeed(adopted)

    def recover(self) -> RecoveryReport:
        return RecoveryReport(kept=tuple(self.entries))

    def close(self) -> Deferred[None]:
        return succeed(None)
