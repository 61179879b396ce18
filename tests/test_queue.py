"""Tests for the durable spool (txstarttls.queue).

Values and ids are plain pytest and hypothesis. The store runs its real
writer thread under the real reactor (pytest-twisted); fsync, write and
rename are wrapped to count, record or fail them; crashes are real process
deaths from tests/queue_crash_helper.py.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from tests.queue_crash_helper import CRASHED, message
from tests.support.deferred import ensure_deferred
from txstarttls.data import encode_body
from txstarttls.delivery import DeliverySettings, QueueRunner
from txstarttls.message import PreparedMessage
from txstarttls.queue import (
    STATUSES,
    CorruptEntry,
    FilesystemStore,
    IMessageStore,
    InvalidQueueId,
    MessageNotFound,
    QueueEntry,
    RecipientState,
    StoreError,
    StoreLocked,
    deliver_to_incoming,
    files,
    new_queue_id,
    valid_queue_id,
)
from txstarttls.queue.writer import BatchWriter
from txstarttls.session import Envelope, SendResult

reactor = cast(IReactorFromThreads, global_reactor)
T = TypeVar("T")
HELPER = Path(__file__).with_name("queue_crash_helper.py")
TRAVERSALS = [
    "../../etc/passwd",
    "",
    "6616d57b0be27caca2",
    "6616D57B0BE27CACA2\n",
    "6616D57B0BE27CACA2/..",
    "/6616D57B0BE27CACA",
    "6616D57B0BE27CACA2.json",
]


def an_entry(
    content: bytes = b"Subject: hi\r\n\r\nhello\r\n", **changes: Any
) -> QueueEntry:
    entry = QueueEntry(
        queue_id=new_queue_id(),
        sender="alice@example.org",
        recipients=(RecipientState("bob@example.com", notify="SUCCESS,FAILURE"),),
        arrival_time=1_790_000_000.25,
        size=len(content),
        mail_parameters=("BODY=8BITMIME", "ENVID=abc"),
        client_address="127.0.0.1",
    )
    return dataclasses.replace(entry, **changes)


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.fixture
def queue_dir(tmp_path: Path) -> Path:
    return (tmp_path / "queue").resolve()


@pytest.fixture
def store(queue_dir: Path) -> Iterator[FilesystemStore]:
    opened = FilesystemStore(queue_dir, reactor, durable=False)
    yield opened
    pytest_twisted.blockon(opened.close())


@pytest.fixture
def durable_store(queue_dir: Path) -> Iterator[FilesystemStore]:
    opened = FilesystemStore(queue_dir, reactor)
    yield opened
    pytest_twisted.blockon(opened.close())


class Gate:
    """Hold the writer thread at its first batch until the test lets it go,
    so that everything the test queues meanwhile forms the next batch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        real = getattr(BatchWriter, method)

        def held(writer: BatchWriter, batch: Any) -> Any:
            if not self.entered.is_set():
                self.entered.set()
                self.release.wait(10)
            return real(writer, batch)

        monkeypatch.setattr(BatchWriter, method, held)

    def wait(self) -> None:
        assert self.entered.wait(10), "the writer never started a batch"


class FsyncCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        self.files: list[str] = []
        self.directories: list[str] = []
        real = os.fsync

        def counting(fd: int) -> None:
            path = fd_path(fd)
            if path.startswith(str(root)):
                (self.directories if os.path.isdir(path) else self.files).append(path)
            real(fd)

        monkeypatch.setattr(os, "fsync", counting)


def fail_when(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    code: int,
    matches: Callable[[str], bool],
) -> None:
    """Make ``os.<name>`` (or the queue's ``rename_no_replace``) fail with
    ``code`` when its (fd's) path matches."""
    module: Any = files if name == "rename_no_replace" else os
    real = getattr(module, name)

    def failing(*args: Any, **kwargs: Any) -> Any:
        first = args[0]
        path = fd_path(first) if isinstance(first, int) else str(args[-1])
        if matches(path):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


async def errors_of(deferreds: list[defer.Deferred[None]]) -> list[Exception | None]:
    """What each of several Deferreds already in flight fails with, if anything."""
    errors: list[Exception | None] = []
    for deferred in deferreds:
        try:
            await deferred
        except Exception as exc:
            errors.append(exc)
        else:
            errors.append(None)
    return errors


def assert_consistent(root: Path) -> list[str]:
    """No temporary file, no half message; returns the complete messages' ids.

    A message is ``ID.msg``, with ``ID.json`` once updated, or (queued by an
    older relay) ``ID.eml`` and ``ID.json``; nothing else may lie there.
    """
    assert listing(root / "tmp") == []
    files: dict[str, set[str]] = {}
    for name in listing(root / "messages"):
        stem, _, suffix = name.partition(".")
        assert valid_queue_id(stem), name
        files.setdefault(stem, set()).add(suffix)
    for queue_id, suffixes in files.items():
        assert suffixes in ({"msg"}, {"msg", "json"}, {"eml", "json"}), (
            queue_id,
            suffixes,
        )
    return sorted(files)


def write_old_layout(root: Path, entry: QueueEntry, content: bytes) -> None:
    """Queue a message as a relay of the two-file layout did (before ID.msg)."""
    messages = root / "messages"
    messages.mkdir(parents=True, exist_ok=True, mode=0o700)
    (messages / f"{entry.queue_id}.eml").write_bytes(content)
    (messages / f"{entry.queue_id}.json").write_bytes(entry.to_json())


def an_old_layout_message(root: Path) -> tuple[QueueEntry, bytes]:
    """A message queued in the two-file layout before an upgrade, in ``root``."""
    content = b"Subject: old\r\n\r\nqueued before the upgrade\r\n"
    old = an_entry(content)
    write_old_layout(root, old, content)
    return old, content


def message_file(entry: QueueEntry, content: bytes) -> bytes:
    """What ``messages/ID.msg`` holds: header line, envelope, content."""
    envelope = entry.to_json()
    return b"TXQ1 %d\n" % len(envelope) + envelope + content


# -- values --------------------------------------------------------------------

texts = st.text(max_size=30)
optional_texts = st.none() | texts
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
counts = st.integers(min_value=0, max_value=2**53)
recipients = st.builds(
    RecipientState,
    address=texts,
    status=st.sampled_from(sorted(STATUSES)),
    notify=optional_texts,
    orcpt=optional_texts,
    last_reply=optional_texts,
    dsn=optional_texts,
    attempts=counts,
)
entries = st.builds(
    QueueEntry,
    queue_id=st.from_regex(r"[0-9A-F]{18}", fullmatch=True),
    sender=texts,
    recipients=st.lists(recipients, min_size=1, max_size=4).map(tuple),
    arrival_time=times,
    size=counts,
    mail_parameters=st.lists(texts, max_size=4).map(tuple),
    client_address=optional_texts,
    client_helo=optional_texts,
    authenticated_as=optional_texts,
    attempts=counts,
    next_attempt=times,
    last_error=optional_texts,
    is_bounce=st.booleans(),
    delay_warned=st.booleans(),
)


@given(entries)
def test_json_round_trip(entry: QueueEntry) -> None:
    data = entry.to_json()
    assert data.isascii()
    assert QueueEntry.from_json(data) == entry


def test_json_round_trip_keeps_undecodable_bytes_of_an_address() -> None:
    entry = an_entry(sender="caf\udce9@example.org")
    assert QueueEntry.from_json(entry.to_json()).sender == "caf\udce9@example.org"


def valid_document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(an_entry().to_json())
    return document


def set_key(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        keys: list[Any] = [int(k) if k.isdigit() else k for k in path.split(".")]
        target = document
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


def delete_key(key: str) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        del document[key]

    return change


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (set_key("colour", "blue"), "unknown key 'colour' in envelope"),
        (set_key("recipients.0.x", 1), "unknown key 'x' in envelope.recipients[0]"),
        (delete_key("sender"), "missing key 'sender'"),
        (delete_key("version"), "unsupported envelope version"),
        (set_key("version", 2), "unsupported envelope version 2"),
        (set_key("attempts", "1"), "envelope.attempts must be an integer, not str"),
        (set_key("attempts", True), "envelope.attempts must be an integer, not bool"),
        (set_key("size", 1.5), "envelope.size must be an integer"),
        (set_key("arrival_time", "now"), "arrival_time must be a number"),
        (set_key("is_bounce", 1), "is_bounce must be true or false"),
        (set_key("sender", None), "envelope.sender must be a string, not null"),
        (set_key("recipients", {}), "recipients must be a list"),
        (set_key("recipients", []), "at least one recipient"),
        (set_key("recipients.0", "bob@example.com"), "must be a JSON object"),
        (set_key("mail_parameters", [1]), "mail_parameters must hold strings"),
        (set_key("recipients.0.status", "lost"), "recipient status must be one of"),
        (set_key("recipients.0.attempts", -1), "attempts must be >= 0"),
        (set_key("queue_id", "../../etc/passwd"), "invalid queue id"),
        (set_key("queue_id", "6616d57b0be27caca2"), "invalid queue id"),
        (set_key("size", -1), "size must be >= 0"),
    ],
)
def test_from_json_refuses_anything_but_an_exact_envelope(
    change: Callable[[dict[str, Any]], None], reason: str
) -> None:
    document = valid_document()
    change(document)
    with pytest.raises(CorruptEntry) as raised:
        QueueEntry.from_json(json.dumps(document).encode())
    assert reason in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not valid JSON"),
        (b'{"sender": "a"', "not valid JSON"),
        (b"[]", "must be a JSON object, not list"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b'{"version": 1, "version": 1}', "repeats a key"),
        (b'{"version": NaN}', "NaN, which is not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ],
)
def test_from_json_refuses_malformed_bytes(data: bytes, reason: str) -> None:
    with pytest.raises(CorruptEntry) as raised:
        QueueEntry.from_json(data)
    assert reason in str(raised.value)
    assert "\n" not in str(raised.value)


def test_values_are_validated_when_built() -> None:
    with pytest.raises(InvalidQueueId):
        an_entry(queue_id="../x")
    with pytest.raises(ValueError, match="status"):
        RecipientState("a@b", status="sent")
    with pytest.raises(ValueError, match="finite"):
        an_entry(next_attempt=float("inf"))
    with pytest.raises(ValueError, match="recipient"):
        an_entry(recipients=())


def test_recipient_helpers() -> None:
    entry = an_entry(recipients=(RecipientState("a@x"), RecipientState("b@x")))
    assert not entry.is_finished
    done = entry.with_recipient("a@x", status="delivered", last_reply="250 2.0.0 ok")
    assert [r.address for r in done.pending_recipients] == ["b@x"]
    assert done.recipients[0].last_reply == "250 2.0.0 ok"
    assert entry.recipients[0].status == "pending"
    finished = done.with_recipient("b@x", status="bounced", dsn="5.1.1")
    assert finished.is_finished
    with pytest.raises(KeyError):
        entry.with_recipient("nobody@x", status="delivered")


# -- queue ids -------------------------------------------------------------------


def test_queue_ids_are_unique_sortable_and_safe() -> None:
    ids = [new_queue_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert sorted(ids) == ids
    assert all(valid_queue_id(i) and len(i) == 18 for i in ids)
    micros = int(new_queue_id()[:13], 16)
    assert abs(micros / 1e6 - time.time()) < 5


@pytest.mark.parametrize("bad", [*TRAVERSALS, None, 42])
def test_valid_queue_id_refuses_paths_and_junk(bad: object) -> None:
    assert not valid_queue_id(bad)


@given(st.text())
def test_only_upper_hex_of_the_right_length_is_a_queue_id(text: str) -> None:
    valid = len(text) == 18 and all(c in "0123456789ABCDEF" for c in text)
    assert valid_queue_id(text) == valid


# -- the store: basics -------------------------------------------------------------


def test_store_provides_the_interface(store: FilesystemStore) -> None:
    assert verifyObject(IMessageStore, store)


@ensure_deferred
async def test_add_get_update_remove(store: FilesystemStore, queue_dir: Path) -> None:
    entries = [an_entry(f"message {n}\r\n".encode()) for n in range(5)]
    await defer.gatherResults(
        [store.add(e, f"message {n}\r\n".encode()) for n, e in enumerate(entries)]
    )
    assert store.queue_ids() == [e.queue_id for e in entries]
    first = entries[0]
    assert store.get(first.queue_id) == first
    assert store.read_content(first.queue_id) == b"message 0\r\n"
    with store.open_content(first.queue_id) as file:
        assert file.read() == b"message 0\r\n"
    assert store.content_path(first.queue_id) is None, "no content-only file"
    path = queue_dir / "messages" / f"{first.queue_id}.msg"
    assert path.read_bytes() == message_file(first, b"message 0\r\n")

    delivered = first.with_recipient("bob@example.com", status="delivered", attempts=1)
    await store.update(delivered)
    assert store.get(first.queue_id) == delivered
    # The update is a new envelope beside the message; the file stays as it was.
    assert path.read_bytes() == message_file(first, b"message 0\r\n")
    assert (queue_dir / "messages" / f"{first.queue_id}.json").read_bytes() == (
        delivered.to_json()
    )
    assert store.read_content(first.queue_id) == b"message 0\r\n"

    await store.remove(first.queue_id)
    await store.remove(first.queue_id)
    assert store.queue_ids() == [e.queue_id for e in entries[1:]]
    assert store.content_path(first.queue_id) is None
    with pytest.raises(MessageNotFound, match=f"no message {first.queue_id}"):
        store.get(first.queue_id)
    with pytest.raises(MessageNotFound):
        store.read_content(first.queue_id)
    with pytest.raises(MessageNotFound):
        await store.update(delivered)
    assert not (queue_dir / "messages" / f"{first.queue_id}.json").exists()
    with pytest.raises(MessageNotFound):
        store.open_content(first.queue_id)
    assert assert_consistent(queue_dir) == [e.queue_id for e in entries[1:]]
    assert listing(queue_dir / "messages") == sorted(
        f"{e.queue_id}.msg" for e in entries[1:]
    )


@ensure_deferred
async def test_files_and_directories_are_private(
    store: FilesystemStore, queue_dir: Path
) -> None:
    entry = an_entry()
    await store.add(entry, b"Subject: hi\r\n\r\nhello\r\n")
    await store.update(dataclasses.replace(entry, attempts=1))
    for sub in ("", "tmp", "messages", "corrupt", "incoming"):
        assert stat.S_IMODE((queue_dir / sub).stat().st_mode) == 0o700
    for suffix in (".msg", ".json"):
        path = queue_dir / "messages" / (entry.queue_id + suffix)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("bad", TRAVERSALS)
def test_no_path_is_ever_built_from_a_bad_id(store: FilesystemStore, bad: str) -> None:
    calls = (store.get, store.content_path, store.read_content, store.open_content)
    for call in (*calls, store.remove):
        with pytest.raises(InvalidQueueId):
            call(bad)


@ensure_deferred
async def test_refuses_a_size_that_lies_and_an_id_in_use(
    store: FilesystemStore,
) -> None:
    entry = an_entry()
    with pytest.raises(ValueError, match="octets"):
        store.add(entry, b"other content")
    await store.add(entry, b"Subject: hi\r\n\r\nhello\r\n")
    with pytest.raises(StoreError, match="already in use"):
        await store.add(entry, b"Subject: hi\r\n\r\nhello\r\n")


@ensure_deferred
async def test_refuses_an_id_an_older_layout_message_holds(
    store: FilesystemStore, queue_dir: Path
) -> None:
    old, content = an_old_layout_message(queue_dir)
    clash = dataclasses.replace(an_entry(), queue_id=old.queue_id)
    with pytest.raises(StoreError, match="already in use"):
        await store.add(clash, b"Subject: hi\r\n\r\nhello\r\n")
    assert store.get(old.queue_id) == old
    assert store.read_content(old.queue_id) == content
    assert listing(queue_dir / "tmp") == []


def _renameat2_refusing_the_flag(*args: object) -> int:
    ctypes.set_errno(errno.EINVAL)
    return -1


@pytest.mark.parametrize(
    "renameat2",
    [files._RENAMEAT2, None, _renameat2_refusing_the_flag],
    ids=["renameat2", "without renameat2", "file system without the flag"],
)
def test_rename_no_replace_renames_but_never_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, renameat2: object
) -> None:
    monkeypatch.setattr(files, "_RENAMEAT2", renameat2)
    source, target = tmp_path / "new", tmp_path / "taken"
    source.write_bytes(b"new")
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        files.rename_no_replace(str(source), str(target))
    assert (source.read_bytes(), target.read_bytes()) == (b"new", b"old")
    target.unlink()
    files.rename_no_replace(str(source), str(target))
    assert not source.exists() and target.read_bytes() == b"new"
    with pytest.raises(FileNotFoundError):
        files.rename_no_replace(str(source), str(tmp_path / "elsewhere"))


def test_add_sync_blocks_until_durable(durable_store: FilesystemStore) -> None:
    entry = an_entry()
    durable_store.add_sync(entry, b"Subject: hi\r\n\r\nhello\r\n")
    assert durable_store.get(entry.queue_id) == entry


# -- group commit and durability ----------------------------------------------------


@ensure_deferred
async def test_concurrent_adds_share_fsyncs(
    durable_store: FilesystemStore, queue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = FsyncCounter(monkeypatch, queue_dir)
    gate = Gate(monkeypatch, "_run_batch")
    content = b"x" * 2048
    count = 30
    first = durable_store.add(an_entry(content), content)
    gate.wait()
    rest = [durable_store.add(an_entry(content), content) for _ in range(count - 1)]
    gate.release.set()
    await defer.gatherResults([first, *rest])

    assert len(assert_consistent(queue_dir)) == count
    # Two batches: the held one and everything queued behind it; one file
    # (and so one file fsync) per message.
    assert len(fsyncs.files) == count
    assert fsyncs.directories == [str(queue_dir / "messages")] * 2


@ensure_deferred
async def test_batches_are_capped(
    durable_store: FilesystemStore, queue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = FsyncCounter(monkeypatch, queue_dir)
    gate = Gate(monkeypatch, "_run_batch")
    first = durable_store.add(an_entry(b""), b"")
    gate.wait()
    small = [durable_store.add(an_entry(b""), b"") for _ in range(300)]
    big = b"b" * (5 * 1024 * 1024)
    large = [durable_store.add(an_entry(big), big) for _ in range(2)]
    gate.release.set()
    await defer.gatherResults([first, *small, *large])
    # [1], [256], [44 small + 1 large], [1 large]: 8 MiB and 256 operations.
    assert len(fsyncs.directories) == 4


def test_non_durable_store_never_fsyncs(
    store: FilesystemStore, queue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = FsyncCounter(monkeypatch, queue_dir)
    store.add_sync(an_entry(), b"Subject: hi\r\n\r\nhello\r\n")
    assert fsyncs.files == fsyncs.directories == []


class Recorder:
    """Record the file calls under ``root`` and the order they came in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        self.events: list[tuple[str, ...]] = []
        real_open, real_fsync = os.open, os.fsync
        real_replace, real_unlink = os.replace, os.unlink
        real_rename_no_replace = files.rename_no_replace

        def opening(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if str(path).startswith(str(root)) and flags & os.O_CREAT:
                self.events.append(("create", str(path)))
            return real_open(path, flags, *args, **kwargs)

        def fsync(fd: int) -> None:
            self.events.append(("fsync", fd_path(fd)))
            real_fsync(fd)

        def replace(source: Any, target: Any) -> None:
            self.events.append(("rename", str(source), str(target)))
            real_replace(source, target)

        def rename_no_replace(source: str, target: str) -> None:
            self.events.append(("rename", source, target))
            real_rename_no_replace(source, target)

        def unlink(path: Any) -> None:
            self.events.append(("unlink", str(path)))
            real_unlink(path)

        monkeypatch.setattr(os, "open", opening)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(files, "rename_no_replace", rename_no_replace)
        monkeypatch.setattr(os, "unlink", unlink)

    def fired(self, deferred: defer.Deferred[T]) -> defer.Deferred[T]:
        def note(result: T) -> T:
            self.events.append(("fired",))
            return result

        return deferred.addCallback(note)

    def index(self, kind: str, suffix: str = "") -> int:
        return next(
            i
            for i, e in enumerate(self.events)
            if e[0] == kind and e[-1].endswith(suffix)
        )

    def kinds(self, kind: str) -> list[tuple[str, ...]]:
        return [e for e in self.events if e[0] == kind]


@ensure_deferred
async def test_one_file_fsynced_renamed_then_directory_then_acknowledgement(
    durable_store: FilesystemStore, queue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(monkeypatch, queue_dir)
    entry = an_entry()
    content = b"Subject: hi\r\n\r\nhello\r\n"
    await recorder.fired(durable_store.add(entry, content))

    messages = str(queue_dir / "messages")
    (created,) = recorder.kinds("create")
    assert created[1].startswith(str(queue_dir / "tmp") + "/")
    assert created[1].endswith(".msg.tmp")
    (renamed,) = recorder.kinds("rename")
    assert renamed == ("rename", created[1], f"{messages}/{entry.queue_id}.msg")
    file_synced = recorder.events.index(("fsync", created[1]))
    directory_synced = recorder.events.index(("fsync", messages))
    fired = recorder.events.index(("fired",))
    assert file_synced < recorder.events.index(renamed) < directory_synced < fired
    assert len(recorder.kinds("fsync")) == 2
    assert (queue_dir / "messages" / f"{entry.queue_id}.msg").read_bytes() == (
        message_file(entry, content)
    )


@ensure_deferred
async def test_update_then_removal_never_exposes_the_first_envelope(
    durable_store: FilesystemStore, queue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message file goes first, durably, then the envelope beside it."""
    entry = an_entry()
    await durable_store.add(entry, b"Subject: hi\r\n\r\nhello\r\n")
    recorder = Recorder(monkeypatch, queue_dir)
    await recorder.fired(durable_store.update(dataclasses.replace(entry, attempts=1)))
    messages = str(queue_dir / "messages")
    envelope = f"{messages}/{entry.queue_id}.json"
    assert recorder.index("fsync", ".json.tmp") < recorder.index("rename", ".json")
    assert recorder.index("rename", ".json") < recorder.index("fsync", messages)
    assert recorder.index("fsync", messages) < recorder.index("fired")

    recorder.events.clear()
    await recorder.fired(durable_store.remove(entry.queue_id))
    assert recorder.events == [
        ("unlink", f"{messages}/{entry.queue_id}.msg"),
        ("fsync", messages),
        ("unlink", envelope),
        ("fsync", messages),
        ("fired",),
    ]
    assert listing(queue_dir / "messages") == []

    # Never updated: nothing to unlink after the directory fsync.
    other = an_entry()
    await durable_store.add(other, b"Subject: hi\r\n\r\nhello\r\n")
    recorder.events.clear()
    await recorder.fired(durable_store.remove(other.queue_id))
    assert [e[0] for e in recorder.events] == ["unlink", "fsync", "unlink", "fired"]
    assert recorder.events[2] == ("unlink", f"{messages}/{other.queue_id}.json")


@ensure_deferred
async def test_unacknowledged_messages_are_not_listed(
    durable_store: FilesystemStore, queue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch, "_sync_directories")
    entry = an_entry()
    added = durable_store.add(entry, b"Subject: hi\r\n\r\nhello\r\n")
    gate.wait()
    assert (queue_dir / "messages" / f"{entry.queue_id}.msg").exists()
    assert durable_store.queue_ids() == []
    gate.release.set()
    await added
    assert durable_store.queue_ids() == [entry.queue_id]


@ensure_deferred
async def test_close_finishes_pending_writes_then_refuses(queue_dir: Path) -> None:
    store = FilesystemStore(queue_dir, reactor)
    pending = [
        store.add(an_entry(), b"Subject: hi\r\n\r\nhello\r\n") for _ in range(10)
    ]
    closed = store.close()
    await defer.gatherResults(pending)
    await closed
    await store.close()
    with pytest.raises(StoreError, match="is closed"):
        await store.add(an_entry(), b"Subject: hi\r\n\r\nhello\r\n")
    reopened = FilesystemStore(queue_dir, reactor, durable=False)
    assert len(reopened.queue_ids()) == 10
    await reopened.close()


# -- disk errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "code", "target"),
    [
        ("write", errno.ENOSPC, ".msg.tmp"),
        ("fsync", errno.EIO, ".msg.tmp"),
        ("rename_no_replace", errno.EACCES, ".msg"),
        ("write", errno.EDQUOT, ".msg.tmp"),
    ],
)
@ensure_deferred
async def test_a_disk_error_fails_only_its_own_message(
    durable_store: FilesystemStore,
    queue_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    operation: str,
    code: int,
    target: str,
) -> None:
    victim = an_entry()
    others = [an_entry() for _ in range(3)]
    fail_when(
        monkeypatch,
        operation,
        code,
        lambda path: victim.queue_id in path and path.endswith(target),
    )
    gate = Gate(monkeypatch, "_run_batch")
    content = b"Subject: hi\r\n\r\nhello\r\n"
    first = durable_store.add(others[0], content)
    gate.wait()
    results = [durable_store.add(e, content) for e in (others[1], victim, others[2])]
    gate.release.set()
    failures = [e for e in await errors_of([first, *results]) if e is not None]
    assert len(failures) == 1
    error = failures[0]
    assert isinstance(error, StoreError)
    assert errno.errorcode[code] in str(error)
    assert victim.queue_id in str(error)
    assert "\n" not in str(error)
    assert assert_consistent(queue_dir) == sorted(e.queue_id for e in others)


@ensure_deferred
async def test_a_failed_directory_fsync_rolls_the_whole_batch_back(
    durable_store: FilesystemStore, queue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = str(queue_dir / "messages")
    fail_when(monkeypatch, "fsync", errno.EIO, lambda path: path == messages)
    content = b"Subject: hi\r\n\r\nhello\r\n"
    errors = await errors_of([durable_store.add(an_entry(), content) for _ in range(5)])
    assert all(isinstance(error, StoreError) for error in errors)
    assert "EIO" in str(errors[0])
    assert assert_consistent(queue_dir) == []


@ensure_deferred
async def test_a_failed_update_keeps_the_old_envelope(
    durable_store: FilesystemStore, queue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = an_entry()
    await durable_store.add(entry, b"Subject: hi\r\n\r\nhello\r\n")
    fail_when(
        monkeypatch, "write", errno.ENOSPC, lambda path: path.endswith(".json.tmp")
    )
    with pytest.raises(StoreError, match="ENOSPC"):
        await durable_store.update(dataclasses.replace(entry, attempts=1))
    assert durable_store.get(entry.queue_id) == entry
    assert assert_consistent(queue_dir) == [entry.queue_id]


@ensure_deferred
async def test_a_full_disk_for_real(tmp_path: Path) -> None:
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mountpoint)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        store = FilesystemStore(mountpoint / "queue", reactor)
        content = b"y" * 10_000
        acknowledged = []
        with pytest.raises(StoreError, match="ENOSPC") as raised:
            for _ in range(100):
                entry = an_entry(content)
                await store.add(entry, content)
                acknowledged.append(entry.queue_id)
        assert str(mountpoint) in str(raised.value)
        assert len(acknowledged) > 5
        assert assert_consistent(mountpoint / "queue") == acknowledged
        for queue_id in acknowledged:
            assert store.read_content(queue_id) == content
        await store.remove(acknowledged[0])
        await store.add(an_entry(content), content)
        await store.close()
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


# -- lock, incoming and recovery ------------------------------------------------------


@ensure_deferred
async def test_one_relay_per_queue_but_sendmail_needs_no_lock(
    store: FilesystemStore, queue_dir: Path
) -> None:
    with pytest.raises(StoreLocked, match=str(queue_dir)) as raised:
        FilesystemStore(queue_dir, reactor)
    assert f"pid {os.getpid()}" in str(raised.value)

    entry = an_entry()
    deliver_to_incoming(queue_dir, entry, b"Subject: hi\r\n\r\nhello\r\n")
    assert listing(queue_dir / "incoming") == [
        f"{entry.queue_id}.eml",
        f"{entry.queue_id}.json",
    ]
    assert await store.adopt_incoming() == [entry.queue_id]
    assert listing(queue_dir / "incoming") == []
    # Adopted into the one-file layout, like any message.
    assert listing(queue_dir / "messages") == [f"{entry.queue_id}.msg"]
    assert store.get(entry.queue_id) == entry
    assert store.read_content(entry.queue_id) == b"Subject: hi\r\n\r\nhello\r\n"
    assert await store.adopt_incoming() == []


@ensure_deferred
async def test_sendmail_works_while_the_relay_is_down(tmp_path: Path) -> None:
    directory = tmp_path / "never-started"
    entry = an_entry()
    deliver_to_incoming(directory, entry, b"Subject: hi\r\n\r\nhello\r\n")
    store = FilesystemStore(directory, reactor, durable=False)
    report = store.recover()
    assert report.adopted == (entry.queue_id,)
    assert store.queue_ids() == [entry.queue_id]
    await store.close()


@ensure_deferred
async def test_adoption_quarantines_corrupt_drops_and_renames_on_collision(
    store: FilesystemStore, queue_dir: Path
) -> None:
    content = b"Subject: hi\r\n\r\nhello\r\n"
    queued = an_entry()
    await store.add(queued, content)
    corrupt = an_entry()
    deliver_to_incoming(queue_dir, corrupt, content)
    (queue_dir / "incoming" / f"{corrupt.queue_id}.json").write_bytes(b"{")
    colliding = dataclasses.replace(an_entry(b"other\r\n"), queue_id=queued.queue_id)
    deliver_to_incoming(queue_dir, colliding, b"other\r\n")
    stale = queue_dir / "incoming" / ".6616D57B0BE27CACA2.1.eml.tmp"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    adopted = await store.adopt_incoming()
    assert len(adopted) == 1 and adopted[0] != queued.queue_id
    assert valid_queue_id(adopted[0])
    assert adopted[0][:13] == queued.queue_id[:13], "still sorted by arrival"
    assert store.read_content(adopted[0]) == b"other\r\n"
    assert store.get(adopted[0]) == dataclasses.replace(colliding, queue_id=adopted[0])
    assert store.read_content(queued.queue_id) == content
    assert listing(queue_dir / "corrupt") == [
        f"{corrupt.queue_id}.eml",
        f"{corrupt.queue_id}.json",
    ]
    assert listing(queue_dir / "incoming") == []


@ensure_deferred
async def test_adoption_copies_syncs_and_commits_before_unlinking_the_drop(
    durable_store: FilesystemStore, queue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = an_entry()
    content = b"Subject: hi\r\n\r\nhello\r\n"
    deliver_to_incoming(queue_dir, entry, content)
    recorder = Recorder(monkeypatch, queue_dir)
    assert await recorder.fired(durable_store.adopt_incoming()) == [entry.queue_id]
    messages, incoming = str(queue_dir / "messages"), str(queue_dir / "incoming")
    (created,) = recorder.kinds("create")
    assert created[1].endswith(".msg.tmp")
    events = recorder.events
    copy_synced = events.index(("fsync", created[1]))
    renamed = events.index(("rename", created[1], f"{messages}/{entry.queue_id}.msg"))
    messages_synced = events.index(("fsync", messages))
    envelope_gone = events.index(("unlink", f"{incoming}/{entry.queue_id}.json"))
    content_gone = events.index(("unlink", f"{incoming}/{entry.queue_id}.eml"))
    incoming_synced = events.index(("fsync", incoming))
    assert copy_synced < renamed < messages_synced < envelope_gone < content_gone
    assert content_gone < incoming_synced < events.index(("fired",))
    assert (queue_dir / "messages" / f"{entry.queue_id}.msg").read_bytes() == (
        message_file(entry, content)
    )


@ensure_deferred
async def test_adoption_interrupted_by_an_older_relay_is_not_repeated(
    store: FilesystemStore, queue_dir: Path
) -> None:
    """A two-file relay adopted by hard links and crashed before unlinking."""
    entry = an_entry()
    deliver_to_incoming(queue_dir, entry, b"Subject: hi\r\n\r\nhello\r\n")
    for suffix in (".eml", ".json"):
        os.link(
            queue_dir / "incoming" / (entry.queue_id + suffix),
            queue_dir / "messages" / (entry.queue_id + suffix),
        )
    assert await store.adopt_incoming() == []
    assert listing(queue_dir / "incoming") == []
    assert store.queue_ids() == [entry.queue_id]


@ensure_deferred
async def test_adoption_interrupted_by_an_older_relay_after_a_collision(
    store: FilesystemStore, queue_dir: Path
) -> None:
    content = b"Subject: hi\r\n\r\nhello\r\n"
    queued, dropped = an_entry(), an_entry(b"other\r\n")
    write_old_layout(queue_dir, queued, content)
    dropped = dataclasses.replace(dropped, queue_id=queued.queue_id)
    deliver_to_incoming(queue_dir, dropped, b"other\r\n")
    # It gave the drop a random id and linked the content under it.
    other_id = new_queue_id()
    os.link(
        queue_dir / "incoming" / f"{queued.queue_id}.eml",
        queue_dir / "messages" / f"{other_id}.eml",
    )
    (queue_dir / "messages" / f"{other_id}.json").write_bytes(
        dataclasses.replace(dropped, queue_id=other_id).to_json()
    )
    assert await store.adopt_incoming() == []
    assert listing(queue_dir / "incoming") == []
    assert store.queue_ids() == sorted([queued.queue_id, other_id])


def keep_aside(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in listing(directory)}


def put_back(directory: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (directory / name).write_bytes(data)


@ensure_deferred
async def test_adoption_interrupted_after_copying_is_not_repeated(
    store: FilesystemStore, queue_dir: Path
) -> None:
    """A crash after the copies were durable, before the drops were unlinked."""
    content = b"Subject: hi\r\n\r\nhello\r\n"
    queued = an_entry()
    await store.add(queued, content)
    plain = an_entry()
    colliding = dataclasses.replace(an_entry(b"other\r\n"), queue_id=queued.queue_id)
    deliver_to_incoming(queue_dir, plain, content)
    deliver_to_incoming(queue_dir, colliding, b"other\r\n")
    drops = keep_aside(queue_dir / "incoming")
    adopted = await store.adopt_incoming()
    assert len(adopted) == 2 and plain.queue_id in adopted
    # The adopted message was tried meanwhile: its envelope changed.
    await store.update(dataclasses.replace(plain, attempts=1))
    put_back(queue_dir / "incoming", drops)

    assert await store.adopt_incoming() == []
    assert listing(queue_dir / "incoming") == []
    assert store.queue_ids() == sorted([queued.queue_id, *adopted])
    assert store.get(plain.queue_id).attempts == 1

    # The same id with other content is another message, not a copy.
    twin = dataclasses.replace(plain, arrival_time=plain.arrival_time + 1)
    deliver_to_incoming(queue_dir, twin, content)
    (again,) = await store.adopt_incoming()
    assert again not in (plain.queue_id, *adopted)
    assert len(store.queue_ids()) == 4


@ensure_deferred
async def test_recover_repairs_every_kind_of_leftover(queue_dir: Path) -> None:
    store = FilesystemStore(queue_dir, reactor, durable=False)
    content = b"Subject: hi\r\n\r\nhello\r\n"
    kept, updated, removed, headless, short, bad_update, doubled = (
        an_entry() for _ in range(7)
    )
    for entry in (kept, updated, removed, headless, short, bad_update, doubled):
        await store.add(entry, content)
    for entry in (updated, removed, bad_update):
        await store.update(dataclasses.replace(entry, attempts=1))
    await store.close()
    messages = queue_dir / "messages"
    (messages / f"{removed.queue_id}.msg").unlink()
    (messages / f"{headless.queue_id}.msg").write_bytes(b"Subject: no header\r\n")
    short_file = messages / f"{short.queue_id}.msg"
    short_file.write_bytes(short_file.read_bytes()[:-3])
    (messages / f"{bad_update.queue_id}.json").write_bytes(b'{"version": 1}')
    (messages / f"{doubled.queue_id}.eml").write_bytes(content)
    (messages / "notes.txt").write_bytes(b"?")
    (queue_dir / "tmp" / "X.1.msg.tmp").write_bytes(b"partial")
    # Left by a relay of the two-file layout.
    old_kept, old_orphan, old_lost, old_broken, old_short = (
        an_entry() for _ in range(5)
    )
    for entry in (old_kept, old_orphan, old_lost, old_broken, old_short):
        write_old_layout(queue_dir, entry, content)
    (messages / f"{old_orphan.queue_id}.json").unlink()
    (messages / f"{old_lost.queue_id}.eml").unlink()
    (messages / f"{old_broken.queue_id}.json").write_bytes(b'{"version": 1}')
    (messages / f"{old_short.queue_id}.eml").write_bytes(content[:5])
    dropped = an_entry()
    deliver_to_incoming(queue_dir, dropped, content)

    store = FilesystemStore(queue_dir, reactor)
    report = store.recover()
    assert report.kept == tuple(
        sorted([kept.queue_id, updated.queue_id, doubled.queue_id, old_kept.queue_id])
    )
    assert report.temporary_removed == 1
    assert report.unacknowledged_removed == (old_orphan.queue_id,)
    # ID.msg is unlinked first: an envelope alone is a removal cut short.
    assert sorted(report.removal_leftovers) == sorted(
        [removed.queue_id, old_lost.queue_id]
    )
    assert sorted(report.quarantined) == sorted(
        [
            headless.queue_id,
            short.queue_id,
            bad_update.queue_id,
            old_broken.queue_id,
            old_short.queue_id,
            f"{doubled.queue_id}.eml",
            "notes.txt",
        ]
    )
    assert report.adopted == (dropped.queue_id,)
    assert assert_consistent(queue_dir) == sorted([*report.kept, dropped.queue_id])
    assert store.get(updated.queue_id).attempts == 1
    assert store.read_content(old_kept.queue_id) == content
    assert len(listing(queue_dir / "corrupt")) == 10
    await store.close()


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"TXQ1 \n",
        b"TXQ2 10\n",
        b"TXQ1 -1\n",
        b"TXQ1 +5\n",
        b"TXQ1 05\n",
        b"TXQ1 5",
        b"TXQ1 99999999\n{}",
        b"TXQ1 \xd9\xa3\n",
        b"TXQ1 1" + b"0" * 40 + b"\n",
    ],
)
def test_a_message_file_with_a_bad_header_is_corrupt(
    store: FilesystemStore, queue_dir: Path, head: bytes
) -> None:
    entry = an_entry()
    (queue_dir / "messages" / f"{entry.queue_id}.msg").write_bytes(head)
    with pytest.raises(CorruptEntry):
        store.get(entry.queue_id)
    with pytest.raises(CorruptEntry):
        store.read_content(entry.queue_id)
    assert store.recover().quarantined == (entry.queue_id,)


def test_a_message_file_naming_another_message_is_corrupt(
    store: FilesystemStore, queue_dir: Path
) -> None:
    entry, other = an_entry(), an_entry()
    path = queue_dir / "messages" / f"{entry.queue_id}.msg"
    path.write_bytes(message_file(other, b"Subject: hi\r\n\r\nhello\r\n"))
    with pytest.raises(CorruptEntry, match=f"names message {other.queue_id}"):
        store.get(entry.queue_id)
    assert store.recover().quarantined == (entry.queue_id,)


def test_a_large_envelope_and_content_are_read_back(store: FilesystemStore) -> None:
    """Envelopes longer than the first read, content much longer."""
    content = b"x" * (3 * 1024 * 1024)
    many = tuple(RecipientState(f"r{n}@example.com") for n in range(500))
    entry = an_entry(content, recipients=many)
    assert len(entry.to_json()) > 8192
    store.add_sync(entry, content)
    assert store.get(entry.queue_id) == entry
    with store.open_content(entry.queue_id) as file:
        assert file.read(5) == b"xxxxx"
        assert len(file.read()) == len(content) - 5
    assert store.read_content(entry.queue_id) == content
    assert store.recover().kept == (entry.queue_id,)


@ensure_deferred
async def test_messages_of_the_two_file_layout_are_served_as_before(
    store: FilesystemStore, queue_dir: Path
) -> None:
    """A relay upgraded in place keeps what it queued before, and drains it."""
    old, content = an_old_layout_message(queue_dir)
    new = an_entry()
    await store.add(new, b"Subject: hi\r\n\r\nhello\r\n")
    assert store.recover().kept == tuple(sorted([old.queue_id, new.queue_id]))
    assert store.queue_ids() == sorted([old.queue_id, new.queue_id])
    assert store.get(old.queue_id) == old
    assert store.read_content(old.queue_id) == content
    with store.open_content(old.queue_id) as file:
        assert file.read() == content
    old_content = queue_dir / "messages" / f"{old.queue_id}.eml"
    assert store.content_path(old.queue_id) == old_content

    tried = dataclasses.replace(old, attempts=1)
    await store.update(tried)
    assert store.get(old.queue_id) == tried
    assert listing(queue_dir / "messages") == sorted(
        [f"{old.queue_id}.eml", f"{old.queue_id}.json", f"{new.queue_id}.msg"]
    )
    await store.remove(old.queue_id)
    assert listing(queue_dir / "messages") == [f"{new.queue_id}.msg"]
    with pytest.raises(MessageNotFound):
        store.get(old.queue_id)
    with pytest.raises(MessageNotFound):
        await store.update(tried)


# -- crashes ------------------------------------------------------------------------


def read_facts(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [
        cast(tuple[str, str], tuple(line.split()))
        for line in path.read_text().splitlines()
    ]


def check_recovered(
    store: FilesystemStore, root: Path, facts: list[tuple[str, str]]
) -> None:
    report = store.recover()
    assert report.quarantined == ()
    assert listing(root / "corrupt") == []
    assert not [n for n in listing(root / "incoming") if n.endswith(".json")]
    ids = assert_consistent(root)
    assert store.queue_ids() == ids
    for queue_id in ids:
        entry, content = message(queue_id)
        assert store.read_content(queue_id) == content
        assert store.get(queue_id).recipients[1] == entry.recipients[1]
    intended = {queue_id for kind, queue_id in facts if kind == "intent-remove"}
    for kind, queue_id in facts:
        if kind == "add" and queue_id not in intended:
            assert queue_id in ids
        if kind == "remove":
            assert queue_id not in ids
        if kind == "update" and queue_id in ids:
            # Never the envelope it arrived with again, even mid-removal.
            assert store.get(queue_id).recipients[0].status == "delivered"


@ensure_deferred
async def test_crash_at_every_step_loses_nothing_acknowledged(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, str(HELPER), "steps", str(tmp_path)],
        capture_output=True,
        timeout=120,
        check=True,
    )
    runs = [json.loads(line) for line in finished.stdout.splitlines()]
    assert [run["exit"] for run in runs[:-1]] == [CRASHED] * (len(runs) - 1)
    assert runs[-1]["exit"] == 0, finished.stderr.decode()
    assert len(runs) > 60
    # The crashes hit every step of adding, updating, removing and adopting.
    steps = set()
    for run in runs[:-1]:
        name, path = (tmp_path / f"{run['k']}.call").read_text().split(" ", 1)
        folder, _, file = path.rpartition("/")
        steps.add((name, folder, file.split(".", 2)[-1]))
    assert steps >= {
        ("link", "incoming", "eml"),
        ("link", "incoming", "json"),
        ("open", "tmp", "msg.tmp"),
        ("write", "tmp", "msg.tmp"),
        ("rename_no_replace", "messages", "msg"),
        ("open", "tmp", "json.tmp"),
        ("write", "tmp", "json.tmp"),
        ("replace", "messages", "json"),
        ("unlink", "messages", "msg"),
        ("unlink", "messages", "json"),
        ("unlink", "messages", "eml"),
        ("unlink", "incoming", "json"),
        ("unlink", "incoming", "eml"),
    }, sorted(steps)
    for run in runs:
        root = tmp_path / str(run["k"])
        facts = read_facts(tmp_path / f"{run['k']}.acks")
        store = FilesystemStore(root, reactor, durable=False)
        try:
            check_recovered(store, root, facts)
        finally:
            await store.close()
    complete = read_facts(tmp_path / f"{runs[-1]['k']}.acks")
    assert [kind for kind, _ in complete].count("add") == 7
    assert [kind for kind, _ in complete].count("remove") == 3


@ensure_deferred
async def test_sigkill_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    acknowledged: set[str] = set()
    for _ in range(3):
        child = subprocess.Popen(
            [sys.executable, str(HELPER), "load", str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert child.stdout is not None
        target = random.randint(1, 60)
        seen = 0
        while seen < target:
            line = child.stdout.readline()
            assert line, child.stderr.read().decode() if child.stderr else ""
            acknowledged.add(line.decode().strip())
            seen += 1
        time.sleep(random.random() / 50)
        os.kill(child.pid, signal.SIGKILL)
        rest, _ = child.communicate()
        acknowledged.update(line for line in rest.decode().splitlines() if line)
        store = FilesystemStore(root, reactor)
        try:
            check_recovered(
                store, root, [("add", queue_id) for queue_id in acknowledged]
            )
        finally:
            await store.close()


# -- the queue runner reads content through the store -------------------------------


class NoSmarthost:
    async def deliver(self, envelope: Envelope, message: PreparedMessage) -> SendResult:
        raise AssertionError("not used")

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("size", [100, 3 * 1024 * 1024])
def test_the_runner_sends_content_from_the_message_file(
    store: FilesystemStore, size: int
) -> None:
    """Small messages are read into memory, large ones streamed from a spool;
    both are exactly the content, without the header and envelope."""
    content = (b"Subject: big\r\n\r\n" + b"y" * 78 + b"\r\n") * (size // 96 + 1)
    entry = an_entry(content)
    store.add_sync(entry, content)
    runner = QueueRunner(
        store, [NoSmarthost()], Clock(), DeliverySettings(hostname="relay.test")
    )
    prepared = runner._message(entry)
    assert (prepared.in_memory is None) == (size > 1024 * 1024)
    assert b"".join(prepared.chunks()) == encode_body(content)
