"""``--listener-processes N``: the listeners in N child processes.

One reactor thread and one GIL limit how fast one process can accept mail
(each message is a connection, seven replies, a parse, a queue write). Like
Postfix's master with its smtpd processes, the relay process opens the
listening sockets itself (before twistd drops privileges) and hands them to
N listener processes (:mod:`txstarttls.listener_process`); the kernel spreads
connections among them. Each writes to the shared queue with its own
writer thread; the relay process hears of each queued message, delivers it,
and writes every log line and metric. A listener process that dies is
started again; on stop each gets end of input, says ``421`` to its clients
and finishes its stores before the relay process closes the queue.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, cast

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorCore
from twisted.internet.protocol import ProcessProtocol, ServerFactory
from twisted.logger import LogEvent, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from txstarttls.listener_events import (
    MAX_LINE_OCTETS,
    LogLine,
    Metric,
    Queued,
    Ready,
    parse_line,
)
from txstarttls.listener_process import (
    EVENTS_FD,
    FIRST_SOCKET_FD,
    LOCK_FD,
    ListeningSocket,
    Setup,
)
from txstarttls.metrics import RelayMetrics

_log = Logger(namespace="txstarttls.service")

SHAREABLE_LISTENERS: Final = ("tcp:", "tcp6:", "unix:")
"""Listeners whose sockets listener processes can take over as they are
(an ``ssl:`` one would need its TLS settings, not just its socket)."""

FIRST_RESTART_DELAY: Final = 1.0
LONGEST_RESTART_DELAY: Final = 60.0
STEADY_AFTER: Final = 30.0
"""A listener process that ran this long restarts after the first delay."""


class QueueNotices(Protocol):
    """What the relay process does with news of queued messages (the runner)."""

    def notify_queued(self, queue_id: str) -> None: ...

    def pick_up_unscheduled(self) -> int: ...


class _NoConnections(ServerFactory):
    """The relay process's own copy of a socket never accepts."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


def _family(port: IListeningPort) -> str:
    host = port.getHost()
    if isinstance(host, IPv6Address):
        return "AF_INET6"
    if isinstance(host, IPv4Address):
        return "AF_INET"
    if isinstance(host, UNIXAddress):
        return "AF_UNIX"
    raise ValueError(f"cannot share a listener on {host!r}")


class ListenerProcesses(Service):
    """Runs the relay's listeners in ``count`` child processes."""

    def __init__(
        self,
        reactor: IReactorCore,
        descriptions: Sequence[str],
        count: int,
        settings: dict[str, Any],
        lock_fd: int,
        runner: QueueNotices,
        metrics: RelayMetrics,
        *,
        observer: Callable[[LogEvent], None] = globalLogPublisher,
        stop_timeout: float = 60.0,
        executable: str = sys.executable,
    ) -> None:
        self.reactor = reactor
        self.descriptions = tuple(descriptions)
        self.count = count
        self.settings = settings
        self.lock_fd = lock_fd
        self.runner = runner
        self.metrics = metrics
        self.observer = observer
        self.stop_timeout = stop_timeout
        self.executable = executable
        self.ports: list[IListeningPort] = []
        self.children: dict[int, _ListenerChild] = {}
        self.ready: Deferred[None] = Deferred()
        """Fires once every first listener process has its sockets."""
        self._restarts: dict[int, IDelayedCall] = {}
        self._delays: dict[int, float] = {}
        self._stopping = False

    # -- start -----------------------------------------------------------------

    def privilegedStartService(self) -> None:
        # Bind before twistd drops privileges (port 25).
        self._bind()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        self._bind()
        for index in range(self.count):
            self._spawn(index)

    def _bind(self) -> None:
        if self.ports:
            return
        for description in self.descriptions:
            endpoint = serverFromString(self.reactor, description)  # type: ignore[no-untyped-call]
            listening = endpoint.listen(_NoConnections())
            port = cast(IListeningPort, _synchronous_result(listening))
            # Only the listener processes accept on it.
            port.stopReading()  # type: ignore[attr-defined]
            self.ports.append(port)
            _log.info("listening on {description}", description=description)

    def _setup(self) -> Setup:
        sockets = tuple(
            ListeningSocket(FIRST_SOCKET_FD + index, _family(port), description)
            for index, (port, description) in enumerate(
                zip(self.ports, self.descriptions, strict=True)
            )
        )
        return Setup(self.settings, sockets)

    def _spawn(self, index: int) -> None:
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r", EVENTS_FD: "r"}
        child_fds[LOCK_FD] = self.lock_fd
        for offset, port in enumerate(self.ports):
            child_fds[FIRST_SOCKET_FD + offset] = port.fileno()  # type: ignore[attr-defined]
        child = _ListenerChild(self, index, self._setup().to_line())
        argv = [self.executable, "-P", "-m", "txstarttls.listener_process"]
        self.reactor.spawnProcess(  # type: ignore[attr-defined]
            child, self.executable, argv, env=dict(os.environ), childFDs=child_fds
        )
        self.children[index] = child

    # -- what the children say -------------------------------------------------

    def _event(self, child: _ListenerChild, line: bytes) -> None:
        try:
            event = parse_line(line)
        except ValueError as error:
            _log.warn(
                "listener process {pid}: ignored a bad event line ({error})",
                pid=child.pid,
                error=str(error),
            )
            return
        if isinstance(event, Queued):
            self.runner.notify_queued(event.queue_id)
        elif isinstance(event, LogLine):
            self.observer(
                {
                    "log_namespace": event.namespace,
                    "log_level": event.level,
                    "log_format": "{log_text}",
                    "log_text": event.text,
                    "log_time": event.time,
                    "log_listener_pid": child.pid,
                    **({"log_system": event.system} if event.system else {}),
                }
            )
        elif isinstance(event, Metric):
            report: Callable[..., None] = getattr(self.metrics, event.name)
            report(*event.args)
        elif isinstance(event, Ready):
            child.ready = True
            everyone = len(self.children) == self.count and all(
                c.ready for c in self.children.values()
            )
            if everyone and not self.ready.called:
                self.ready.callback(None)

    def _output(self, child: _ListenerChild, fd: int, line: bytes) -> None:
        level = LogLevel.error if fd == 2 else LogLevel.warn
        _log.emit(
            level,
            "listener process {pid}: {line}",
            pid=child.pid,
            line=line.decode("utf-8", "replace"),
        )

    def _ended(self, child: _ListenerChild, reason: Failure) -> None:
        if self.children.get(child.index) is child:
            del self.children[child.index]
        if self._stopping:
            if not isinstance(reason.value, ProcessDone):
                _log.warn(
                    "listener process {pid} stopped: {reason}",
                    pid=child.pid,
                    reason=reason.getErrorMessage(),
                )
            return
        # It may have queued messages it could not report.
        self.runner.pick_up_unscheduled()
        lived = self.reactor.seconds() - child.started  # type: ignore[attr-defined]
        delay = self._delays.get(child.index, FIRST_RESTART_DELAY)
        if lived >= STEADY_AFTER:
            delay = FIRST_RESTART_DELAY
        self._delays[child.index] = min(delay * 2, LONGEST_RESTART_DELAY)
        _log.error(
            "listener process {pid} ended unexpectedly ({reason});"
            " starting another in {delay:g} s",
            pid=child.pid,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self._restarts[child.index] = self.reactor.callLater(  # type: ignore[attr-defined]
            delay, self._restart, child.index
        )

    def _restart(self, index: int) -> None:
        self._restarts.pop(index, None)
        if not self._stopping:
            self._spawn(index)

    # -- stop ------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        for restart in self._restarts.values():
            if restart.active():
                restart.cancel()
        self._restarts.clear()
        children = list(self.children.values())
        for child in children:
            child.ask_to_stop()
        timer = self.reactor.callLater(  # type: ignore[attr-defined]
            self.stop_timeout, self._kill, children
        )
        await DeferredList([child.ended for child in children])
        if timer.active():
            timer.cancel()
        for port in self.ports:
            await maybeDeferred(port.stopListening)
        self.ports = []

    def _kill(self, children: list[_ListenerChild]) -> None:
        for child in children:
            if not child.ended.called:
                _log.warn(
                    "listener process {pid} did not stop in {timeout:g} s; killing it",
                    pid=child.pid,
                    timeout=self.stop_timeout,
                )
                child.kill()


def _synchronous_result(deferred: Deferred[Any]) -> Any:
    """A TCP or UNIX endpoint listens at once; its Deferred has fired."""
    results: list[Any] = []
    deferred.addBoth(results.append)
    if not results:
        raise RuntimeError("listening did not complete at once")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class _ListenerChild(ProcessProtocol):
    """One listener process, seen from the relay process."""

    def __init__(self, owner: ListenerProcesses, index: int, setup: bytes) -> None:
        self.owner = owner
        self.index = index
        self.setup = setup
        self.pid: int | None = None
        self.ready = False
        self.started = owner.reactor.seconds()  # type: ignore[attr-defined]
        self.ended: Deferred[None] = Deferred()
        self._buffers: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.write(self.setup)

    def ask_to_stop(self) -> None:
        """End of input: the listener process stops as on SIGTERM."""
        if self.transport is not None and not self.ended.called:
            self.transport.closeStdin()

    def kill(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(OSError, ProcessExitedAlready):
                self.transport.signalProcess("KILL")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._buffers.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > MAX_LINE_OCTETS:
            _log.warn("listener process {pid}: dropped an over-long line", pid=self.pid)
            rest = b""
        self._buffers[childFD] = rest
        for line in lines:
            if childFD == EVENTS_FD:
                self.owner._event(self, line)
            elif line.strip():
                self.owner._output(self, childFD, line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in list(self._buffers.items()):
            if rest.strip():
                self.childDataReceived(fd, b"\n")
        self.owner._ended(self, reason)
        self.ended.callback(None)
