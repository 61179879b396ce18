"""`txstarttls mailq/show/flush/delete/requeue/passwd` against real queue directories.

The commands run as real processes (``python -m txstarttls``) for the main
paths; the relay is played by this test process holding a FilesystemStore
(and so the queue's lock) and applying requests the way the relay's
one-second poll does.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import io
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.threads import deferToThread

from txstarttls.delivery import DeliverySettings, QueueRunner
from txstarttls.operator import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOINPUT,
    EX_NOPERM,
    EX_NOUSER,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    FLUSH_REQUEST,
    REQUEST_LIFETIME,
    OperatorError,
    QueuedMessage,
    QueueRequest,
    RequestError,
    RequestRunner,
    apply_requests,
    change_queue,
    check_queue,
    format_mailq,
    format_message,
    list_queue,
    mailq_json,
    pending_requests,
    printable,
    read_request,
    relay_status,
    resolve_queue,
    run_command,
    set_password,
    write_request,
)
from txstarttls.queue import (
    FilesystemStore,
    IMessageStore,
    QueueEntry,
    RecipientState,
    deliver_to_incoming,
    new_queue_id,
)
from txstarttls.userdb import load_users

reactor = cast(IReactorFromThreads, global_reactor)
clock = cast(IReactorTime, global_reactor)
CONTENT = b"Subject: queued\r\nFrom: alice@example.org\r\n\r\nthe body\r\n"
ROOT = os.geteuid() == 0


def an_entry(content: bytes = CONTENT, **changes: Any) -> QueueEntry:
    entry = QueueEntry(
        queue_id=new_queue_id(),
        sender="alice@example.org",
        recipients=(
            RecipientState("bob@example.com"),
            RecipientState(
                "carol@example.com",
                status="delivered",
                last_reply="250 2.0.0 Ok: queued",
                dsn="2.0.0",
                attempts=1,
            ),
        ),
        arrival_time=time.time() - 600,
        size=len(content),
    )
    return dataclasses.replace(entry, **changes)


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def deferred_entry() -> QueueEntry:
    entry = an_entry(attempts=2, next_attempt=time.time() + 3000)
    return entry.with_recipient(
        "bob@example.com",
        last_reply="451 4.3.0 mailbox busy",
        dsn="4.3.0",
        attempts=2,
    )


async def fill(directory: Path, *entries: QueueEntry) -> None:
    """Queue ``entries`` as the relay would, then release the lock.

    pytest-twisted runs test functions in the reactor's greenlet, so they
    await; fixtures run outside it and may block on a Deferred.
    """
    store = FilesystemStore(directory, reactor, durable=False)
    try:
        for entry in entries:
            await store.add(entry, CONTENT)
    finally:
        await store.close()


@pytest.fixture
def queue_dir(tmp_path: Path) -> Path:
    """An empty queue directory as a relay leaves it."""
    directory = tmp_path / "queue"
    pytest_twisted.blockon(FilesystemStore(directory, reactor, durable=False).close())
    return directory


def cli(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "txstarttls", *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


async def cli_async(*args: str) -> Any:
    """The command in a thread, so this process's reactor can play the relay."""
    return await deferToThread(cli, *args)


class Runner:
    """The relay's QueueRunner as apply_requests sees it."""

    def __init__(self, store: IMessageStore) -> None:
        self._store = store
        self.queued: list[str] = []

    @property
    def store(self) -> IMessageStore:
        return self._store

    def notify_queued(self, queue_id: str) -> None:
        self.queued.append(queue_id)


@pytest.fixture
def relay(queue_dir: Path) -> Iterator[tuple[FilesystemStore, Runner]]:
    """A relay holding the lock and polling requests every 0.1 s."""
    store = FilesystemStore(queue_dir, reactor, durable=False)
    runner = Runner(store)
    poll = LoopingCall(apply_requests, queue_dir, runner)
    poll.start(0.1)
    yield store, runner
    poll.stop()
    pytest_twisted.blockon(store.close())


# -- the queue directory ------------------------------------------------------


def test_resolve_queue_prefers_option_then_environment(tmp_path: Path) -> None:
    environ = {"TXSTARTTLS_QUEUE": str(tmp_path)}
    assert resolve_queue("/given", environ) == Path("/given")
    assert resolve_queue(None, environ) == tmp_path
    assert resolve_queue(None, {}) == Path("/var/spool/txstarttls")


def test_wrong_queue_paths_are_one_line_errors_with_66(tmp_path: Path) -> None:
    missing = cli("mailq", "--queue", str(tmp_path / "nope"))
    assert missing.returncode == EX_NOINPUT
    assert missing.stderr.decode().count("\n") == 1
    assert "does not exist" in missing.stderr.decode()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OperatorError, match="not a directory") as error:
        check_queue(tmp_path / "file")
    assert error.value.status == EX_NOINPUT
    with pytest.raises(OperatorError, match="not a txstarttls queue") as error:
        check_queue(tmp_path)
    assert error.value.status == EX_NOINPUT
    assert not (tmp_path / "messages").exists(), "a typo must not become a queue"


@pytest.mark.skipif(ROOT, reason="root reads every directory")
def test_unreadable_queue_is_77(queue_dir: Path) -> None:
    queue_dir.chmod(0)
    try:
        result = cli("mailq", "--queue", str(queue_dir))
    finally:
        queue_dir.chmod(0o700)
    assert result.returncode == EX_NOPERM, result.stderr
    assert b"(run as the relay's user)" in result.stderr
    assert result.stderr.count(b"\n") == 1


def test_an_inaccessible_queue_is_77_in_process(
    queue_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    err = io.StringIO()
    options = argparse.Namespace(command="mailq", queue=str(queue_dir), json=False)
    assert run_command(options, io.StringIO(), err) == EX_NOPERM
    assert err.getvalue() == (
        f"txstarttls: cannot read queue directory {queue_dir}: permission denied "
        "(run as the relay's user)\n"
    )


def test_permission_errors_map_to_77(monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: object) -> list[str]:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "listdir", denied)
    with pytest.raises(OperatorError, match="run as the relay's user") as error:
        list_queue(Path("/somewhere"))
    assert error.value.status == EX_NOPERM


@pytest_twisted.ensureDeferred
async def test_relay_status_sees_the_lock_and_the_pid(queue_dir: Path) -> None:
    assert not relay_status(queue_dir).running
    store = FilesystemStore(queue_dir, reactor, durable=False)
    try:
        status = relay_status(queue_dir)
        assert status.running and status.pid == os.getpid()
    finally:
        await store.close()
    assert not relay_status(queue_dir).running


# -- mailq --------------------------------------------------------------------


def test_mailq_of_an_empty_queue(queue_dir: Path) -> None:
    result = cli("mailq", "--queue", str(queue_dir))
    assert (result.returncode, result.stdout) == (0, b"Mail queue is empty\n")


@pytest_twisted.ensureDeferred
async def test_mailq_lists_every_message_recipient_and_state(queue_dir: Path) -> None:
    deferred, fresh = deferred_entry(), an_entry(sender="")
    await fill(queue_dir, deferred, fresh)
    dropped = an_entry()
    deliver_to_incoming(queue_dir, dropped, CONTENT, durable=False)
    result = cli("mailq", env={"TXSTARTTLS_QUEUE": str(queue_dir)})
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    lines = text.splitlines()
    assert lines[0].startswith("-Queue ID-")
    assert lines[-1] == "-- 1 Kbytes in 3 Requests."
    first = next(line for line in lines if line.startswith(deferred.queue_id))
    assert first.split()[1] == str(len(CONTENT))
    assert first.endswith(" alice@example.org")
    assert "deferred after 2 attempts; next attempt " in text
    assert "(451 4.3.0 mailbox busy)" in text
    assert "bob@example.com [pending]" in text
    assert "carol@example.com [delivered]" in text
    assert any(
        line.startswith(fresh.queue_id) and line.endswith(" <>") for line in lines
    )
    assert "not tried yet; next attempt now" in text
    assert "waiting in incoming/ for the relay to pick it up" in text


@pytest_twisted.ensureDeferred
async def test_mailq_json_is_one_object_per_message(queue_dir: Path) -> None:
    entry = deferred_entry()
    await fill(queue_dir, entry)
    result = cli("mailq", "--json", "--queue", str(queue_dir))
    documents = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(documents) == 1
    document = documents[0]
    assert document["queue_id"] == entry.queue_id
    assert document["queue_name"] == "deferred"
    assert document["message_size"] == len(CONTENT)
    assert document["recipients"][0] == {
        "address": "bob@example.com",
        "status": "pending",
        "delay_reason": "451 4.3.0 mailbox busy",
        "dsn": "4.3.0",
        "attempts": 2,
    }


@pytest_twisted.ensureDeferred
async def test_mailq_reports_a_corrupt_envelope_and_goes_on(queue_dir: Path) -> None:
    good = an_entry()
    await fill(queue_dir, good)
    bad = new_queue_id()
    (queue_dir / "messages" / f"{bad}.json").write_text("{not json")
    result = cli("mailq", "--queue", str(queue_dir))
    assert result.returncode == 0
    assert good.queue_id in result.stdout.decode()
    assert f"message {bad} in messages/ is corrupt" in result.stderr.decode()


def test_format_mailq_counts_and_escapes() -> None:
    reply = "451 \x1b[2Jevil"
    entry = an_entry(size=1500).with_recipient("bob@example.com", last_reply=reply)
    other = an_entry(size=1000)
    lines = format_mailq(
        [QueuedMessage(entry, "messages"), QueuedMessage(other, "messages")], 0.0
    )
    assert lines[-1] == "-- 3 Kbytes in 2 Requests."
    assert not any("\x1b" in line for line in lines)
    assert any("(451 \\x1b[2Jevil)" in line for line in lines)
    single = format_mailq([QueuedMessage(other, "messages")], 0.0)
    assert single[-1] == "-- 1 Kbytes in 1 Request."
    assert format_mailq([], 0.0) == ["Mail queue is empty"]
    assert json.loads(mailq_json([QueuedMessage(other, "incoming")])[0])[
        "queue_name"
    ] == ("incoming")


def test_printable_keeps_text_and_escapes_controls() -> None:
    assert printable("tab\tand\nnewline ü") == "tab\tand\nnewline ü"
    assert printable("a\rb\x00c\x9bd\u2028") == "a\\rb\\x00c\\x9bd\\u2028"


# -- show ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_show_prints_envelope_headers_and_body_on_request(
    queue_dir: Path,
) -> None:
    entry = deferred_entry()
    await fill(queue_dir, entry)
    result = cli("show", "--queue", str(queue_dir), entry.queue_id)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert f"Queue ID:     {entry.queue_id} (deferred in messages/)" in text
    assert "Sender:       <alice@example.org>" in text
    assert "<bob@example.com> pending, 2 attempts, dsn=4.3.0" in text
    assert "last reply: 451 4.3.0 mailbox busy" in text
    assert "Subject: queued\n" in text
    assert "the body" not in text
    with_body = cli("show", "--body", "--queue", str(queue_dir), entry.queue_id)
    assert with_body.stdout.decode().endswith("\nthe body\n")


def write_old_layout(directory: Path, entry: QueueEntry, content: bytes) -> None:
    """A message as a relay of the two-file layout queued it (before ID.msg)."""
    messages = directory / "messages"
    messages.mkdir(parents=True, exist_ok=True, mode=0o700)
    (messages / f"{entry.queue_id}.eml").write_bytes(content)
    (messages / f"{entry.queue_id}.json").write_bytes(entry.to_json())


@pytest_twisted.ensureDeferred
async def test_mailq_and_show_read_both_layouts_and_updated_envelopes(
    queue_dir: Path,
) -> None:
    """One-file messages (updated or not) and those an older relay queued."""
    fresh, tried = an_entry(), an_entry()
    await fill(queue_dir, fresh, tried)
    store = FilesystemStore(queue_dir, reactor, durable=False)
    try:
        await store.update(
            dataclasses.replace(deferred_entry(), queue_id=tried.queue_id)
        )
    finally:
        await store.close()
    old_content = b"Subject: old\r\n\r\nqueued before the upgrade\r\n"
    old = an_entry(old_content, attempts=1)
    write_old_layout(queue_dir, old, old_content)
    # What a removal cut short leaves: an envelope whose message is gone.
    gone = an_entry()
    (queue_dir / "messages" / f"{gone.queue_id}.json").write_bytes(gone.to_json())

    messages, problems = list_queue(queue_dir)
    assert problems == []
    assert [m.queue_id for m in messages] == sorted(
        [fresh.queue_id, tried.queue_id, old.queue_id]
    )
    states = {m.queue_id: m.state for m in messages}
    assert states[fresh.queue_id] == "queued"
    assert states[tried.queue_id] == "deferred"
    assert states[old.queue_id] == "deferred"
    result = cli("mailq", "--queue", str(queue_dir))
    assert result.returncode == 0, result.stderr
    assert "-- 1 Kbytes in 3 Requests." in result.stdout.decode()
    for entry, body in ((fresh, "the body"), (old, "queued before the upgrade")):
        shown = cli("show", "--body", "--queue", str(queue_dir), entry.queue_id)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.decode().endswith(f"\n{body}\n")
    tried_shown = cli("show", "--queue", str(queue_dir), tried.queue_id).stdout
    assert f"{tried.queue_id} (deferred in messages/)".encode() in tried_shown
    assert b"last reply: 451 4.3.0 mailbox busy" in tried_shown
    unknown = cli("show", "--queue", str(queue_dir), gone.queue_id)
    assert unknown.returncode == EX_UNAVAILABLE

    deleted = cli("delete", "--queue", str(queue_dir), old.queue_id, fresh.queue_id)
    assert deleted.returncode == 0, deleted.stderr
    assert listing(queue_dir / "messages") == sorted(
        [f"{tried.queue_id}.msg", f"{tried.queue_id}.json", f"{gone.queue_id}.json"]
    )


@pytest_twisted.ensureDeferred
async def test_show_of_a_message_file_with_a_bad_header(queue_dir: Path) -> None:
    await fill(queue_dir, an_entry())
    bad = new_queue_id()
    (queue_dir / "messages" / f"{bad}.msg").write_bytes(b"Subject: no header\r\n")
    result = cli("show", "--queue", str(queue_dir), bad)
    assert result.returncode == EX_DATAERR
    assert f"message {bad} is corrupt" in result.stderr.decode()
    listed = cli("mailq", "--queue", str(queue_dir))
    assert listed.returncode == 0
    assert f"message {bad} in messages/ is corrupt" in listed.stderr.decode()


def test_show_unknown_and_malformed_ids(queue_dir: Path) -> None:
    unknown = cli("show", "--queue", str(queue_dir), new_queue_id())
    assert unknown.returncode == EX_UNAVAILABLE
    assert b"no message" in unknown.stderr
    malformed = cli("show", "--queue", str(queue_dir), "../../etc/passwd")
    assert malformed.returncode == EX_USAGE
    assert b"invalid queue id" in malformed.stderr


def test_format_message_escapes_hostile_headers() -> None:
    entry = an_entry(client_address="127.0.0.1", client_helo="evil\x1b]0;x")
    text = format_message(
        QueuedMessage(entry, "messages"),
        b"Subject: \x1b[31mred\r\n\r\nbody\x07\r\n",
        time.time(),
        body=True,
    )
    assert "\x1b" not in text and "\x07" not in text
    assert "Subject: \\x1b[31mred" in text
    assert "Client:       127.0.0.1 (HELO evil\\x1b]0;x)" in text


# -- flush --------------------------------------------------------------------


def test_flush_without_a_relay(queue_dir: Path) -> None:
    result = cli("flush", "--queue", str(queue_dir))
    assert result.returncode == 0
    assert result.stdout.decode() == (
        f"no relay is running on {queue_dir}; messages will be tried when it starts\n"
    )
    assert (queue_dir / FLUSH_REQUEST).exists(), "kept for the next relay"


@pytest_twisted.ensureDeferred
async def test_flush_with_a_relay_holding_the_queue(
    queue_dir: Path, relay: tuple[FilesystemStore, Runner]
) -> None:
    result = await cli_async("flush", "--queue", str(queue_dir))
    assert result.returncode == 0
    assert f"the relay on {queue_dir} (pid {os.getpid()})" in result.stdout.decode()
    assert (queue_dir / FLUSH_REQUEST).exists()


# -- delete and requeue without a relay ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_without_a_relay(queue_dir: Path) -> None:
    keep, gone = an_entry(), an_entry()
    await fill(queue_dir, keep, gone)
    unknown = new_queue_id()
    result = cli("delete", "--queue", str(queue_dir), gone.queue_id, unknown)
    assert result.returncode == EX_UNAVAILABLE, "an unknown id is reported"
    assert result.stdout.decode() == f"{gone.queue_id}: deleted\n"
    assert f"no message {unknown}" in result.stderr.decode()
    messages, _ = list_queue(queue_dir)
    assert [m.queue_id for m in messages] == [keep.queue_id]
    assert listing(queue_dir / "messages") == [f"{keep.queue_id}.msg"]


@pytest_twisted.ensureDeferred
async def test_delete_all_includes_messages_not_yet_picked_up(queue_dir: Path) -> None:
    await fill(queue_dir, an_entry(), an_entry())
    deliver_to_incoming(queue_dir, an_entry(), CONTENT, durable=False)
    result = cli("delete", "--all", "--queue", str(queue_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().count(": deleted\n") == 3
    assert list_queue(queue_dir) == ([], [])
    assert os.listdir(queue_dir / "incoming") == []
    again = cli("delete", "--all", "--queue", str(queue_dir))
    assert again.stdout == b"Mail queue is empty; nothing to delete\n"


def test_delete_needs_ids_or_all(queue_dir: Path) -> None:
    neither = cli("delete", "--queue", str(queue_dir))
    both = cli("delete", "--all", "--queue", str(queue_dir), new_queue_id())
    assert neither.returncode == both.returncode == EX_USAGE
    malformed = cli("delete", "--queue", str(queue_dir), "x", new_queue_id())
    assert malformed.returncode == EX_USAGE


@pytest_twisted.ensureDeferred
async def test_requeue_without_a_relay_keeps_recipient_states(queue_dir: Path) -> None:
    entry = deferred_entry()
    await fill(queue_dir, entry)
    result = cli("requeue", "--queue", str(queue_dir), entry.queue_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"{entry.queue_id}: requeued\n"
    messages, _ = list_queue(queue_dir)
    assert messages[0].entry == dataclasses.replace(entry, next_attempt=0.0)


# -- delete and requeue through a running relay -------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_through_a_running_relay(
    queue_dir: Path, relay: tuple[FilesystemStore, Runner]
) -> None:
    store, _ = relay
    keep, gone = an_entry(), an_entry()
    await store.add(keep, CONTENT)
    await store.add(gone, CONTENT)
    result = await cli_async("delete", "--queue", str(queue_dir), gone.queue_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"{gone.queue_id}: deleted\n"
    assert store.queue_ids() == [keep.queue_id]
    assert pending_requests(queue_dir) == []
    assert os.listdir(queue_dir / "requests") == []


@pytest_twisted.ensureDeferred
async def test_requeue_through_a_running_relay_reschedules_only(
    queue_dir: Path, relay: tuple[FilesystemStore, Runner]
) -> None:
    store, runner = relay
    entry = deferred_entry()
    await store.add(entry, CONTENT)
    result = await cli_async("requeue", "--all", "--queue", str(queue_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == f"{entry.queue_id}: requeued\n"
    assert runner.queued == [entry.queue_id]
    assert store.get(entry.queue_id) == entry, "the envelope is the runner's to write"


@pytest_twisted.ensureDeferred
async def test_a_relay_that_does_not_answer_changes_nothing(queue_dir: Path) -> None:
    entry = an_entry()
    store = FilesystemStore(queue_dir, reactor, durable=False)
    try:
        await store.add(entry, CONTENT)
        out, err = io.StringIO(), io.StringIO()
        status = await change_queue(
            clock, queue_dir, "delete", [entry.queue_id], out, err, wait=0.3
        )
        assert status == EX_TEMPFAIL
        assert "did not take the delete request" in err.getvalue()
        assert "nothing was changed" in err.getvalue()
        assert os.listdir(queue_dir / "requests") == [], "the request is withdrawn"
        assert store.queue_ids() == [entry.queue_id]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_wait_zero_leaves_the_request_to_the_relay(queue_dir: Path) -> None:
    entry = an_entry()
    store = FilesystemStore(queue_dir, reactor, durable=False)
    runner = Runner(store)
    try:
        await store.add(entry, CONTENT)
        out = io.StringIO()
        status = await change_queue(
            clock, queue_dir, "delete", [entry.queue_id], out, io.StringIO(), wait=0
        )
        assert status == 0
        assert "delete requested from the relay" in out.getvalue()
        assert len(pending_requests(queue_dir)) == 1
        assert await apply_requests(queue_dir, runner) == 1
        assert store.queue_ids() == []
    finally:
        await store.close()


# -- the request files --------------------------------------------------------


def test_request_round_trip_and_strictness(tmp_path: Path) -> None:
    request = QueueRequest("delete", (new_queue_id(),), 1_790_000_000.5)
    path = write_request(tmp_path, request)
    assert path.parent == tmp_path / "requests"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_request(path) == request
    assert pending_requests(tmp_path) == [path]
    for bad in (
        b"[]",
        b"{}",
        b'{"version": 2, "action": "delete", "queue_ids": [], "created": 1}',
        b'{"version": 1, "action": "purge", "queue_ids": [], "created": 1}',
        b'{"version": 1, "action": "delete", "queue_ids": ["../x"], "created": 1}',
        b'{"version": 1, "action": "delete", "queue_ids": [], "created": true}',
        b'{"version": 1, "action": "delete", "queue_ids": [], "created": 1, "x": 1}',
    ):
        with pytest.raises(RequestError):
            QueueRequest.from_json(bad)


@pytest_twisted.ensureDeferred
async def test_apply_requests_drops_bad_old_and_stale_files(queue_dir: Path) -> None:
    entry = an_entry()
    store = FilesystemStore(queue_dir, reactor, durable=False)
    runner = Runner(store)
    try:
        await store.add(entry, CONTENT)
        folder = queue_dir / "requests"
        old = write_request(queue_dir, QueueRequest("delete", (entry.queue_id,), 1.0))
        broken = old.with_name("0" * 19 + ".1.00000000.json")
        broken.write_bytes(b"{broken")
        leftover = folder / ".0000000000000000001.1.00000000.json"
        leftover.write_bytes(b"")
        past = time.time() - REQUEST_LIFETIME - 10
        os.utime(leftover, (past, past))
        stranger = folder / "notes.txt"
        stranger.write_text("kept")
        assert await apply_requests(queue_dir, runner) == 0
        assert sorted(os.listdir(folder)) == ["notes.txt"]
        assert store.queue_ids() == [entry.queue_id], "a stale delete is never applied"
        missing = QueueRequest("requeue", (new_queue_id(),), time.time())
        write_request(queue_dir, missing)
        assert await apply_requests(queue_dir, runner) == 1
        assert runner.queued == []
        assert await apply_requests(tmp_missing := queue_dir / "nowhere", runner) == 0
        assert not tmp_missing.exists()
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_the_real_queue_runner_takes_requests(queue_dir: Path) -> None:
    """The wiring the relay needs: QueueRunner is a RequestRunner."""
    store = FilesystemStore(queue_dir, reactor, durable=False)
    try:
        entry = an_entry()
        await store.add(entry, CONTENT)
        fake_clock = Clock()
        runner: RequestRunner = QueueRunner(
            store, [cast(Any, object())], fake_clock, DeliverySettings("relay.test")
        )
        write_request(
            queue_dir, QueueRequest("requeue", (entry.queue_id,), time.time())
        )
        assert await apply_requests(queue_dir, runner) == 1
        assert [call.getTime() for call in fake_clock.getDelayedCalls()] == [0.0]
    finally:
        await store.close()


# -- passwd -------------------------------------------------------------------


def test_passwd_round_trip_with_load_users(tmp_path: Path) -> None:
    users = tmp_path / "users"
    added = cli("passwd", "--users", str(users), "--stdin", "alice", stdin=b"s3cret\n")
    assert added.returncode == 0, added.stderr
    assert added.stdout.decode() == f"user alice added to {users}\n"
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert load_users(users)["alice"].verify(b"s3cret")
    with users.open("a") as file:
        file.write("# a comment the operator wrote\n")
    cli("passwd", "--users", str(users), "--stdin", "bob", stdin=b"other")
    changed = cli("passwd", "--users", str(users), "--stdin", "alice", stdin=b"new\r\n")
    assert changed.stdout.decode() == f"password of alice changed in {users}\n"
    table = load_users(users)
    assert table["alice"].verify(b"new") and table["bob"].verify(b"other")
    assert "# a comment the operator wrote" in users.read_text()
    deleted = cli("passwd", "--users", str(users), "--delete", "alice")
    assert deleted.returncode == 0
    assert set(load_users(users)) == {"bob"}
    unknown = cli("passwd", "--users", str(users), "--delete", "alice")
    assert unknown.returncode == EX_NOUSER
    assert stat.S_IMODE(users.stat().st_mode) == 0o600


def passwd_options(users: Path, user: str, **changes: Any) -> argparse.Namespace:
    values = {"users": str(users), "user": user, "stdin": False, "delete": False}
    return argparse.Namespace(command="passwd", **{**values, **changes})


def test_passwd_asks_twice_and_refuses_a_mismatch(tmp_path: Path) -> None:
    users = tmp_path / "users"
    answers = iter(["one", "two"])
    err = io.StringIO()
    status = run_command(
        passwd_options(users, "alice"),
        io.StringIO(),
        err,
        ask=lambda prompt: next(answers),
    )
    assert status == EX_DATAERR
    assert err.getvalue() == "txstarttls: the passwords do not match; nothing changed\n"
    assert not users.exists()
    prompts: list[str] = []

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        return "same"

    assert run_command(passwd_options(users, "alice"), io.StringIO(), ask=ask) == 0
    assert prompts == ["New password for alice: ", "Retype the password: "]
    assert load_users(users)["alice"].verify(b"same")


@pytest.mark.parametrize("name", ["", "a b", "a:b", "#a", "a\nb", "a\x1bb"])
def test_passwd_refuses_names_the_file_cannot_hold(tmp_path: Path, name: str) -> None:
    err = io.StringIO()
    options = passwd_options(tmp_path / "users", name, stdin=True)
    status = run_command(options, io.StringIO(), err, stdin=io.StringIO("pw\n"))
    assert status == EX_USAGE
    assert err.getvalue().count("\n") == 1


def test_passwd_refuses_an_empty_password_and_a_broken_file(tmp_path: Path) -> None:
    users = tmp_path / "users"
    with pytest.raises(OperatorError) as error:
        set_password(users, "alice", "")
    assert error.value.status == EX_DATAERR
    users.write_text("alice:not-a-hash\n")
    with pytest.raises(OperatorError, match=r"line 1.*fix it first") as error:
        set_password(users, "bob", "pw")
    assert error.value.status == EX_CONFIG
    assert users.read_text() == "alice:not-a-hash\n"
    missing = cli("passwd", "--users", str(tmp_path / "none"), "--delete", "x")
    assert missing.returncode == EX_NOINPUT
