"""A listener process: accepts SMTP on sockets its relay process opened.

``--listener-processes N`` starts N of these (``python -P -m
txstarttls.listener_process``), each with its own reactor and queue writer,
so acceptance is not bound to one thread and one GIL. Each adds messages to
the shared queue exactly as an in-process listener does (fsync before
``250``); the relay process delivers them and writes the log.

Descriptors, set up by :mod:`txstarttls.listener_processes`:

- 0: one JSON line of setup, then nothing; its end means the relay process
  is stopping or gone, and the listener stops as on SIGTERM (``421`` to its
  clients, stores finished, exit);
- 3: events to the relay process (:mod:`txstarttls.listener_events`);
- 4: the queue's lock, held for as long as any process writes to the queue;
- 5 and up: the listening sockets, in the order of the setup's ``sockets``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass, replace
from typing import Any, Final, cast

from twisted.internet.defer import DeferredList, ensureDeferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.logger import ILogObserver, LogEvent, Logger, globalLogBeginner

from txstarttls.config import build_config
from txstarttls.listener_events import (
    log_line,
    metric_line,
    queued_line,
    ready_line,
)
from txstarttls.queue import FilesystemStore
from txstarttls.server import RelayServerFactory
from txstarttls.turnwriter import TurnBufferedWriter

EVENTS_FD: Final = 3
LOCK_FD: Final = 4
FIRST_SOCKET_FD: Final = 5

FAMILIES: Final = {
    "AF_INET": socket.AF_INET,
    "AF_INET6": socket.AF_INET6,
    "AF_UNIX": socket.AF_UNIX,
}

LISTENER_SETTINGS: Final = (
    "queue",
    "listen",
    "hostname",
    "inbound-cert",
    "inbound-key",
    "users",
    "allow",
    "max-size",
    "bare-lf",
)
"""The relay settings a listener process needs (no smarthost secrets)."""

_log = Logger(namespace="txstarttls.service")


@dataclass(frozen=True, slots=True)
class ListeningSocket:
    fd: int
    family: str
    description: str


@dataclass(frozen=True, slots=True)
class Setup:
    """What the relay process sends on standard input."""

    settings: dict[str, Any]
    sockets: tuple[ListeningSocket, ...]

    def to_line(self) -> bytes:
        sockets = [
            {"fd": s.fd, "family": s.family, "description": s.description}
            for s in self.sockets
        ]
        document = {"settings": self.settings, "sockets": sockets}
        return json.dumps(document).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Setup:
        document = json.loads(line)
        sockets = tuple(
            ListeningSocket(int(s["fd"]), str(s["family"]), str(s["description"]))
            for s in document["sockets"]
        )
        return cls(dict(document["settings"]), sockets)


class EventPipe(TurnBufferedWriter):
    """Event lines to the relay process, from any thread, a write per turn.

    The write blocks when the relay process is behind, which slows this
    process down rather than dropping what it reports.
    """

    def log_observer(self, event: LogEvent) -> None:
        self.write(log_line(event))


class ForwardedMetrics:
    """The listener's metric events, counted by the relay process."""

    def __init__(self, pipe: EventPipe) -> None:
        self._pipe = pipe

    def message_received(self, size: int) -> None:
        self._pipe.write(metric_line("message_received", size))

    def auth_failed(self) -> None:
        self._pipe.write(metric_line("auth_failed"))

    def inbound_tls(self, version: str) -> None:
        self._pipe.write(metric_line("inbound_tls", version))

    def delivery(self, status: str, seconds: float) -> None:
        pass  # the relay process delivers

    def outbound_tls(self, version: str) -> None:
        pass


class _EndOfInput:
    """Reads standard input only to notice its end: then the process stops."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "listener stdin"

    def doRead(self) -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        if not data:
            self._reactor.removeReader(self)
            self.connectionLost(None)

    def connectionLost(self, reason: object) -> None:
        # Also called directly by the reactor when the pipe hangs up.
        if self._reactor.running:
            self._reactor.stop()


class ListenerProcess:
    """The listeners of one process: adopted sockets, one store, a clean stop."""

    def __init__(self, reactor: Any, setup: Setup, pipe: EventPipe) -> None:
        self.reactor = reactor
        self.setup = setup
        self.pipe = pipe
        self.store: FilesystemStore | None = None
        self.ports: list[IListeningPort] = []
        self.factories: list[RelayServerFactory] = []

    def start(self) -> None:
        # Not at the top: txstarttls.service starts listener processes.
        from txstarttls.service import listener_settings

        config = build_config(self.setup.settings)
        settings, portal = listener_settings(self.reactor, config)
        self.store = FilesystemStore(config["queue"], self.reactor, locked=False)
        for listening in self.setup.sockets:
            factory = RelayServerFactory(
                replace(settings, implicit_tls=False),
                self.store,
                self.reactor,
                portal=portal,
            )
            factory.on_queued = self._queued
            factory.metrics = ForwardedMetrics(self.pipe)
            self.factories.append(factory)
            self.ports.append(
                self.reactor.adoptStreamPort(
                    listening.fd, FAMILIES[listening.family], factory
                )
            )
            os.close(listening.fd)  # adoptStreamPort works on a duplicate
        self.reactor.addReader(_EndOfInput(self.reactor))
        self.pipe.write(ready_line())

    def _queued(self, queue_id: str) -> None:
        self.pipe.write(queued_line(queue_id))

    async def stop(self) -> None:
        """No new connections, 421 to every client, stores finished."""
        for port in self.ports:
            await maybeDeferred(port.stopListening)
        await DeferredList([f.shutdown() for f in self.factories])
        if self.store is not None:
            await self.store.close()


def main() -> int:
    line = sys.stdin.buffer.readline()
    try:
        setup = Setup.from_line(line)
    except (ValueError, KeyError, TypeError) as error:
        print(f"listener process: bad setup line: {error}", file=sys.stderr)
        return 2
    from twisted.internet import reactor

    core = cast(IReactorCore, reactor)
    pipe = EventPipe(EVENTS_FD, reactor)
    globalLogBeginner.beginLoggingTo(
        [cast(ILogObserver, pipe.log_observer)], redirectStandardIO=False
    )
    process = ListenerProcess(reactor, setup, pipe)
    failed: list[BaseException] = []

    def start() -> None:
        try:
            process.start()
        except Exception as error:
            failed.append(error)
            _log.failure("listener process {pid} cannot start", pid=os.getpid())
            core.stop()

    core.callWhenRunning(start)
    core.addSystemEventTrigger(
        "before", "shutdown", lambda: ensureDeferred(process.stop())
    )
    core.run()
    pipe.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
