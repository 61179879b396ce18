"""The relay's durable spool: a message is acknowledged only once it is on disk.

One message is two files in ``messages/``: ``ID.eml`` (the content) and
``ID.json`` (the envelope: strict JSON, never pickle). The envelope is renamed
in last, so its presence is the commit point and recovery after a crash
needs no log: an ``.eml`` without its ``.json`` was never acknowledged.

Every write goes through one writer thread that takes all pending operations
as a batch (group commit): it writes every file of the batch, starts their
writeback together so that each fsync finds little left to do, and fsyncs
each touched directory once for the whole batch. Throughput grows with
concurrent arrivals, and the reactor thread never waits on the disk.

Other processes (``txstarttls sendmail``) drop complete messages into
``incoming/`` with :func:`deliver_to_incoming`, without the store's lock; the
store adopts them into ``messages/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import itertools
import json
import math
import os
import re
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypedDict, Unpack

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from zope.interface import Interface, implementer

__all__ = [
    "BATCH_MAX_BYTES",
    "BATCH_MAX_OPERATIONS",
    "STATUSES",
    "CorruptEntry",
    "FilesystemStore",
    "IMessageStore",
    "InvalidQueueId",
    "MessageNotFound",
    "QueueEntry",
    "RecipientChanges",
    "RecipientState",
    "RecoveryReport",
    "StoreError",
    "StoreLocked",
    "deliver_to_incoming",
    "new_queue_id",
    "valid_queue_id",
]

log = Logger()

STATUSES: Final = frozenset({"pending", "delivered", "bounced", "expired"})
"""Recipient states; everything but ``pending`` is final."""

FORMAT_VERSION: Final = 1
BATCH_MAX_OPERATIONS: Final = 256
BATCH_MAX_BYTES: Final = 8 * 1024 * 1024
MAX_ENVELOPE_BYTES: Final = 16 * 1024 * 1024
STALE_INCOMING_SECONDS: Final = 3600.0
"""Leftovers of a crashed ``sendmail`` in ``incoming/`` older than this go."""

_QUEUE_ID: Final = re.compile(r"[0-9A-F]{18}")
_CREATE_FLAGS: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
)
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


# -- errors -------------------------------------------------------------------


def _brief(value: object) -> str:
    """A repr short enough for a one-line error message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class CorruptEntry(ValueError):
    """An envelope that does not decode exactly: quarantine it, never guess."""


class InvalidQueueId(ValueError):
    """Not one of our queue ids; such a string never becomes a path."""

    def __init__(self, queue_id: object) -> None:
        super().__init__(
            f"invalid queue id {_brief(queue_id)}: expected 18 upper-case hex digits"
        )


class MessageNotFound(KeyError):
    """The queue holds no message with this id (delivered or removed)."""

    def __init__(self, queue_id: str) -> None:
        super().__init__(queue_id)
        self.queue_id = queue_id

    def __str__(self) -> str:
        return f"no message {self.queue_id} in the queue"


class StoreError(Exception):
    """A disk error: the caller answers ``452 4.3.1``; nothing half-written remains."""

    def __init__(
        self, message: str, *, errno_code: int | None = None, path: str | None = None
    ) -> None:
        super().__init__(message)
        self.errno = errno_code
        self.path = path

    @classmethod
    def from_os_error(cls, action: str, exc: OSError, path: str) -> StoreError:
        code = exc.errno
        name = errno.errorcode.get(code, str(code)) if code is not None else "OSError"
        reason = exc.strerror or str(exc)
        return cls(
            f"queue {action} failed: {name} ({reason}) at {path}",
            errno_code=code,
            path=path,
        )


class StoreLocked(StoreError):
    """Another store (another relay) already owns this queue directory."""


@contextlib.contextmanager
def _disk(action: str, path: str) -> Iterator[None]:
    """Turn an OSError into a one-line StoreError naming the path."""
    try:
        yield
    except OSError as exc:
        raise StoreError.from_os_error(action, exc, path) from exc


# -- queue ids ----------------------------------------------------------------

_id_lock = threading.Lock()
_last_micros = 0


def new_queue_id() -> str:
    """A unique id that sorts by creation time and is safe as a file name.

    13 hex digits of microseconds since the epoch (monotonic within a
    process) and 5 random ones against other processes, like Postfix's long
    queue ids.
    """
    global _last_micros
    with _id_lock:
        micros = max(time.time_ns() // 1000, _last_micros + 1)
        _last_micros = micros
    return f"{micros:013X}{secrets.randbits(20):05X}"


def valid_queue_id(queue_id: object) -> bool:
    """Whether ``queue_id`` is exactly one of our ids (no path can hide in it)."""
    return isinstance(queue_id, str) and _QUEUE_ID.fullmatch(queue_id) is not None


def _checked_id(queue_id: str) -> str:
    if not valid_queue_id(queue_id):
        raise InvalidQueueId(queue_id)
    return queue_id


# -- values -------------------------------------------------------------------


class RecipientChanges(TypedDict, total=False):
    """Fields :meth:`QueueEntry.with_recipient` may change."""

    status: str
    notify: str | None
    orcpt: str | None
    last_reply: str | None
    dsn: str | None
    attempts: int


@dataclass(frozen=True, slots=True)
class RecipientState:
    """One recipient and how far its delivery got."""

    address: str
    status: str = "pending"
    notify: str | None = None
    orcpt: str | None = None
    last_reply: str | None = None
    dsn: str | None = None
    attempts: int = 0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(
                f"recipient status must be one of {sorted(STATUSES)}, "
                f"not {_brief(self.status)}"
            )
        if self.attempts < 0:
            raise ValueError(f"recipient attempts must be >= 0, not {self.attempts}")


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """The envelope of one queued message: everything but the content."""

    queue_id: str
    sender: str
    recipients: tuple[RecipientState, ...]
    arrival_time: float
    size: int
    mail_parameters: tuple[str, ...] = ()
    client_address: str | None = None
    client_helo: str | None = None
    authenticated_as: str | None = None
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    is_bounce: bool = False
    delay_warned: bool = False

    def __post_init__(self) -> None:
        _checked_id(self.queue_id)
        if not self.recipients:
            raise ValueError("a queue entry needs at least one recipient")
        for name in ("arrival_time", "next_attempt"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite time >= 0, not {value}")
        for name in ("size", "attempts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")

    @property
    def pending_recipients(self) -> tuple[RecipientState, ...]:
        return tuple(r for r in self.recipients if r.status == "pending")

    @property
    def is_finished(self) -> bool:
        """No recipient is pending: the message can leave the queue."""
        return not any(r.status == "pending" for r in self.recipients)

    def with_recipient(
        self, address: str, **changes: Unpack[RecipientChanges]
    ) -> QueueEntry:
        """A copy with ``changes`` applied to the recipient(s) ``address``."""
        found = False
        recipients = []
        for recipient in self.recipients:
            if recipient.address == address:
                recipient = dataclasses.replace(recipient, **changes)
                found = True
            recipients.append(recipient)
        if not found:
            raise KeyError(f"no recipient {address!r} in message {self.queue_id}")
        return dataclasses.replace(self, recipients=tuple(recipients))

    def to_json(self) -> bytes:
        document = {"version": FORMAT_VERSION, **dataclasses.asdict(self)}
        text = json.dumps(
            document,
            ensure_ascii=True,
            allow_nan=False,
            sort_keys=True,
            separators=(",", ":"),
        )
        return text.encode("ascii") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> QueueEntry:
        """Decode exactly what :meth:`to_json` writes; anything else is corrupt."""
        try:
            document = json.loads(
                data.decode("utf-8"),
                object_pairs_hook=_unique_keys,
                parse_constant=_reject_constant,
            )
        except CorruptEntry:
            raise
        except (ValueError, RecursionError) as exc:
            reason = " ".join(str(exc).split())
            raise CorruptEntry(f"envelope is not valid JSON: {reason}") from None
        return _decode_entry(document)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise CorruptEntry("envelope repeats a key")
    return document


def _reject_constant(name: str) -> None:
    raise CorruptEntry(f"envelope contains {name}, which is not JSON")


def _object(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise CorruptEntry(f"{where} must be a JSON object, not {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_keys(document: dict[str, object], cls: type, where: str) -> None:
    expected = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(document.keys() - expected)
    if unknown:
        raise CorruptEntry(f"unknown key {_brief(unknown[0])} in {where}")
    missing = sorted(expected - document.keys())
    if missing:
        raise CorruptEntry(f"missing key {missing[0]!r} in {where}")


def _string(document: dict[str, object], key: str, where: str) -> str:
    value = document[key]
    if not isinstance(value, str):
        raise CorruptEntry(f"{where}.{key} must be a string, not {_kind(value)}")
    return value


def _optional_string(document: dict[str, object], key: str, where: str) -> str | None:
    return None if document[key] is None else _string(document, key, where)


def _integer(document: dict[str, object], key: str, where: str) -> int:
    value = document[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise CorruptEntry(f"{where}.{key} must be an integer, not {_kind(value)}")
    return value


def _number(document: dict[str, object], key: str, where: str) -> float:
    value = document[key]
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise CorruptEntry(f"{where}.{key} must be a number, not {_kind(value)}")
    return float(value)


def _boolean(document: dict[str, object], key: str, where: str) -> bool:
    value = document[key]
    if not isinstance(value, bool):
        raise CorruptEntry(f"{where}.{key} must be true or false, not {_kind(value)}")
    return value


def _list(document: dict[str, object], key: str, where: str) -> list[object]:
    value = document[key]
    if not isinstance(value, list):
        raise CorruptEntry(f"{where}.{key} must be a list, not {_kind(value)}")
    return value


def _decode_recipient(value: object, where: str) -> RecipientState:
    document = _object(value, where)
    _check_keys(document, RecipientState, where)
    return RecipientState(
        address=_string(document, "address", where),
        status=_string(document, "status", where),
        notify=_optional_string(document, "notify", where),
        orcpt=_optional_string(document, "orcpt", where),
        last_reply=_optional_string(document, "last_reply", where),
        dsn=_optional_string(document, "dsn", where),
        attempts=_integer(document, "attempts", where),
    )


def _decode_entry(value: object) -> QueueEntry:
    where = "envelope"
    document = dict(_object(value, where))
    version = document.pop("version", None)
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise CorruptEntry(f"unsupported envelope version {_brief(version)}")
    _check_keys(document, QueueEntry, where)
    parameters = _list(document, "mail_parameters", where)
    for parameter in parameters:
        if not isinstance(parameter, str):
            raise CorruptEntry(f"{where}.mail_parameters must hold strings only")
    try:
        return QueueEntry(
            queue_id=_string(document, "queue_id", where),
            sender=_string(document, "sender", where),
            recipients=tuple(
                _decode_recipient(item, f"{where}.recipients[{index}]")
                for index, item in enumerate(_list(document, "recipients", where))
            ),
            arrival_time=_number(document, "arrival_time", where),
            size=_integer(document, "size", where),
            mail_parameters=tuple(str(p) for p in parameters),
            client_address=_optional_string(document, "client_address", where),
            client_helo=_optional_string(document, "client_helo", where),
            authenticated_as=_optional_string(document, "authenticated_as", where),
            attempts=_integer(document, "attempts", where),
            next_attempt=_number(document, "next_attempt", where),
            last_error=_optional_string(document, "last_error", where),
            is_bounce=_boolean(document, "is_bounce", where),
            delay_warned=_boolean(document, "delay_warned", where),
        )
    except CorruptEntry:
        raise
    except ValueError as exc:
        raise CorruptEntry(f"{where} is invalid: {exc}") from None


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What :meth:`IMessageStore.recover` found and did at start-up."""

    kept: tuple[str, ...] = ()
    temporary_removed: int = 0
    unacknowledged_removed: tuple[str, ...] = ()
    quarantined: tuple[str, ...] = ()
    """Queue ids (or odd file names) moved to ``corrupt/`` for a human."""
    adopted: tuple[str, ...] = ()


# -- the interface ------------------------------------------------------------


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

    def content_path(queue_id: str) -> Path | None:
        """Where the content is, for streaming it out; None when it is gone."""

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


# -- file helpers -------------------------------------------------------------


def _create_file(path: str, data: bytes) -> int:
    """Create ``path`` (0600, exclusively) holding ``data``; return its open fd.

    On failure nothing is left behind.
    """
    fd = os.open(path, _CREATE_FLAGS, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_START_WRITEBACK = hasattr(os, "posix_fadvise")


def _start_writeback(fd: int) -> None:
    """Ask the kernel to write a file out now, without waiting for it.

    Done for every file of a batch before the first fsync, so that the
    journal commit this fsync forces also holds the block allocations of the
    others (ext4 allocates at writeback) and their fsyncs find little to do.
    """
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _remove_quietly(path: str) -> bool:
    """Unlink during clean-up, where a second error must not hide the first."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warn("queue: cannot remove {path}: {error}", path=path, error=exc)
        return False
    return True


def _read_small_file(path: str) -> bytes:
    fd = os.open(path, _READ_FLAGS)
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CorruptEntry(f"{path} is not a regular file")
        if info.st_size > MAX_ENVELOPE_BYTES:
            raise CorruptEntry(f"{path} is larger than {MAX_ENVELOPE_BYTES} octets")
        return file.read(MAX_ENVELOPE_BYTES + 1)


def _ensure_directory(path: Path, durable: bool) -> None:
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(
                errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)
            ) from None
        return
    if durable:
        _fsync_directory(str(path.parent))


def _check_size(entry: QueueEntry, content: bytes) -> None:
    if entry.size != len(content):
        raise ValueError(
            f"entry {entry.queue_id} says {entry.size} octets "
            f"but the content has {len(content)}"
        )


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _same_file(first: str, second: str) -> bool:
    try:
        a, b = os.lstat(first), os.lstat(second)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _older_than(path: str, seconds: float) -> bool:
    try:
        return time.time() - os.lstat(path).st_mtime > seconds
    except FileNotFoundError:
        return False


def deliver_to_incoming(
    directory: Path | str, entry: QueueEntry, content: bytes, *, durable: bool = True
) -> None:
    """Drop a complete message into ``DIR/incoming/`` for the relay to adopt.

    Blocking, and it needs no lock, so ``txstarttls sendmail`` works while
    the relay is down. Content is committed first and the envelope last,
    each fsynced, then the directory: a visible ``ID.json`` means complete.
    """
    _checked_id(entry.queue_id)
    _check_size(entry, content)
    root = Path(directory)
    incoming = root / "incoming"
    with _disk("create directory", str(incoming)):
        if not root.is_dir():
            root.mkdir(mode=0o700, parents=True)
        _ensure_directory(incoming, durable)
    stem = f"{incoming}/{entry.queue_id}"
    hidden = f"{incoming}/.{entry.queue_id}.{os.getpid()}"
    temporary: list[str] = []
    committed: list[str] = []
    try:
        for suffix, data in ((".eml", content), (".json", entry.to_json())):
            tmp = f"{hidden}{suffix}.tmp"
            with _disk("write", tmp):
                fd = _create_file(tmp, data)
                temporary.append(tmp)
                try:
                    if durable:
                        os.fsync(fd)
                finally:
                    os.close(fd)
        for tmp, suffix in zip(temporary, (".eml", ".json"), strict=True):
            # link() refuses to replace an existing file, unlike rename().
            with _disk("rename", stem + suffix):
                os.link(tmp, stem + suffix)
            committed.append(stem + suffix)
    except BaseException:
        for path in reversed(committed):
            _remove_quietly(path)
        raise
    finally:
        for path in temporary:
            _remove_quietly(path)
    if durable:
        with _disk("fsync", str(incoming)):
            _fsync_directory(str(incoming))


# -- the writer's operations --------------------------------------------------


@dataclass(slots=True)
class _Layout:
    root: Path

    @property
    def tmp(self) -> str:
        return str(self.root / "tmp")

    @property
    def messages(self) -> str:
        return str(self.root / "messages")

    @property
    def corrupt(self) -> str:
        return str(self.root / "corrupt")

    @property
    def incoming(self) -> str:
        return str(self.root / "incoming")

    def content(self, queue_id: str) -> str:
        return f"{self.messages}/{_checked_id(queue_id)}.eml"

    def envelope(self, queue_id: str) -> str:
        return f"{self.messages}/{_checked_id(queue_id)}.json"

    def quarantine(self, path: str) -> str:
        """Move ``path`` into ``corrupt/`` under a name that replaces nothing."""
        name = os.path.basename(path)
        target = f"{self.corrupt}/{name}"
        if os.path.lexists(target):
            target = f"{target}.{time.time_ns()}"
        os.replace(path, target)
        return target


_sequence = itertools.count()


class _Operation:
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

    def __init__(self, layout: _Layout) -> None:
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
        with _disk("write", path):
            self.fds.append(_create_file(path, data))
        self.temporary.append(path)
        return path

    def prepare(self) -> None:
        pass

    def sync(self, durable: bool) -> None:
        fds, self.fds = self.fds, []
        try:
            if durable:
                for fd, path in zip(fds, self.temporary, strict=True):
                    with _disk("fsync", path):
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
            _remove_quietly(path)
        self.temporary.clear()

    def rename(self, source: str, target: str) -> None:
        with _disk("rename", target):
            os.replace(source, target)
        self.temporary.remove(source)
        self.touched.add(os.path.dirname(target))


class _Add(_Operation):
    hidden_until_done = True

    def __init__(self, layout: _Layout, entry: QueueEntry, content: bytes) -> None:
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
            _remove_quietly(content)
            raise

    def rollback(self) -> None:
        assert self.queue_id is not None
        _remove_quietly(self.layout.envelope(self.queue_id))
        _remove_quietly(self.layout.content(self.queue_id))


class _Update(_Operation):
    def __init__(self, layout: _Layout, entry: QueueEntry) -> None:
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


class _Remove(_Operation):
    def __init__(self, layout: _Layout, queue_id: str) -> None:
        super().__init__(layout)
        self.queue_id = queue_id

    def commit(self) -> None:
        assert self.queue_id is not None
        envelope = self.layout.envelope(self.queue_id)
        try:
            with _disk("remove", envelope):
                os.unlink(envelope)
        except StoreError as exc:
            if exc.errno != errno.ENOENT:
                raise
        # Without its envelope the content is an orphan that recovery removes.
        _remove_quietly(self.layout.content(self.queue_id))
        self.touched.add(self.layout.messages)


@dataclass(slots=True)
class _Adoption:
    queue_id: str
    target_id: str
    source_content: str
    source_envelope: str
    envelope_tmp: str | None = None
    linked: tuple[str, ...] = ()


class _Adopt(_Operation):
    """Take over complete messages from ``incoming/``.

    Hard links, not renames: the message is in ``messages/`` (and durable)
    before its ``incoming/`` names go, so a crash in between leaves two names
    for one file, which the next adoption recognises, never zero.
    """

    def __init__(self, layout: _Layout) -> None:
        super().__init__(layout)
        self.adoptions: list[_Adoption] = []
        self.duplicates: list[_Adoption] = []
        self.to_quarantine: list[str] = []
        self.stale: list[str] = []
        self.result = []

    def prepare(self) -> None:
        incoming = self.layout.incoming
        with _disk("scan", incoming):
            self.scan(incoming, set(os.listdir(incoming)))

    def scan(self, incoming: str, names: set[str]) -> None:
        for name in sorted(names):
            path = f"{incoming}/{name}"
            stem, _, suffix = name.partition(".")
            if name.startswith(".") or (
                suffix == "eml" and f"{stem}.json" not in names
            ):
                if _older_than(path, STALE_INCOMING_SECONDS):
                    self.stale.append(path)
            elif suffix == "json" and valid_queue_id(stem):
                self.plan(stem)

    def plan(self, queue_id: str) -> None:
        incoming = self.layout.incoming
        adoption = _Adoption(
            queue_id,
            queue_id,
            f"{incoming}/{queue_id}.eml",
            f"{incoming}/{queue_id}.json",
        )
        if not _is_regular(adoption.source_content):
            self.to_quarantine.append(adoption.source_envelope)
            return
        try:
            entry = QueueEntry.from_json(_read_small_file(adoption.source_envelope))
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

    def already_adopted(self, adoption: _Adoption) -> str | None:
        """The id this incoming message already has in ``messages/``, if any."""
        envelope = self.layout.envelope(adoption.queue_id)
        if not os.path.lexists(envelope):
            return None
        if _same_file(adoption.source_content, self.layout.content(adoption.queue_id)):
            return adoption.queue_id
        for name in os.listdir(self.layout.messages):
            stem = name.removesuffix(".eml")
            if (
                valid_queue_id(stem)
                and stem != adoption.queue_id
                and _same_file(
                    adoption.source_content, f"{self.layout.messages}/{name}"
                )
                and os.path.lexists(self.layout.envelope(stem))
            ):
                return stem
        return None

    def commit(self) -> None:
        for path in self.stale:
            if _remove_quietly(path):
                log.info("queue: removed stale incoming file {path}", path=path)
                self.touched.add(self.layout.incoming)
        for path in self.to_quarantine:
            with _disk("quarantine", path):
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

    def link(self, adoption: _Adoption) -> None:
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
            _remove_quietly(content)
        linked: list[str] = []
        try:
            with _disk("link", content):
                os.link(adoption.source_content, content)
            linked.append(content)
            if adoption.envelope_tmp is None:
                with _disk("link", envelope):
                    os.link(adoption.source_envelope, envelope)
                linked.append(envelope)
            else:
                self.rename(adoption.envelope_tmp, envelope)
                linked.append(envelope)
        except StoreError:
            for path in reversed(linked):
                _remove_quietly(path)
            raise
        adoption.linked = tuple(linked)
        self.touched.add(self.layout.messages)

    def rollback(self) -> None:
        for adoption in self.adoptions:
            for path in reversed(adoption.linked):
                _remove_quietly(path)
        self.adoptions.clear()

    def finish(self) -> None:
        adopted = []
        for adoption in self.adoptions + self.duplicates:
            # Envelope first: a crash in between leaves an orphan .eml, which
            # ages out, rather than an envelope without content to quarantine.
            _remove_quietly(adoption.source_envelope)
            _remove_quietly(adoption.source_content)
            self.touched.add(self.layout.incoming)
            if adoption in self.adoptions:
                adopted.append(adoption.target_id)
                log.info(
                    "queue: adopted {queue_id} from incoming/",
                    queue_id=adoption.target_id,
                )
        self.result = adopted


# -- the filesystem store -----------------------------------------------------


@implementer(IMessageStore)
class FilesystemStore:
    """The default store: a directory, one writer thread, group commit."""

    def __init__(
        self,
        directory: Path | str,
        reactor: IReactorFromThreads,
        *,
        durable: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self._reactor = reactor
        self._durable = durable
        self._layout = _Layout(self.directory)
        self._lock_fd = self._lock()
        try:
            with _disk("create directory", str(self.directory)):
                for path in ("tmp", "messages", "corrupt", "incoming"):
                    _ensure_directory(self.directory / path, durable)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._pending: deque[_Operation] = deque()
        self._condition = threading.Condition()
        self._io_lock = threading.Lock()
        self._closing = False
        self._close_waiters: list[Deferred[None]] = []
        self._closed = False
        self._in_flight: set[str] = set()
        self._thread = threading.Thread(
            target=self._write_loop,
            name=f"txstarttls queue writer {self.directory}",
            daemon=True,
        )
        # Started on first use, not here: twistd builds the service before
        # it forks into the background, and a thread does not survive a fork.
        self._thread_started = False

    def _lock(self) -> int:
        root = self.directory
        path = str(root / "lock")
        with _disk("create directory", str(root)):
            if not root.is_dir():
                root.mkdir(mode=0o700, parents=True)
                if self._durable:
                    _fsync_directory(str(root.parent))
        with _disk("lock", path):
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
        _check_size(entry, content)
        operation = _Add(self._layout, entry, content)
        deferred: Deferred[None] = Deferred()
        if self._submit(operation, deferred) and operation.queue_id is not None:
            self._in_flight.add(operation.queue_id)
        return deferred

    def update(self, entry: QueueEntry) -> Deferred[None]:
        deferred: Deferred[None] = Deferred()
        self._submit(_Update(self._layout, entry), deferred)
        return deferred

    def remove(self, queue_id: str) -> Deferred[None]:
        deferred: Deferred[None] = Deferred()
        self._submit(_Remove(self._layout, _checked_id(queue_id)), deferred)
        return deferred

    def adopt_incoming(self) -> Deferred[list[str]]:
        deferred: Deferred[list[str]] = Deferred()
        self._submit(_Adopt(self._layout), deferred)
        return deferred

    def add_sync(self, entry: QueueEntry, content: bytes) -> None:
        """Blocking :meth:`add` for a program without a running reactor."""
        _check_size(entry, content)
        operation = _Add(self._layout, entry, content)
        operation.event = threading.Event()
        if not self._enqueue(operation):
            raise self._closed_error()
        operation.event.wait()
        if operation.error is not None:
            raise operation.error

    def _submit(self, operation: _Operation, deferred: Deferred[Any]) -> bool:
        operation.deferred = deferred
        if self._enqueue(operation):
            return True
        deferred.errback(self._closed_error())
        return False

    def _enqueue(self, operation: _Operation) -> bool:
        with self._condition:
            if self._closing:
                return False
            self._pending.append(operation)
            self._condition.notify()
        self._start_writer()
        return True

    def _start_writer(self) -> None:
        if not self._thread_started:
            self._thread_started = True
            self._thread.start()

    def _closed_error(self) -> StoreError:
        return StoreError(
            f"queue {self.directory} is closed (the relay is stopping); try again later"
        )

    # -- reads -----------------------------------------------------------------

    def get(self, queue_id: str) -> QueueEntry:
        path = self._layout.envelope(queue_id)
        try:
            data = _read_small_file(path)
        except FileNotFoundError:
            raise MessageNotFound(queue_id) from None
        except OSError as exc:
            raise StoreError.from_os_error("read", exc, path) from exc
        entry = QueueEntry.from_json(data)
        if entry.queue_id != queue_id:
            raise CorruptEntry(f"envelope {path} names message {entry.queue_id}")
        return entry

    def content_path(self, queue_id: str) -> Path | None:
        path = self._layout.content(queue_id)
        return Path(path) if _is_regular(path) else None

    def read_content(self, queue_id: str) -> bytes:
        path = self._layout.content(queue_id)
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            raise MessageNotFound(queue_id) from None
        except OSError as exc:
            raise StoreError.from_os_error("read", exc, path) from exc
        with os.fdopen(fd, "rb") as file, _disk("read", path):
            return file.read()

    def queue_ids(self) -> list[str]:
        with _disk("list", self._layout.messages):
            names = os.listdir(self._layout.messages)
        ids = (name.removesuffix(".json") for name in names if name.endswith(".json"))
        return sorted(
            queue_id
            for queue_id in ids
            if valid_queue_id(queue_id) and queue_id not in self._in_flight
        )

    # -- the writer thread -----------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closing:
                    self._condition.wait()
                if not self._pending:
                    break
                batch = self._take_batch()
            with self._io_lock:
                try:
                    self._run_batch(batch)
                except Exception as exc:
                    log.failure("queue: writer failed on a batch")
                    for operation in batch:
                        if operation.error is None:
                            operation.abort(
                                StoreError(f"queue writer failed unexpectedly: {exc}")
                            )
            for operation in batch:
                self._complete(operation)
        self._reactor.callFromThread(self._writer_stopped)

    def _take_batch(self) -> list[_Operation]:
        batch = [self._pending.popleft()]
        weight = batch[0].weight
        while self._pending and len(batch) < BATCH_MAX_OPERATIONS:
            weight += self._pending[0].weight
            if weight > BATCH_MAX_BYTES:
                break
            batch.append(self._pending.popleft())
        return batch

    def _run_batch(self, batch: list[_Operation]) -> None:
        """Write everything, fsync everything, rename, fsync each directory once."""
        live = self._phase(batch, lambda op: op.prepare())
        if self._durable and _START_WRITEBACK:
            for operation in live:
                for fd in operation.fds:
                    _start_writeback(fd)
        live = self._phase(live, lambda op: op.sync(self._durable))
        live = self._phase(live, lambda op: op.commit())
        live = self._sync_directories(live)
        live = self._phase(live, lambda op: op.finish())
        for directory in sorted(set().union(*(op.touched for op in live))):
            if self._durable:
                try:
                    _fsync_directory(directory)
                except OSError as exc:
                    log.warn(
                        "queue: fsync of {directory} failed after adoption: {error}",
                        directory=directory,
                        error=exc,
                    )

    @staticmethod
    def _phase(
        operations: list[_Operation], step: Callable[[_Operation], None]
    ) -> list[_Operation]:
        survivors = []
        for operation in operations:
            try:
                step(operation)
            except (StoreError, MessageNotFound) as exc:
                operation.abort(exc)
            else:
                survivors.append(operation)
        return survivors

    def _sync_directories(self, operations: list[_Operation]) -> list[_Operation]:
        """One fsync per directory for the whole batch: the group commit."""
        failed: dict[str, StoreError] = {}
        if self._durable:
            for directory in sorted(set().union(*(op.touched for op in operations))):
                try:
                    with _disk("fsync", directory):
                        _fsync_directory(directory)
                except StoreError as exc:
                    failed[directory] = exc
        survivors = []
        for operation in operations:
            error = next((failed[d] for d in operation.touched if d in failed), None)
            operation.touched.clear()
            if error is None:
                survivors.append(operation)
            else:
                operation.rollback()
                operation.abort(error)
        return survivors

    def _complete(self, operation: _Operation) -> None:
        if operation.error is not None:
            log.error(
                "queue: {operation} {queue_id} failed: {error}",
                operation=type(operation).__name__.strip("_").lower(),
                queue_id=operation.queue_id,
                error=str(operation.error),
            )
        if operation.event is not None:
            operation.event.set()
        else:
            self._reactor.callFromThread(self._settle, operation)

    def _settle(self, operation: _Operation) -> None:
        if operation.hidden_until_done and operation.queue_id is not None:
            self._in_flight.discard(operation.queue_id)
        assert operation.deferred is not None
        if operation.error is None:
            operation.deferred.callback(operation.result)
        else:
            operation.deferred.errback(operation.error)

    # -- start and stop --------------------------------------------------------

    def recover(self) -> RecoveryReport:
        with self._io_lock:
            removed_tmp = self._clear_tmp()
            kept, unacknowledged, quarantined = self._check_messages()
        adopt = _Adopt(self._layout)
        adopt.event = threading.Event()
        if self._enqueue(adopt):
            adopt.event.wait()
        if adopt.error is not None:
            log.error(
                "queue: adopting incoming/ failed: {error}", error=str(adopt.error)
            )
        adopted = tuple(adopt.result) if isinstance(adopt.result, list) else ()
        report = RecoveryReport(
            kept=tuple(kept),
            temporary_removed=removed_tmp,
            unacknowledged_removed=tuple(unacknowledged),
            quarantined=tuple(quarantined),
            adopted=adopted,
        )
        log.info(
            "queue: recovered {directory}: {kept} messages kept, "
            "{temporary} temporary files and {unacknowledged} unacknowledged "
            "messages removed, {quarantined} quarantined, {adopted} adopted",
            directory=str(self.directory),
            kept=len(report.kept),
            temporary=report.temporary_removed,
            unacknowledged=len(report.unacknowledged_removed),
            quarantined=len(report.quarantined),
            adopted=len(report.adopted),
            report=report,
        )
        return report

    def _clear_tmp(self) -> int:
        removed = 0
        with _disk("list", self._layout.tmp):
            names = os.listdir(self._layout.tmp)
        for name in names:
            path = f"{self._layout.tmp}/{name}"
            if os.path.isdir(path) and not os.path.islink(path):
                log.warn("queue: leaving unexpected directory {path}", path=path)
                continue
            with _disk("remove", path):
                os.unlink(path)
            removed += 1
        if removed and self._durable:
            with _disk("fsync", self._layout.tmp):
                _fsync_directory(self._layout.tmp)
        return removed

    def _check_messages(self) -> tuple[list[str], list[str], list[str]]:
        """Keep complete messages; drop unacknowledged ones; quarantine the rest."""
        layout = self._layout
        with _disk("list", layout.messages):
            names = os.listdir(layout.messages)
        found: dict[str, set[str]] = {}
        strangers = []
        for name in names:
            stem, dot, suffix = name.partition(".")
            if dot and suffix in ("eml", "json") and valid_queue_id(stem):
                found.setdefault(stem, set()).add(suffix)
            else:
                strangers.append(name)
        kept: list[str] = []
        unacknowledged: list[str] = []
        quarantined: list[str] = []
        for queue_id in sorted(found):
            suffixes = found[queue_id]
            if suffixes == {"eml"}:
                with _disk("remove", layout.content(queue_id)):
                    os.unlink(layout.content(queue_id))
                unacknowledged.append(queue_id)
                continue
            reason = self._problem(queue_id) if "eml" in suffixes else "no content"
            if reason is None:
                kept.append(queue_id)
                continue
            log.error(
                "queue: message {queue_id} is corrupt ({reason}); "
                "moving it to corrupt/",
                queue_id=queue_id,
                reason=reason,
            )
            for suffix in sorted(suffixes):
                path = f"{layout.messages}/{queue_id}.{suffix}"
                with _disk("quarantine", path):
                    layout.quarantine(path)
            quarantined.append(queue_id)
        for name in sorted(strangers):
            path = f"{layout.messages}/{name}"
            log.warn("queue: moving unexpected file {path} to corrupt/", path=path)
            with _disk("quarantine", path):
                layout.quarantine(path)
            quarantined.append(name)
        if (unacknowledged or quarantined) and self._durable:
            for directory in (layout.messages, layout.corrupt):
                with _disk("fsync", directory):
                    _fsync_directory(directory)
        return kept, unacknowledged, quarantined

    def _problem(self, queue_id: str) -> str | None:
        """Why a message with both files cannot be kept, or None."""
        try:
            entry = self.get(queue_id)
            content = os.lstat(self._layout.content(queue_id))
        except CorruptEntry as exc:
            return str(exc)
        except StoreError as exc:
            return str(exc)
        if not stat.S_ISREG(content.st_mode):
            return "content is not a regular file"
        if content.st_size != entry.size:
            return f"content has {content.st_size} octets, envelope says {entry.size}"
        return None

    def close(self) -> Deferred[None]:
        deferred: Deferred[None] = Deferred()
        if self._closed:
            deferred.callback(None)
            return deferred
        self._close_waiters.append(deferred)
        with self._condition:
            self._closing = True
            self._condition.notify()
        self._start_writer()
        return deferred

    def _writer_stopped(self) -> None:
        self._thread.join()
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
        self._closed = True
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)
