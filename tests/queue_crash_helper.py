"""Crash the queue at chosen instants, for tests/test_queue.py (not collected).

``python tests/queue_crash_helper.py steps BASE``
    For k = 0, 1, 2, ...: fork a child that runs :func:`scenario` in
    ``BASE/k`` and dies with ``os._exit`` just before its k-th file-system
    call on the queue (as abruptly as SIGKILL), until a child gets through
    the whole scenario. Prints one JSON line per k; the child records what
    was acknowledged in ``BASE/k.acks`` and the call it died before (its
    name and path) in ``BASE/k.call``.

``python tests/queue_crash_helper.py load DIR``
    Add messages with 20 in flight, durable, forever; print each queue id as
    its add() fires, for the parent to SIGKILL at a random moment.

The scenario exercises every write path: a message an older relay queued in
the two-file layout, a ``sendmail`` drop into ``incoming/``, recovery with
adoption, concurrent adds, updates (of both layouts), a removal and an add in
one batch, removals of updated messages (both layouts), then a second drop
adopted at run time.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads

from txstarttls.queue import (
    FilesystemStore,
    QueueEntry,
    RecipientState,
    deliver_to_incoming,
    files,
    new_queue_id,
)

CRASHED = 99
WRAPPED = ("open", "write", "fsync", "replace", "rename", "link", "unlink", "mkdir")


def message(queue_id: str) -> tuple[QueueEntry, bytes]:
    """A message whose content names its id, so a check can tell it is intact."""
    content = f"Message-ID: <{queue_id}@crash.test>\r\n\r\n".encode() + b"x" * 3000
    entry = QueueEntry(
        queue_id=queue_id,
        sender="sender@crash.test",
        recipients=(RecipientState("one@crash.test"), RecipientState("two@crash.test")),
        arrival_time=time.time(),
        size=len(content),
    )
    return entry, content


def arm(directory: str, crash_at: int) -> None:
    """Make the ``crash_at``-th os call on ``directory`` kill the process."""
    counter = itertools.count()
    queue_fds: set[int] = set()
    real: dict[str, Callable[..., Any]] = {name: getattr(os, name) for name in WRAPPED}
    real_close = os.close

    def inside(argument: object) -> bool:
        path = str(argument) if isinstance(argument, str | Path) else ""
        return path == directory or path.startswith(directory + "/")

    def ours(args: tuple[Any, ...], name: str) -> bool:
        if name in ("write", "fsync"):
            return args[0] in queue_fds
        return any(inside(argument) for argument in args)

    def record(name: str, args: tuple[Any, ...]) -> None:
        """Leave ``DIR.call``: the call the child died before, and its path."""
        if name in ("write", "fsync"):
            path = os.readlink(f"/proc/self/fd/{args[0]}")
        else:
            path = [str(a) for a in args if isinstance(a, str | Path)][-1]
        fd = real["open"](f"{directory}.call", os.O_WRONLY | os.O_CREAT, 0o600)
        real["write"](fd, f"{name} {path[len(directory) + 1 :]}".encode())
        real_close(fd)

    def wrap(name: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if ours(args, name) and next(counter) == crash_at:
                record(name, args)
                os._exit(CRASHED)
            result = real[name](*args, **kwargs)
            if name == "open" and ours(args, name):
                queue_fds.add(result)
            return result

        return wrapper

    def close(fd: int) -> None:
        queue_fds.discard(fd)
        real_close(fd)

    for name in WRAPPED:
        setattr(os, name, wrap(name))
    os.close = close
    # New messages are renamed into place by one call of the queue's own.
    real["rename_no_replace"] = files.rename_no_replace
    files.rename_no_replace = wrap("rename_no_replace")


async def scenario(reactor: IReactorFromThreads, directory: str, acks: int) -> None:
    def ack(fact: str) -> None:
        os.write(acks, fact.encode() + b"\n")

    def acknowledging(deferred: defer.Deferred[Any], fact: str) -> defer.Deferred[Any]:
        def record(result: object) -> object:
            ack(fact)
            return result

        return deferred.addCallback(record)

    legacy = new_queue_id()
    write_two_file_message(directory, legacy)
    ack(f"add {legacy}")
    first_drop = new_queue_id()
    deliver_to_incoming(directory, *message(first_drop), durable=False)
    ack(f"add {first_drop}")
    store = FilesystemStore(directory, reactor, durable=False)
    store.recover()
    ids = [new_queue_id() for _ in range(3)]
    await defer.gatherResults(
        [acknowledging(store.add(*message(i)), f"add {i}") for i in ids]
    )
    updated = store.get(ids[0]).with_recipient("one@crash.test", status="delivered")
    legacy_updated = store.get(legacy).with_recipient(
        "one@crash.test", status="delivered"
    )
    later = new_queue_id()
    ack(f"intent-remove {ids[1]}")
    await defer.gatherResults(
        [
            acknowledging(store.update(updated), f"update {ids[0]}"),
            acknowledging(store.remove(ids[1]), f"remove {ids[1]}"),
            acknowledging(store.add(*message(later)), f"add {later}"),
            acknowledging(store.update(legacy_updated), f"update {legacy}"),
        ]
    )
    # Updated messages leave an envelope beside them (or are two files).
    ack(f"intent-remove {ids[0]}")
    ack(f"intent-remove {legacy}")
    await defer.gatherResults(
        [
            acknowledging(store.remove(ids[0]), f"remove {ids[0]}"),
            acknowledging(store.remove(legacy), f"remove {legacy}"),
        ]
    )
    second_drop = new_queue_id()
    deliver_to_incoming(directory, *message(second_drop), durable=False)
    ack(f"add {second_drop}")
    await store.adopt_incoming()
    await store.close()


def write_two_file_message(directory: str, queue_id: str) -> None:
    """Queue a message as a relay before the one-file layout did.

    Written with ``open()``, which the crash never interrupts: only the
    directories are made through ``os``, before any file exists.
    """
    entry, content = message(queue_id)
    messages = Path(directory) / "messages"
    messages.mkdir(mode=0o700, parents=True)
    (messages / f"{queue_id}.eml").write_bytes(content)
    (messages / f"{queue_id}.json").write_bytes(entry.to_json())


def run_child(directory: str, acks_path: str, crash_at: int) -> None:
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor, task

    acks = os.open(acks_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    arm(directory, crash_at)
    typed = cast(IReactorFromThreads, reactor)
    task.react(lambda _: defer.ensureDeferred(scenario(typed, directory, acks)))


def steps(base: str) -> None:
    for crash_at in itertools.count():
        directory = f"{base}/{crash_at}"
        acks_path = f"{base}/{crash_at}.acks"
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                run_child(directory, acks_path, crash_at)
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps({"k": crash_at, "exit": code}), flush=True)
        if code != CRASHED:
            return


def load(directory: str) -> None:
    from twisted.internet import reactor, task

    typed = cast(IReactorFromThreads, reactor)

    async def forever() -> None:
        store = FilesystemStore(directory, typed)
        store.recover()
        finished: defer.Deferred[None] = defer.Deferred()

        def one() -> None:
            queue_id = new_queue_id()
            deferred = store.add(*message(queue_id))
            deferred.addCallback(lambda _: print(queue_id, flush=True))
            deferred.addCallback(lambda _: one())
            deferred.addErrback(finished.errback)

        for _ in range(20):
            one()
        await finished

    task.react(lambda _: defer.ensureDeferred(forever()))


if __name__ == "__main__":
    mode, where = sys.argv[1], sys.argv[2]
    steps(where) if mode == "steps" else load(where)
