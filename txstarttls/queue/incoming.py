"""The ``incoming/`` drop: how other processes queue mail without the lock.

``txstarttls sendmail`` writes a complete message there with
:func:`deliver_to_incoming`, even while the relay is down; the store's
:class:`Adopt` operation later moves it into ``messages/``. Content is
committed before the envelope in both places, so a visible ``ID.json``
always means a complete message.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from twisted.logger import Logger

from txstarttls.queue.entry import QueueEntry, check_size
from txstarttls.queue.errors import CorruptEntry, StoreError, disk
from txstarttls.queue.files import (
    Layout,
    create_file,
    ensure_directory,
    fsync_directory,
    is_regular,
    older_than,
    read_small_file,
    remove_quietly,
    same_file,
)
from txstarttls.queue.ids import checked_id, new_queue_id, valid_queue_id
from txstarttls.queue.operations import Operation

# The spool logs as one component, whichever of its modules speaks.
log = Logger(namespace="txstarttls.queue")

STALE_INCOMING_SECONDS: Final = 3600.0
"""Leftovers of a crashed ``sendmail`` in ``incoming/`` older than this go."""


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
    target_id: str
    source_content: str
    source_envelope: str
    envelope_tmp: str | None = None
    linked: tuple[str, ...] = ()


class Adopt(Operation):
    """Take over complete messages from ``incoming/``.

    Hard links, not renames: the message is in ``messages/`` (and durable)
    before its ``incoming/`` names go, so a crash in between leaves two names
    for one file, which the next adoption recognises, never zero.
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
            queue_id,
            queue_id,
            f"{incoming}/{queue_id}.eml",
            f"{incoming}/{queue_id}.json",
        )
        if not is_regular(adoption.source_content):
            self.to_quarantine.append(adoption.source_envelope)
            return
        try:
            entry = QueueEntry.from_json(read_small_file(adoption.source_envelope))
            if entry.queue_id != queue_id:
                raise CorruptEntry(f"envelope names {entry.queue_id}")
            if entry.size != os.lstat(adoption.source_content).st_size:
                raise CorruptEntry("content size differs from the envelope's")
        except CorruptEntry as exc:
            log.error(
                "queue: incoming message {queue_id} is corrupt ({reason}); "
                "moving it to corrupt/",
                queue_id=queue_id,
                reason=str(exc),
            )
            self.to_quarantine += [adoption.source_content, adoption.source_envelope]
            return
        except OSError as exc:
            log.error(
                "queue: cannot read incoming message {queue_id}: {error}",
                queue_id=queue_id,
                error=exc,
            )
            return
        adopted_as = self.already_adopted(adoption)
        if adopted_as is not None:
            adoption.target_id = adopted_as
            self.duplicates.append(adoption)
            return
        if os.path.lexists(self.layout.envelope(queue_id)):
            # Another message got the same id: this one gets a new one.
            adoption.target_id = new_queue_id()
            replaced = dataclasses.replace(entry, queue_id=adoption.target_id)
            adoption.envelope_tmp = self.write_temporary(".json", replaced.to_json())
        self.adoptions.append(adoption)

    def already_adopted(self, adoption: Adoption) -> str | None:
        """The id this incoming message already has in ``messages/``, if any."""
        envelope = self.layout.envelope(adoption.queue_id)
        if not os.path.lexists(envelope):
            return None
        if same_file(adoption.source_content, self.layout.content(adoption.queue_id)):
            return adoption.queue_id
        for name in os.listdir(self.layout.messages):
            stem = name.removesuffix(".eml")
            if (
                valid_queue_id(stem)
                and stem != adoption.queue_id
                and same_file(adoption.source_content, f"{self.layout.messages}/{name}")
                and os.path.lexists(self.layout.envelope(stem))
            ):
                return stem
        return None

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
                self.link(adoption)
            except StoreError as exc:
                log.error(
                    "queue: cannot adopt incoming message {queue_id}: {error}",
                    queue_id=adoption.queue_id,
                    error=str(exc),
                )
                self.adoptions.remove(adoption)

    def link(self, adoption: Adoption) -> None:
        content = self.layout.content(adoption.target_id)
        envelope = self.layout.envelope(adoption.target_id)
        if os.path.lexists(envelope):
            raise StoreError(
                f"queue id {adoption.target_id} was taken meanwhile; will retry",
                errno_code=errno.EEXIST,
                path=envelope,
            )
        if os.path.lexists(content):
            # An orphan from a crash during an earlier adoption.
            remove_quietly(content)
        linked: list[str] = []
        try:
            with disk("link", content):
                os.link(adoption.source_content, content)
            linked.append(content)
            if adoption.envelope_tmp is None:
                with disk("link", envelope):
                    os.link(adoption.source_envelope, envelope)
                linked.append(envelope)
            else:
                self.rename(adoption.envelope_tmp, envelope)
                linked.append(envelope)
        except StoreError:
            for path in reversed(linked):
                remove_quietly(path)
            raise
        adoption.linked = tuple(linked)
        self.touched.add(self.layout.messages)

    def rollback(self) -> None:
        for adoption in self.adoptions:
            for path in reversed(adoption.linked):
                remove_quietly(path)
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
