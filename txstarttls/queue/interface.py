"""What any message store promises the server and the queue runner.

The relay talks to its spool only through :class:`IMessageStore`, so
another store (in memory for tests, or on other storage) can be plugged in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from twisted.internet.defer import Deferred
from zope.interface import Interface

from txstarttls.queue.entry import QueueEntry


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What :meth:`IMessageStore.recover` found and did at start-up."""

    kept: tuple[str, ...] = ()
    temporary_removed: int = 0
    unacknowledged_removed: tuple[str, ...] = ()
    removal_leftovers: tuple[str, ...] = ()
    """Envelopes whose message a removal cut short had already unlinked."""
    quarantined: tuple[str, ...] = ()
    """Queue ids (or odd file names) moved to ``corrupt/`` for a human."""
    adopted: tuple[str, ...] = ()


class IMessageStore(Interface):
    """Where accepted mail waits for delivery; another store can be plugged in."""

    def add(entry: QueueEntry, content: bytes) -> Deferred[None]:
        """Queue a new message; fires once content, envelope and directory
        entries are durable, and only then may the server answer 250."""

    def update(entry: QueueEntry) -> Deferred[None]:
        """Atomically and durably replace the envelope of a queued message."""

    def remove(queue_id: str) -> Deferred[None]:
        """Durably drop a message; removing one that is gone is not an error."""

    def get(queue_id: str) -> QueueEntry:
        """Read the envelope now (small and synchronous)."""

    def open_content(queue_id: str) -> BinaryIO:
        """The content as a file open at its first octet, for streaming it out;
        the caller closes it. MessageNotFound when it is gone."""

    def content_path(queue_id: str) -> Path | None:
        """A file holding exactly the content, or None: the filesystem store
        has one only for messages queued in its older two-file layout (use
        :meth:`open_content` instead); a store in memory has none."""

    def read_content(queue_id: str) -> bytes:
        """The whole content, for small messages and tests."""

    def queue_ids() -> list[str]:
        """Acknowledged messages, oldest first."""

    def adopt_incoming() -> Deferred[list[str]]:
        """Take over messages other processes dropped in ``incoming/``."""

    def recover() -> RecoveryReport:
        """At start-up, before serving: make the spool consistent again."""

    def close() -> Deferred[None]:
        """Finish pending writes, stop the writer and release the queue."""
