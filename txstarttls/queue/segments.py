"""Segment files: many records per file, one write and one fdatasync per batch.

The groundwork of a log-structured store (not used by the filesystem store
yet). A file per message costs the writer thread seven system calls and a new
inode per message; appending a whole batch to a segment costs one ``writev``
and one ``fdatasync``, and no inode at all (docs/benchmarks.md, issue 3).

A segment is ``NNNNNNNNNNNN.seg`` in its directory, records back to back::

    TXR1 <kind> <queue id> <length, 8 hex> <CRC-32, 8 hex>\\n<payload>

``kind`` is ``A`` (a message: the payload is what ``messages/ID.msg`` would
hold) or ``T`` (a tombstone: the message is gone; no payload). The CRC covers
the kind, the id and the payload. A crash, or a write that failed (the
writer then moves on to a new segment), can leave a segment's last batch
incomplete, or (a file system that extended the file before its data reached
the disk) zeros in its place: :func:`scan` stops at the first record that is
not whole and sound, and says what it found there. A cut-short last batch
was never acknowledged; whether a bad record is that or damage is for
recovery to judge, by where it sits.
"""

from __future__ import annotations

import io
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from txstarttls.queue.files import READ_FLAGS, fsync_directory
from txstarttls.queue.ids import checked_id

MAGIC: Final = b"TXR1 "
ADD: Final = b"A"
TOMBSTONE: Final = b"T"
KINDS: Final = frozenset({ADD, TOMBSTONE})
HEADER_SIZE: Final = len(MAGIC) + 1 + 1 + 18 + 1 + 8 + 1 + 8 + 1
MAX_PAYLOAD: Final = 0xFFFFFFFF
SEGMENT_LIMIT: Final = 64 * 1024 * 1024
"""A segment takes no new batch once it is this large."""
SCAN_CHUNK: Final = 1024 * 1024
IOV_MAX: Final = 1024
CREATE_FLAGS: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
)

_HEADER: Final = re.compile(
    rb"TXR1 ([AT]) ([0-9A-F]{18}) ([0-9a-f]{8}) ([0-9a-f]{8})\n", re.ASCII
)
_SEGMENT_NAME: Final = re.compile(r"([0-9]{12})\.seg")


@dataclass(frozen=True, slots=True)
class Record:
    """One record of a segment: where its payload lies."""

    kind: bytes
    queue_id: str
    offset: int
    """Of the payload, from the start of the segment."""
    length: int


@dataclass(frozen=True, slots=True)
class Scan:
    """What :func:`scan` found in one segment."""

    records: tuple[Record, ...]
    valid_end: int
    """Where the last whole record ends: the segment's sound length."""
    problem: str | None
    """Why the scan stopped before the end of the file, or None."""


def _crc(kind: bytes, queue_id: bytes, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(queue_id, zlib.crc32(kind)))


def encode_record(kind: bytes, queue_id: str, payload: bytes = b"") -> bytes:
    """The bytes of one record; ValueError before anything can be written."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}")
    if kind == TOMBSTONE and payload:
        raise ValueError("a tombstone has no payload")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a record holds at most {MAX_PAYLOAD} octets")
    identifier = checked_id(queue_id).encode("ascii")
    crc = _crc(kind, identifier, payload)
    header = b"%s%s %s %08x %08x\n" % (MAGIC, kind, identifier, len(payload), crc)
    return header + payload


def segment_name(sequence: int) -> str:
    return f"{sequence:012d}.seg"


def segment_numbers(directory: Path) -> list[int]:
    """The sequence numbers of the segments in ``directory``, oldest first."""
    numbers = []
    for name in os.listdir(directory):
        found = _SEGMENT_NAME.fullmatch(name)
        if found:
            numbers.append(int(found.group(1)))
    return sorted(numbers)


def scan(path: Path | str) -> Scan:
    """Every whole, sound record of a segment, in order."""
    records: list[Record] = []
    fd = os.open(path, READ_FLAGS)
    try:
        size = os.fstat(fd).st_size
        position = 0
        while position < size:
            problem = _check_record(fd, position, size, records)
            if problem is not None:
                return Scan(tuple(records), position, problem)
            position = records[-1].offset + records[-1].length
        return Scan(tuple(records), position, None)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Logged:
    """Where a live message's record lies: its segment and the record."""

    sequence: int
    record: Record


@dataclass(frozen=True, slots=True)
class LogState:
    """What the segments of a directory hold, read oldest first."""

    live: dict[str, Logged]
    """Messages added and not removed, by queue id."""
    removed: frozenset[str]
    """Queue ids with a tombstone (their record may be gone with its segment)."""
    sequences: tuple[int, ...]
    """The segments read, oldest first."""
    problems: tuple[tuple[int, str], ...]
    """(segment, what :func:`scan` said) for each segment that ended early."""


def read_log(directory: Path) -> LogState:
    """Every segment in ``directory``, oldest first: who is live, who removed.

    A tombstone removes the message whether its record is in the same
    segment or an older one. A segment deleted meanwhile (by a relay freeing
    it while this reads) is skipped: everything in it was removed.
    """
    live: dict[str, Logged] = {}
    removed: set[str] = set()
    read: list[int] = []
    problems: list[tuple[int, str]] = []
    for sequence in segment_numbers(directory):
        try:
            found = scan(directory / segment_name(sequence))
        except FileNotFoundError:
            continue
        read.append(sequence)
        if found.problem is not None:
            problems.append((sequence, found.problem))
        for record in found.records:
            if record.kind == ADD:
                live[record.queue_id] = Logged(sequence, record)
            else:
                live.pop(record.queue_id, None)
                removed.add(record.queue_id)
    return LogState(live, frozenset(removed), tuple(read), tuple(problems))


def _check_record(
    fd: int, position: int, size: int, records: list[Record]
) -> str | None:
    """Append the record at ``position`` to ``records``, or say what is wrong."""
    if size - position < HEADER_SIZE:
        return "incomplete record header at the end"
    found = _HEADER.fullmatch(os.pread(fd, HEADER_SIZE, position))
    if found is None:
        return "no record header"
    kind, identifier, length_hex, crc_hex = found.groups()
    length = int(length_hex, 16)
    start = position + HEADER_SIZE
    if start + length > size:
        return "incomplete record at the end"
    if kind == TOMBSTONE and length:
        return "a tombstone with a payload"
    if _payload_crc(fd, kind, identifier, start, length) != int(crc_hex, 16):
        return "checksum mismatch"
    records.append(Record(kind, identifier.decode("ascii"), start, length))
    return None


def _payload_crc(
    fd: int, kind: bytes, identifier: bytes, start: int, length: int
) -> int:
    crc = zlib.crc32(identifier, zlib.crc32(kind))
    done = 0
    while done < length:
        chunk = os.pread(fd, min(SCAN_CHUNK, length - done), start + done)
        if not chunk:
            return -1
        crc = zlib.crc32(chunk, crc)
        done += len(chunk)
    return crc


def open_payload(path: Path | str, record: Record) -> BinaryIO:
    """The payload of ``record`` as a file of its own: reads end where it ends.

    For streaming a large message out of its segment; seekable within the
    payload, so a reader can skip a message's header and envelope.
    """
    fd = os.open(path, READ_FLAGS)
    return io.BufferedReader(_Slice(fd, record.offset, record.length))


class _Slice(io.RawIOBase):
    """A window on an open file: ``length`` octets from ``start``."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__()
        self._fd = fd
        self._start = start
        self._length = length
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self._length - self._position)
        if wanted <= 0:
            return 0
        data = os.pread(self._fd, wanted, self._start + self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}
        position = base[whence] + offset
        if position < 0:
            raise ValueError(f"negative seek position {position}")
        self._position = position
        return position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class SegmentWriter:
    """Appends batches of records to the newest segment of one directory.

    Used from one thread. A new segment is created exclusively, with the next
    free sequence number, so writers in several processes never share one;
    with ``durable`` its directory entry is fsynced before its first batch
    is acknowledged.
    """

    def __init__(
        self, directory: Path, *, durable: bool, limit: int = SEGMENT_LIMIT
    ) -> None:
        self.directory = directory
        self._durable = durable
        self._limit = limit
        self._fd: int | None = None
        self.sequence = 0
        self._size = 0

    def append(self, records: Sequence[bytes]) -> list[Record]:
        """Write ``records`` (from :func:`encode_record`) as one batch.

        Returns where each landed. Durable (one ``fdatasync``) when it returns,
        if the writer is; on OSError nothing of the batch may be relied on.
        """
        if not records:
            return []
        fd = self._segment()
        start = self._size
        total = sum(map(len, records))
        try:
            _write_all(fd, records, total)
            if self._durable:
                os.fdatasync(fd)
        except OSError:
            # The tail of this segment is now unknown: start a new one.
            self.close()
            raise
        self._size += total
        placed = []
        position = start
        for data in records:
            found = _HEADER.match(data)
            assert found is not None
            kind, identifier = found.group(1), found.group(2).decode("ascii")
            placed.append(
                Record(
                    kind, identifier, position + HEADER_SIZE, len(data) - HEADER_SIZE
                )
            )
            position += len(data)
        if self._size >= self._limit:
            self.close()
        return placed

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _segment(self) -> int:
        if self._fd is not None:
            return self._fd
        sequence = max(segment_numbers(self.directory), default=0) + 1
        while True:
            path = self.directory / segment_name(sequence)
            try:
                fd = os.open(path, CREATE_FLAGS, 0o600)
            except FileExistsError:
                sequence += 1
                continue
            break
        if self._durable:
            try:
                os.fsync(fd)
                fsync_directory(str(self.directory))
            except OSError:
                os.close(fd)
                raise
        self._fd, self.sequence, self._size = fd, sequence, 0
        return fd


def _write_all(fd: int, records: Sequence[bytes], total: int) -> None:
    """One ``writev`` for the batch, more only if the kernel takes less."""
    buffers: list[bytes | memoryview] = list(records)
    written = 0
    while written < total:
        done = os.writev(fd, buffers[:IOV_MAX])
        written += done
        while buffers and done >= len(buffers[0]):
            done -= len(buffers[0])
            buffers.pop(0)
        if done:
            buffers[0] = memoryview(buffers[0])[done:]
