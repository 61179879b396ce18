"""In the relay: applying the ``delete`` and ``requeue`` requests operators leave."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Protocol

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from txstarttls.operator.requests import (
    REQUEST_LIFETIME,
    REQUEST_NAME,
    REQUESTS_DIRECTORY,
    QueueRequest,
    RequestError,
    claimed_name,
    read_request,
)
from txstarttls.queue import CorruptEntry, IMessageStore, MessageNotFound, StoreError

log = Logger(namespace="txstarttls.operator")


class RequestRunner(Protocol):
    """What :func:`apply_requests` needs of the relay: QueueRunner fits."""

    @property
    def store(self) -> IMessageStore: ...

    def notify_queued(self, queue_id: str) -> None: ...


def apply_requests(directory: Path | str, runner: RequestRunner) -> Deferred[int]:
    """In the relay: apply every pending ``delete``/``requeue`` request.

    Call it from the relay's one-second poll (``OperatorRequests``); it fires
    with the number of requests applied and never fails, so the poll goes
    on. Each request is claimed by renaming it (the waiting command can then
    no longer withdraw it) and removed once applied; a delete is done when
    the store has removed the files. A requeue only reschedules the message
    in the runner: rewriting its envelope here could undo an attempt that is
    just finishing, and the runner writes ``next_attempt`` after it anyway.
    """
    return ensureDeferred(_apply_all(Path(directory), runner)).addErrback(_apply_failed)


def _apply_failed(failure: Failure) -> int:
    log.failure("applying operator requests failed", failure)
    return 0


async def _apply_all(directory: Path, runner: RequestRunner) -> int:
    folder = directory / REQUESTS_DIRECTORY
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return 0
    except OSError as error:
        log.error("cannot list {folder}: {error}", folder=str(folder), error=str(error))
        return 0
    applied = 0
    for name in names:
        path = folder / name
        if name.startswith("."):
            # A temporary of a crashed command or a claim of a crashed relay.
            if _older_than(path, REQUEST_LIFETIME):
                path.unlink(missing_ok=True)
            continue
        if not REQUEST_NAME.fullmatch(name):
            continue
        claimed = claimed_name(path)
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            continue  # withdrawn by the command that wrote it
        try:
            request = read_request(claimed)
        except (RequestError, OSError) as error:
            log.error(
                "operator request {name} dropped: {error}", name=name, error=str(error)
            )
            claimed.unlink(missing_ok=True)
            continue
        if time.time() - request.created > REQUEST_LIFETIME:
            log.warn("operator request {name} dropped: too old", name=name)
        else:
            await _apply(request, runner)
            applied += 1
        claimed.unlink(missing_ok=True)
    return applied


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except FileNotFoundError:
        return False


async def _apply(request: QueueRequest, runner: RequestRunner) -> None:
    store = runner.store
    for queue_id in request.queue_ids:
        try:
            if request.action == "delete":
                await store.remove(queue_id)
                log.info("{queue_id}: deleted by the operator", queue_id=queue_id)
            else:
                store.get(queue_id)
                runner.notify_queued(queue_id)
                log.info("{queue_id}: requeued by the operator", queue_id=queue_id)
        except MessageNotFound:
            log.info("{queue_id}: not in the queue any more", queue_id=queue_id)
        except (StoreError, CorruptEntry) as error:
            log.error(
                "{queue_id}: operator {action} failed: {error}",
                queue_id=queue_id,
                action=request.action,
                error=str(error),
            )
