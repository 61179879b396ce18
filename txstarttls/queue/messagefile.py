"""One file per message, and reading a queued message in either layout.

``messages/ID.msg`` is ``TXQ1 <envelope length>\\n``, the envelope as
:meth:`QueueEntry.to_json` wrote it when the message arrived, then the
content: creating one file per accepted message instead of two is most of
what an add costs. An update writes ``ID.json`` beside it, which overrides
the embedded envelope from then on. A spool written before this layout holds
``ID.eml`` and ``ID.json`` instead; every reader here takes both, and needs no
lock, so the operator's commands use it beside a running relay.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from txstarttls.queue.entry import QueueEntry
from txstarttls.queue.errors import CorruptEntry, MessageNotFound
from txstarttls.queue.files import (
    MAX_ENVELOPE_BYTES,
    READ_FLAGS,
    Layout,
    read_small_file,
)
from txstarttls.queue.ids import checked_id

MAGIC: Final = b"TXQ1 "
MAX_HEADER: Final = len(MAGIC) + len(str(MAX_ENVELOPE_BYTES)) + 1
FIRST_READ: Final = 8192


def encode_head(envelope: bytes) -> bytes:
    """The header line and the envelope: what precedes the content."""
    return MAGIC + str(len(envelope)).encode("ascii") + b"\n" + envelope


@dataclass(frozen=True, slots=True)
class Head:
    """What precedes the content of a message file."""

    envelope: bytes
    content_offset: int


def open_regular(path: str) -> BinaryIO:
    """``path`` opened for reading, never through a link; a device is corrupt."""
    file = os.fdopen(os.open(path, READ_FLAGS), "rb")
    if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        file.close()
        raise CorruptEntry(f"{path} is not a regular file")
    return file


def read_head(file: BinaryIO, path: str) -> Head:
    """Parse the header and read the embedded envelope, from the file's start."""
    data = file.read(FIRST_READ)
    end = data.find(b"\n", 0, MAX_HEADER)
    digits = data[len(MAGIC) : end]
    if (
        end < 0
        or not data.startswith(MAGIC)
        or not digits.isdigit()
        or (digits.startswith(b"0") and digits != b"0")
    ):
        raise CorruptEntry(f"{path} does not start with a queue file header")
    length = int(digits)
    if length > MAX_ENVELOPE_BYTES:
        raise CorruptEntry(
            f"{path} claims an envelope over {MAX_ENVELOPE_BYTES} octets"
        )
    offset = end + 1 + length
    envelope = data[end + 1 : offset]
    if len(envelope) < length:
        envelope += file.read(length - len(envelope))
    if len(envelope) != length:
        raise CorruptEntry(f"{path} ends inside its envelope")
    return Head(envelope, offset)


def decode(data: bytes, path: str, queue_id: str) -> QueueEntry:
    """The envelope in ``data``, which must name ``queue_id``."""
    entry = QueueEntry.from_json(data)
    if entry.queue_id != queue_id:
        raise CorruptEntry(f"envelope {path} names message {entry.queue_id}")
    return entry


def read_entry(layout: Layout, queue_id: str) -> QueueEntry:
    """The current envelope of a queued message, in either layout.

    MessageNotFound when it is gone (or being removed), CorruptEntry when it
    does not decode exactly, OSError for anything else. ``ID.json`` is read
    first: an update renames it into place whole, so a reader sees the
    envelope before or after an update, never a mixture.
    """
    checked_id(queue_id)
    override = layout.envelope(queue_id)
    try:
        data = read_small_file(override)
    except FileNotFoundError:
        pass
    else:
        entry = decode(data, override, queue_id)
        # Removal unlinks the message file first and the envelope after.
        if not (
            os.path.lexists(layout.message(queue_id))
            or os.path.lexists(layout.content(queue_id))
        ):
            raise MessageNotFound(queue_id)
        return entry
    path = layout.message(queue_id)
    try:
        with open_regular(path) as file:
            head = read_head(file, path)
    except FileNotFoundError:
        raise MessageNotFound(queue_id) from None
    return decode(head.envelope, path, queue_id)


def open_content(layout: Layout, queue_id: str) -> tuple[BinaryIO, str]:
    """The content of a queued message, open at its first octet, and its path.

    Reading to the end of the file gives exactly the content.
    """
    path = layout.message(queue_id)
    try:
        file = open_regular(path)
    except FileNotFoundError:
        path = layout.content(queue_id)
        try:
            return open_regular(path), path
        except FileNotFoundError:
            raise MessageNotFound(queue_id) from None
    try:
        file.seek(read_head(file, path).content_offset)
    except BaseException:
        file.close()
        raise
    return file, path


def check_message(layout: Layout, queue_id: str, *, updated: bool) -> str | None:
    """Why the single-file message ``queue_id`` cannot be kept, or None.

    ``updated``: whether an ``ID.json`` lies beside it, to be checked too.
    """
    path = layout.message(queue_id)
    try:
        with open_regular(path) as file:
            head = read_head(file, path)
            size = os.fstat(file.fileno()).st_size - head.content_offset
        entries = [decode(head.envelope, path, queue_id)]
        if updated:
            override = layout.envelope(queue_id)
            entries.append(decode(read_small_file(override), override, queue_id))
    except CorruptEntry as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    for entry in entries:
        if entry.size != size:
            return f"content has {size} octets, envelope says {entry.size}"
    return None


def read_queued_entry(directory: Path | str, queue_id: str) -> QueueEntry:
    """:func:`read_entry` for a queue directory, without the store or its lock.

    For readers beside a running relay (``mailq``, ``show``): MessageNotFound
    when the message is not (or no longer) in ``messages/``.
    """
    return read_entry(Layout(Path(directory)), queue_id)


def open_queued_content(directory: Path | str, queue_id: str) -> BinaryIO:
    """:func:`open_content` for a queue directory, without the store or its lock."""
    return open_content(Layout(Path(directory)), queue_id)[0]
