"""The writer thread: every write to the spool, run in batches (group commit).

The thread takes all pending operations as one batch: it writes every file
of the batch, starts their writeback together so that each fsync finds
little left to do, and fsyncs each touched directory once for the whole
batch. Throughput grows with concurrent arrivals, and the reactor thread
never waits on the disk.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from txstarttls.queue.errors import MessageNotFound, StoreError, disk
from txstarttls.queue.files import START_WRITEBACK, fsync_directory, start_writeback
from txstarttls.queue.operations import Operation

# The spool logs as one component, whichever of its modules speaks.
log = Logger(namespace="txstarttls.queue")

BATCH_MAX_OPERATIONS: Final = 256
BATCH_MAX_BYTES: Final = 8 * 1024 * 1024


class BatchWriter:
    """One thread that runs a store's operations, a batch at a time."""

    def __init__(
        self,
        directory: Path,
        reactor: IReactorFromThreads,
        *,
        durable: bool,
        on_stopped: Callable[[], None],
    ) -> None:
        self.directory = directory
        self._reactor = reactor
        self._durable = durable
        self._on_stopped = on_stopped
        self._pending: deque[Operation] = deque()
        self._condition = threading.Condition()
        self.io_lock = threading.Lock()
        """Held while a batch runs; recovery holds it to keep batches out."""
        self._closing = False
        self.in_flight: set[str] = set()
        """Messages being added: not acknowledged yet, so not to be listed."""
        self._thread = threading.Thread(
            target=self._write_loop,
            name=f"txstarttls queue writer {directory}",
            daemon=True,
        )
        # Started on first use, not here: twistd builds the service before
        # it forks into the background, and a thread does not survive a fork.
        self._thread_started = False

    # -- the reactor's side ----------------------------------------------------

    def submit(self, operation: Operation, deferred: Deferred[Any]) -> bool:
        """Run ``operation`` soon and fire ``deferred`` with its outcome.

        False, with ``deferred`` failed, once the writer is stopping.
        """
        operation.deferred = deferred
        if not self._enqueue(operation):
            deferred.errback(self.closed_error())
            return False
        if operation.hidden_until_done and operation.queue_id is not None:
            self.in_flight.add(operation.queue_id)
        return True

    def run_blocking(self, operation: Operation) -> bool:
        """Run ``operation`` and wait for it, for callers without a reactor.

        False when the writer is stopping and did not take it.
        """
        operation.event = threading.Event()
        if not self._enqueue(operation):
            return False
        operation.event.wait()
        return True

    def stop(self) -> None:
        """Finish what is pending, end the thread, then call ``on_stopped``."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        self._start()

    def closed_error(self) -> StoreError:
        return StoreError(
            f"queue {self.directory} is closed (the relay is stopping); try again later"
        )

    def _enqueue(self, operation: Operation) -> bool:
        with self._condition:
            if self._closing:
                return False
            self._pending.append(operation)
            self._condition.notify()
        self._start()
        return True

    def _start(self) -> None:
        if not self._thread_started:
            self._thread_started = True
            self._thread.start()

    # -- the thread ------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closing:
                    self._condition.wait()
                if not self._pending:
                    break
                batch = self._take_batch()
            with self.io_lock:
                try:
                    self._run_batch(batch)
                except Exception as exc:
                    log.failure("queue: writer failed on a batch")
                    for operation in batch:
                        if operation.error is None:
                            operation.abort(
                                StoreError(f"queue writer failed unexpectedly: {exc}")
                            )
            self._complete(batch)
        self._reactor.callFromThread(self._stopped)

    def _stopped(self) -> None:
        self._thread.join()
        self._on_stopped()

    def _take_batch(self) -> list[Operation]:
        batch = [self._pending.popleft()]
        weight = batch[0].weight
        while self._pending and len(batch) < BATCH_MAX_OPERATIONS:
            weight += self._pending[0].weight
            if weight > BATCH_MAX_BYTES:
                break
            batch.append(self._pending.popleft())
        return batch

    def _run_batch(self, batch: list[Operation]) -> None:
        """Write everything, fsync everything, rename, fsync each directory once."""
        live = self._phase(batch, lambda op: op.prepare())
        # Early writeback only helps when there is more than one file to sync.
        if self._durable and START_WRITEBACK and sum(len(op.fds) for op in live) > 1:
            for operation in live:
                for fd in operation.fds:
                    start_writeback(fd)
        live = self._phase(live, lambda op: op.sync(self._durable))
        live = self._phase(live, lambda op: op.commit())
        live = self._sync_directories(live)
        live = self._phase(live, lambda op: op.finish())
        # What finish() did (adopted drops unlinked, envelopes of removed
        # messages) needs no group commit, but is made durable before the
        # Deferreds fire all the same.
        for directory in sorted(set().union(*(op.touched for op in live))):
            if self._durable:
                try:
                    fsync_directory(directory)
                except OSError as exc:
                    log.warn(
                        "queue: fsync of {directory} failed after a batch: {error}",
                        directory=directory,
                        error=exc,
                    )

    @staticmethod
    def _phase(
        operations: list[Operation], step: Callable[[Operation], None]
    ) -> list[Operation]:
        survivors = []
        for operation in operations:
            try:
                step(operation)
            except (StoreError, MessageNotFound) as exc:
                operation.abort(exc)
            else:
                survivors.append(operation)
        return survivors

    def _sync_directories(self, operations: list[Operation]) -> list[Operation]:
        """One fsync per directory for the whole batch: the group commit."""
        failed: dict[str, StoreError] = {}
        if self._durable:
            for directory in sorted(set().union(*(op.touched for op in operations))):
                try:
                    with disk("fsync", directory):
                        fsync_directory(directory)
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

    def _complete(self, batch: list[Operation]) -> None:
        """Wake whoever waits: threads directly, the reactor once per batch."""
        settle = []
        for operation in batch:
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
                settle.append(operation)
        if settle:
            self._reactor.callFromThread(self._settle, settle)

    def _settle(self, operations: list[Operation]) -> None:
        for operation in operations:
            if operation.hidden_until_done and operation.queue_id is not None:
                self.in_flight.discard(operation.queue_id)
        for operation in operations:
            assert operation.deferred is not None
            if operation.error is None:
                operation.deferred.callback(operation.result)
            else:
                operation.deferred.errback(operation.error)
