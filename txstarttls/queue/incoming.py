"""The ``incoming/`` drop: how other processes queue mail without the lock.

``txstarttls sendmail`` writes a complete message there with
:func:`deliver_to_incoming`, even while the relay is down, as two files:
content first, envelope last, so a visible ``incoming/ID.json`` always means
a complete message. The store's :class:`Adopt` operation later copies it
into one ``messages/ID.msg``, like any other message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from twisted.logger import Logger

from txstarttls.queue.entry import QueueEntry, check_size
from txstarttls.queue.errors import CorruptEntry, StoreError, disk
from txstarttls.queue.files import (
    READ_FLAGS,
    Layout,
    create_file,
    ensure_directory,
    fsync_directory,
    is_regular,
    older_than,
    read_small_file,
    remove_quietly,
    same_file,
    write_all,
)
from txstarttls.queue.ids import checked_id, valid_queue_id
from txstarttls.queue.messagefile import encode_head, open_regular
from txstarttls.queue.operations import Operation

# The spool logs as one component, whichever of its modules speaks.
log = Logger(namespace="txstarttls.queue")

STALE_INCOMING_SECONDS: Final = 3600.0
"""Leftovers of a crashed ``sendmail`` in ``incoming/`` older than this go."""
CANDIDATE_IDS: Final = 16
"""Ids tried for one drop before giving up until the next adoption."""
COPY_CHUNK: Final = 1024 * 1024


def deliver_to_incoming(
    directory: Path | str, entry: QueueEntry, content: bytes, *, durable: bool = True
) -> None:
    """Drop a complete message into ``DIR/incoming/`` for the relay to adopt.

    Blocking, and it needs no lock, so ``txstarttls sendmail`` works while
    the relay is down. Content is committed first and the envelope last,
    each fsynced, then the directory: a visible ``ID.json`` means complete.
    """
    checked_id(entry.queue_id)
    check_size(entry, content)
    root = Path(directory)
    incoming = root / "incoming"
    with disk("create directory", str(incoming)):
        if not root.is_dir():
            root.mkdir(mode=0o700, parents=True)
        ensure_directory(incoming, durable)
    stem = f"{incoming}/{entry.queue_id}"
    hidden = f"{incoming}/.{entry.queue_id}.{os.getpid()}"
    temporary: list[str] = []
    committed: list[str] = []
    try:
        for suffix, data in ((".eml", content), (".json", entry.to_json())):
            tmp = f"{hidden}{suffix}.tmp"
            with disk("write", tmp):
                fd = create_file(tmp, data)
                temporary.append(tmp)
                try:
                    if durable:
                        os.fsync(fd)
                finally:
                    os.close(fd)
        for tmp, suffix in zip(temporary, (".eml", ".json"), strict=True):
            # link() refuses to replace an existing file, unlike rename().
            with disk("rename", stem + suffix):
                os.link(tmp, stem + suffix)
            committed.append(stem + suffix)
    except BaseException:
        for path in reversed(committed):
            remove_quietly(path)
        raise
    finally:
        for path in temporary:
            remove_quietly(path)
    if durable:
        with disk("fsync", str(incoming)):
            fsync_directory(str(incoming))


@dataclass(slots=True)
class Adoption:
    """One message in ``incoming/`` and the id it gets in ``messages/``."""

    queue_id: str
    source_content: str
    source_envelope: str
    target_id: str = ""
    message_tmp: str | None = None
    committed: str | None = None


def candidate_ids(queue_id: str, envelope: bytes) -> Iterator[str]:
    """The drop's own id, then others derived from its envelope alone.

    Derived, not random: after a crash between the copy and the unlinking of
    the drop, the next adoption tries the same ids in the same order and
    finds the copy it made, rather than queueing the message twice.
    """
    yield queue_id
    for number in range(1, CANDIDATE_IDS):
        digest = hashlib.sha256(envelope + b"/%d" % number).hexdigest()
        yield queue_id[:13] + digest[:5].upper()


class Adopt(Operation):
    """Take over complete messages from ``incoming/``.

    Each is copied into a new ``messages/ID.msg`` (fsynced, renamed in,
    directory fsynced) before its ``incoming/`` names go. A crash in between
    leaves the message in both places; the next adoption finds the copy
    identical, octet for octet, and only unlinks the drop.
    """

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        self.adoptions: list[Adoption] = []
        self.duplicates: list[Adoption] = []
        self.to_quarantine: list[str] = []
        self.stale: list[str] = []
        self.result = []

    def prepare(self) -> None:
        incoming = self.layout.incoming
        with disk("scan", incoming):
            self.scan(incoming, set(os.listdir(incoming)))

    def scan(self, incoming: str, names: set[str]) -> None:
        for name in sorted(names):
            path = f"{incoming}/{name}"
            stem, _, suffix = name.partition(".")
            if name.startswith(".") or (
                suffix == "eml" and f"{stem}.json" not in names
            ):
                if older_than(path, STALE_INCOMING_SECONDS):
                    self.stale.append(path)
            elif suffix == "json" and valid_queue_id(stem):
                self.plan(stem)

    def plan(self, queue_id: str) -> None:
        incoming = self.layout.incoming
        adoption = Adoption(
            queue_id, f"{incoming}/{queue_id}.eml", f"{incoming}/{queue_id}.json"
        )
        if not is_regular(adoption.source_content):
            self.to_quarantine.append(adoption.source_envelope)
            return
        try:
            envelope = read_small_file(adoption.source_envelope)
            entry = QueueEntry.from_json(envelope)
            if entry.queue_id != queue_id:
                raise CorruptEntry(f"envelope names {entry.queue_id}")
            if entry.size != os.lstat(adoption.source_content).st_size:
                raise CorruptEntry("content size differs from the envelope's")
            self.choose_target(adoption, entry, envelope)
        except CorruptEntry as exc:
            log.error(
                "queue: incoming message {queue_id} is corrupt ({reason}); "
                "moving it to corrupt/",
                queue_id=queue_id,
                reason=str(exc),
            )
            self.to_quarantine += [adoption.source_content, adoption.source_envelope]
        except OSError as exc:
            log.error(
                "queue: cannot read incoming message {queue_id}: {error}",
                queue_id=queue_id,
                error=exc,
            )

    def choose_target(
        self, adoption: Adoption, entry: QueueEntry, envelope: bytes
    ) -> None:
        """Copy the drop to the first free id, unless it is there already."""
        for target_id in candidate_ids(adoption.queue_id, envelope):
            adoption.target_id = target_id
            renamed = dataclasses.replace(entry, queue_id=target_id)
            head = encode_head(renamed.to_json())
            message = self.layout.message(target_id)
            if os.path.lexists(message):
                if holds(message, head, adoption.source_content):
                    self.duplicates.append(adoption)
                    return
            elif os.path.lexists(self.layout.envelope(target_id)):
                if self.adopted_by_older_relay(adoption, target_id):
                    self.duplicates.append(adoption)
                    return
            elif not os.path.lexists(self.layout.content(target_id)):
                adoption.message_tmp = self.copy(adoption, head, entry.size)
                self.adoptions.append(adoption)
                return
        log.error(
            "queue: no free queue id for incoming message {queue_id}; will retry",
            queue_id=adoption.queue_id,
        )

    def adopted_by_older_relay(self, adoption: Adoption, target_id: str) -> bool:
        """Whether a relay of the two-file layout adopted this drop (by hard
        links) and crashed before unlinking it: the same inode in messages/."""
        if target_id != adoption.queue_id:
            return False
        if same_file(adoption.source_content, self.layout.content(target_id)):
            return True
        for name in os.listdir(self.layout.messages):
            stem = name.removesuffix(".eml")
            if (
                valid_queue_id(stem)
                and stem != target_id
                and same_file(adoption.source_content, f"{self.layout.messages}/{name}")
                and os.path.lexists(self.layout.envelope(stem))
            ):
                return True
        return False

    def copy(self, adoption: Adoption, head: bytes, size: int) -> str:
        """Write header, envelope and content to a new temporary file."""
        # Opened first: a drop deleted meanwhile is an OSError for plan().
        with os.fdopen(os.open(adoption.source_content, READ_FLAGS), "rb", 0) as source:
            path = self.temporary_path(".msg", adoption.target_id)
            with disk("write", path):
                fd = create_file(path, head)
                try:
                    copied = copy_into(fd, source)
                except BaseException:
                    remove_quietly(path)
                    raise
                finally:
                    os.close(fd)
        if copied != size:
            remove_quietly(path)
            raise CorruptEntry(f"content changed while being adopted ({copied} octets)")
        self.temporary.append(path)
        return path

    def sync(self, durable: bool) -> None:
        # Each copy was closed once written, so no descriptor is held per drop.
        if durable:
            for path in self.temporary:
                with disk("fsync", path):
                    fd = os.open(path, READ_FLAGS)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)

    def commit(self) -> None:
        for path in self.stale:
            if remove_quietly(path):
                log.info("queue: removed stale incoming file {path}", path=path)
                self.touched.add(self.layout.incoming)
        for path in self.to_quarantine:
            with disk("quarantine", path):
                self.layout.quarantine(path)
            self.touched |= {self.layout.incoming, self.layout.corrupt}
        for adoption in list(self.adoptions):
            try:
                self.place(adoption)
            except StoreError as exc:
                log.error(
                    "queue: cannot adopt incoming message {queue_id}: {error}",
                    queue_id=adoption.queue_id,
                    error=str(exc),
                )
                self.adoptions.remove(adoption)
                if adoption.message_tmp in self.temporary:
                    self.temporary.remove(adoption.message_tmp)
                    remove_quietly(adoption.message_tmp)

    def place(self, adoption: Adoption) -> None:
        assert adoption.message_tmp is not None
        adoption.committed = self.rename_new_message(
            adoption.message_tmp,
            adoption.target_id,
            f"queue id {adoption.target_id} was taken meanwhile; will retry",
        )

    def rollback(self) -> None:
        for adoption in self.adoptions:
            if adoption.committed is not None:
                remove_quietly(adoption.committed)
        self.adoptions.clear()

    def finish(self) -> None:
        adopted = []
        for adoption in self.adoptions + self.duplicates:
            # Envelope first: a crash in between leaves an orphan .eml, which
            # ages out, rather than an envelope without content to quarantine.
            remove_quietly(adoption.source_envelope)
            remove_quietly(adoption.source_content)
            self.touched.add(self.layout.incoming)
            if adoption in self.adoptions:
                adopted.append(adoption.target_id)
                log.info(
                    "queue: adopted {queue_id} from incoming/",
                    queue_id=adoption.target_id,
                )
        self.result = adopted


def copy_into(fd: int, source: BinaryIO) -> int:
    """Append what is left of ``source`` to ``fd``; the number of octets."""
    copied = 0
    while chunk := source.read(COPY_CHUNK):
        write_all(fd, chunk)
        copied += len(chunk)
    return copied


def holds(message: str, head: bytes, source: str) -> bool:
    """Whether ``message`` is exactly ``head`` followed by the file ``source``."""
    try:
        with open_regular(message) as copy, open_regular(source) as original:
            if copy.read(len(head)) != head:
                return False
            while True:
                expected = original.read(COPY_CHUNK)
                if copy.read(len(expected) or 1) != expected:
                    return False
                if not expected:
                    return True
    except (OSError, CorruptEntry):
        return False
