"""``delete``, ``requeue`` and ``flush``: changing the queue, safely beside a relay.

With the lock free, a command opens the
:class:`~txstarttls.queue.FilesystemStore` itself (holding the lock for the
few milliseconds it takes); while a relay holds it, the command leaves a
request for the relay and waits to see it done.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO

from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater

from txstarttls.operator.directory import RelayStatus, check_queue, relay_status
from txstarttls.operator.errors import (
    EX_DATAERR,
    EX_OK,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    OperatorError,
    os_error,
    store_error,
)
from txstarttls.operator.listing import find_message, list_queue
from txstarttls.operator.requests import QueueRequest, claimed_name, write_request
from txstarttls.queue import (
    CorruptEntry,
    FilesystemStore,
    MessageNotFound,
    StoreError,
    StoreLocked,
    valid_queue_id,
)

FLUSH_REQUEST: Final = "flush"
"""Same name as ``txstarttls.service.FLUSH_REQUEST`` (the relay polls it)."""
POLL_INTERVAL: Final = 0.1
DEFAULT_WAIT: Final = 10.0


def _remove_incoming(directory: Path, queue_id: str) -> None:
    """Delete a message the relay has not adopted yet: envelope first.

    Its adoption links the envelope before unlinking it, so either the
    message is in ``messages/`` afterwards (the caller then deletes it there)
    or it never gets there.
    """
    folder = directory / "incoming"
    for suffix in (".json", ".eml"):
        try:
            (folder / f"{queue_id}{suffix}").unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            raise os_error("remove", folder / f"{queue_id}{suffix}", error) from None


def _in_messages(directory: Path, queue_id: str) -> bool:
    messages = directory / "messages"
    # ID.msg, or ID.json for a message an older relay queued as two files.
    return (messages / f"{queue_id}.msg").exists() or (
        messages / f"{queue_id}.json"
    ).exists()


async def change_queue(
    reactor: IReactorTime,
    directory: Path,
    action: str,
    queue_ids: Sequence[str],
    stdout: TextIO,
    stderr: TextIO,
    *,
    all_messages: bool = False,
    wait: float = DEFAULT_WAIT,
) -> int:
    """``txstarttls delete`` / ``requeue``: directly, or through the running relay.

    Unknown ids are reported (69) and the known ones still handled; a
    malformed id stops everything (64) before anything changes.
    """
    check_queue(directory)
    for queue_id in queue_ids:
        if not valid_queue_id(queue_id):
            find_message(directory, queue_id)  # raises the one-line usage error
    listed, _ = list_queue(directory)
    status = EX_OK
    if all_messages:
        targets = listed
    else:
        present = {message.queue_id: message for message in listed}
        targets = []
        for queue_id in dict.fromkeys(queue_ids):
            if queue_id in present:
                targets.append(present[queue_id])
            else:
                stderr.write(
                    f"txstarttls: no message {queue_id} in the queue {directory}\n"
                )
                status = EX_UNAVAILABLE
    if all_messages and not targets:
        stdout.write(f"Mail queue is empty; nothing to {action}\n")
        return status
    spooled = [m.queue_id for m in targets if m.location == "messages"]
    for message in targets:
        if message.location != "incoming":
            continue
        if action == "delete":
            _remove_incoming(directory, message.queue_id)
            if _in_messages(directory, message.queue_id):
                spooled.append(message.queue_id)  # adopted meanwhile
                continue
            stdout.write(f"{message.queue_id}: deleted\n")
        else:
            stdout.write(
                f"{message.queue_id}: requeued (still in incoming/; tried as soon as "
                "the relay picks it up)\n"
            )
    if spooled:
        result = await _change_spooled(
            reactor, directory, action, spooled, stdout, stderr, wait
        )
        status = result or status
    return status


async def _change_spooled(
    reactor: IReactorTime,
    directory: Path,
    action: str,
    queue_ids: list[str],
    stdout: TextIO,
    stderr: TextIO,
    wait: float,
) -> int:
    try:
        store = FilesystemStore(directory, IReactorFromThreads(reactor))
    except StoreLocked:
        return await _through_relay(
            reactor, directory, action, queue_ids, stdout, stderr, wait
        )
    except StoreError as error:
        raise store_error(error) from None
    status = EX_OK
    try:
        for queue_id in queue_ids:
            if action == "delete":
                await store.remove(queue_id)
            else:
                try:
                    entry = store.get(queue_id)
                except MessageNotFound:
                    stderr.write(
                        f"txstarttls: no message {queue_id} in the queue {directory}\n"
                    )
                    status = EX_UNAVAILABLE
                    continue
                await store.update(dataclasses.replace(entry, next_attempt=0.0))
            stdout.write(f"{queue_id}: {action}d\n")
    except StoreError as error:
        raise store_error(error) from None
    except CorruptEntry as error:
        raise OperatorError(f"cannot {action}: {error}", EX_DATAERR) from None
    finally:
        await store.close()
    return status


async def _through_relay(
    reactor: IReactorTime,
    directory: Path,
    action: str,
    queue_ids: list[str],
    stdout: TextIO,
    stderr: TextIO,
    wait: float,
) -> int:
    relay = relay_status(directory).describe(directory)
    path = write_request(directory, QueueRequest(action, tuple(queue_ids), time.time()))
    if wait <= 0:
        stdout.write(
            f"{action} requested from {relay}; it applies it within a second\n"
        )
        return EX_OK
    outcome = await _wait_for_relay(reactor, path, wait)
    if outcome == "withdrawn":
        stderr.write(
            f"txstarttls: {relay} did not take the {action} request within "
            f"{wait:g} s; nothing was changed (is it stuck or too old to take "
            "requests?)\n"
        )
        return EX_TEMPFAIL
    if outcome == "busy":
        stderr.write(
            f"txstarttls: {relay} is still applying the {action} request; check "
            "with mailq\n"
        )
        return EX_TEMPFAIL
    status = EX_OK
    for queue_id in queue_ids:
        if action == "delete" and _in_messages(directory, queue_id):
            stderr.write(
                f"txstarttls: {queue_id}: {relay} could not delete it; see its log\n"
            )
            status = EX_TEMPFAIL
        else:
            stdout.write(f"{queue_id}: {action}d\n")
    return status


async def _wait_for_relay(clock: IReactorTime, path: Path, wait: float) -> str:
    """``done``, ``withdrawn`` (never taken; removed again) or ``busy``."""
    claimed = claimed_name(path)
    for _ in range(2):
        deadline = clock.seconds() + wait
        while True:
            if not path.exists() and not claimed.exists():
                return "done"
            if clock.seconds() >= deadline:
                break
            await deferLater(clock, POLL_INTERVAL, lambda: None)
        try:
            path.unlink()
        except FileNotFoundError:
            continue  # taken: give it as long again to finish
        return "withdrawn"
    return "busy"


def request_flush(directory: Path) -> RelayStatus:
    """Create ``DIR/flush``; a relay retries every deferred message when it sees it.

    Left in place when no relay runs, so the next one flushes once started.
    """
    check_queue(directory)
    status = relay_status(directory)
    path = directory / FLUSH_REQUEST
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    except OSError as error:
        raise os_error("create", path, error) from None
    return status
