"""RelayService: the queue, the runner and the listeners as one MultiService.

Start order is store, queue runner, listeners, so nothing is accepted before
the spool has been recovered; twistd stops them in reverse: listeners first
(421 to every client, no half-received message acknowledged), then the runner
(deliveries in flight finish), then the store (pending writes flushed).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet import ssl
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorCore
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from txstarttls.config import RelayConfig
from txstarttls.credentials import (
    password_from_command,
    read_password_file,
    token_command,
)
from txstarttls.delivery import DeliverySettings, QueueRunner, RetryPolicy
from txstarttls.errors import ConfigurationError
from txstarttls.listener_process import LISTENER_SETTINGS
from txstarttls.listener_processes import SHAREABLE_LISTENERS, ListenerProcesses
from txstarttls.metrics import NullMetrics, PrometheusMetrics
from txstarttls.operator import FLUSH_REQUEST, apply_requests
from txstarttls.policy import check_listener_safety, parse_networks
from txstarttls.pool import ConnectionPool, PoolLimits
from txstarttls.queue import FilesystemStore
from txstarttls.sasl import Credentials
from txstarttls.server import ListenerSettings, RelayServerFactory
from txstarttls.session import local_hostname
from txstarttls.testing import RunningServer, TestMailServer
from txstarttls.tls import TLSPolicy
from txstarttls.upstream import Upstream
from txstarttls.userdb import UsersFileChecker, make_portal

_log = Logger(namespace="txstarttls.service")


_HOST_PORT = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+))(?::(?P<port>\d+))?"
)


def parse_smarthost(text: str) -> tuple[str, int | None] | str:
    """``host``, ``host:port`` or ``[v6]:port``; anything else is an endpoint."""
    match = _HOST_PORT.fullmatch(text)
    if match is None:
        return text
    port = int(match["port"]) if match["port"] else None
    return (match["v6"] or match["host"], port)


class RelayService(MultiService):
    """A MultiService that stops its children one at a time, last first.

    MultiService stops them all at once; here each waits for the one started
    after it, so the store is closed only once no delivery can write to it.
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)  # type: ignore[no-untyped-call]
        return ensureDeferred(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                _log.failure("stopping {service} failed", service=repr(child))


class StoreService(Service):
    """Owns the queue directory: recovers it at start, closes it at stop."""

    def __init__(self, store: FilesystemStore) -> None:
        self.store = store

    def startService(self) -> None:
        report = self.store.recover()
        _log.info(
            "queue {directory}: {kept} messages kept, {removed} temporary files and "
            "{unacknowledged} unacknowledged messages removed, {quarantined} "
            "quarantined",
            directory=str(self.store.directory),
            kept=len(report.kept),
            removed=report.temporary_removed,
            unacknowledged=len(report.unacknowledged_removed),
            quarantined=len(report.quarantined),
        )
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.store.close()


class ListenerService(Service):
    """One listening endpoint; on stop, 421 to its clients before closing."""

    def __init__(
        self, reactor: IReactorCore, description: str, factory: RelayServerFactory
    ) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.port: IListeningPort | None = None
        self.listening: Deferred[None] | None = None
        """Fires once the endpoint listens (binding happens at start)."""

    def privilegedStartService(self) -> None:
        # Bind before twistd drops privileges (port 25).
        self._listen()
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._listen()

    def _listen(self) -> None:
        if self.listening is None:
            self.listening = ensureDeferred(self._bind())
            self.listening.addErrback(self._cannot_listen)

    async def _bind(self) -> None:
        endpoint = serverFromString(  # type: ignore[no-untyped-call]
            self.reactor, self.description
        )
        self.port = await endpoint.listen(self.factory)
        _log.info("listening on {description}", description=self.description)

    def _cannot_listen(self, failure: Failure) -> Failure:
        _log.failure("cannot listen on {d}", failure, d=self.description)
        if self.reactor.running:
            self.reactor.stop()
        return failure

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
        await self.factory.shutdown()


class MetricsService(Service):
    """Serves Prometheus text on --metrics (a Twisted endpoint description)."""

    def __init__(
        self, reactor: IReactorCore, description: str, metrics: PrometheusMetrics
    ) -> None:
        self.reactor = reactor
        self.description = description
        self.metrics = metrics
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        from prometheus_client.twisted import MetricsResource
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        root = Resource()  # type: ignore[no-untyped-call]
        metrics = MetricsResource(registry=self.metrics.registry)  # type: ignore[no-untyped-call]
        root.putChild(b"metrics", metrics)
        endpoint = serverFromString(  # type: ignore[no-untyped-call]
            self.reactor, self.description
        )
        listening = endpoint.listen(Site(root))  # type: ignore[no-untyped-call]
        listening.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        _log.info("metrics on {description}/metrics", description=self.description)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self.port is None:
            return None
        stopped: Deferred[None] = maybeDeferred(self.port.stopListening)  # type: ignore[call-overload]
        return stopped


class OperatorRequests(Service):
    """Applies what operators ask from the command line: flush, delete, requeue.

    ``txstarttls flush`` leaves a file in the queue directory; ``delete`` and
    ``requeue`` leave requests (see txstarttls.operator) while we hold the
    queue's lock.
    """

    def __init__(self, reactor: IReactorCore, queue: Path, runner: QueueRunner) -> None:
        self.reactor = reactor
        self.request = queue / FLUSH_REQUEST
        self.runner = runner
        self._loop = LoopingCall(self._check)
        self._loop.clock = reactor  # type: ignore[assignment]

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop.start(1.0, now=False)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop.running:
            self._loop.stop()

    def _check(self) -> Deferred[int]:
        if self.request.exists():
            self.request.unlink(missing_ok=True)
            count = self.runner.flush()
            _log.info("flush requested: retrying {count} messages now", count=count)
        # delete/requeue from the command line while this relay holds the queue.
        return apply_requests(self.request.parent, self.runner)


@dataclass(frozen=True, slots=True)
class DemoUpstream:
    """The built-in local smarthost used when none is configured."""

    service: Service
    upstream: Upstream
    trust_root: Any


def demo_upstream(reactor: IReactorCore, queue: Path, ehlo_name: str) -> DemoUpstream:
    """A STARTTLS + AUTH test server on a UNIX socket in the queue directory.

    Its CA is made for this run and trusted only by this relay, so the demo
    delivers over verified TLS with AUTH exactly as a real smarthost would.
    """
    password = secrets.token_urlsafe(16)
    server = TestMailServer(users={"relay": password})
    socket_path = queue / "demo-upstream.sock"

    service = _DemoUpstreamService(reactor, server, socket_path)
    upstream = Upstream(
        endpoint=f"unix:path={socket_path}",
        tls=TLSPolicy(hostname=server.hostname),
        credentials=Credentials("relay", password=password),
        ehlo_name=ehlo_name,
    )
    return DemoUpstream(service, upstream, server.trust_root())


class _DemoUpstreamService(Service):
    """Runs the built-in upstream on its UNIX socket while the relay runs."""

    def __init__(
        self, reactor: IReactorCore, server: TestMailServer, socket_path: Path
    ) -> None:
        self.reactor = reactor
        self.server = server
        self.socket_path = socket_path
        self.listener: RunningServer | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.socket_path.unlink(missing_ok=True)
        started = self.server.start(self.reactor, f"unix:{self.socket_path}:mode=600")
        started.addCallback(self._started)

    def _started(self, listener: RunningServer) -> None:
        self.listener = listener
        _log.info(
            "built-in local upstream (STARTTLS + AUTH, throwaway CA) on {path}",
            path=str(self.socket_path),
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self.listener is None:
            return None
        return self.listener.stop()


def smarthost_upstreams(reactor: IReactorCore, config: RelayConfig) -> list[Upstream]:
    """One Upstream per --smarthost, all with the TLS and AUTH settings given."""
    credentials = None
    username = config["username"]
    if username is not None:
        if config["oauth2-token-command"] is not None:
            command = config["oauth2-token-command"]
            credentials = Credentials(
                username, token=lambda: token_command(reactor, command)
            )
        elif config["password-file"] is not None:
            credentials = Credentials(
                username, password=read_password_file(config["password-file"])
            )
        else:
            credentials = Credentials(
                username, password=password_from_command(config["password-command"])
            )
    upstreams = []
    for text in config["smarthost"]:
        target = parse_smarthost(text)
        policy = TLSPolicy(
            mode=config["tls"],
            hostname=config["tls-hostname"],
            ca_file=config["ca-file"],
            fingerprint=config["fingerprint"],
        )
        common: dict[str, Any] = {
            "tls": policy,
            "credentials": credentials,
            "ehlo_name": relay_hostname(config),
        }
        if isinstance(target, str):
            upstreams.append(Upstream(endpoint=target, **common))
        else:
            upstreams.append(Upstream(host=target[0], port=target[1], **common))
    return upstreams


def relay_hostname(config: RelayConfig) -> str:
    """--hostname, else this host's name (looked up once, see local_hostname)."""
    name: str = config["hostname"] or local_hostname()
    return name if "." in name else "localhost.localdomain"


def listener_settings(
    reactor: IReactorCore, config: RelayConfig
) -> tuple[ListenerSettings, Portal | None]:
    tls_options = None
    if config["inbound-cert"] is not None:
        try:
            certificate = ssl.PrivateCertificate.loadPEM(  # type: ignore[no-untyped-call]
                Path(config["inbound-key"]).read_bytes()
                + b"\n"
                + Path(config["inbound-cert"]).read_bytes()
            )
        except Exception as error:
            raise ConfigurationError(
                f"--inbound-cert/--inbound-key: cannot load them: {error}"
            ) from None
        tls_options = certificate.options()
    portal = None
    if config["users"] is not None:
        try:
            checker = UsersFileChecker(config["users"], reactor)  # type: ignore[arg-type]
        except ValueError as error:
            raise ConfigurationError(f"--users: {error}") from None
        portal = make_portal(checker)
    try:
        networks = parse_networks(config["allow"])
    except ValueError as error:
        raise ConfigurationError(f"--allow: {error}") from None
    settings = ListenerSettings(
        hostname=relay_hostname(config),
        tls_options=tls_options,
        allowed_networks=networks,
        max_size=config["max-size"],
        bare_line_endings=config["bare-lf"],
    )
    try:
        check_listener_safety(config["listen"], networks, portal is not None)
    except ValueError as error:
        raise ConfigurationError(f"--listen: {error}") from None
    return settings, portal


def listener_process_settings(
    config: RelayConfig, descriptions: list[str]
) -> dict[str, Any]:
    """The settings a listener process gets: its own, none of the smarthost's."""
    settings = {name: config[name] for name in LISTENER_SETTINGS}
    settings["listen"] = descriptions
    settings["allow"] = list(settings["allow"])
    settings["hostname"] = relay_hostname(config)
    return settings


def build_relay_service(reactor: IReactorCore, config: RelayConfig) -> MultiService:
    """Everything ``twistd starttls-relay`` runs, checked before it starts."""
    queue = Path(config["queue"])
    settings, portal = listener_settings(reactor, config)
    relay = RelayService()  # type: ignore[no-untyped-call]
    try:
        store = FilesystemStore(queue, reactor)  # type: ignore[arg-type]
    except Exception as error:
        raise ConfigurationError(f"--queue: {error}") from None
    StoreService(store).setServiceParent(relay)  # type: ignore[no-untyped-call]
    if config["smarthost"]:
        pools = [
            ConnectionPool(
                reactor,  # type: ignore[arg-type]
                upstream,
                PoolLimits(max_connections=config["max-connections"]),
            )
            for upstream in smarthost_upstreams(reactor, config)
        ]
    else:
        demo = demo_upstream(reactor, queue, relay_hostname(config))
        demo.service.setServiceParent(relay)  # type: ignore[no-untyped-call]
        pools = [
            ConnectionPool(
                reactor,  # type: ignore[arg-type]
                demo.upstream,
                PoolLimits(max_connections=config["max-connections"]),
                trust_root=demo.trust_root,
            )
        ]
    metrics = None
    if config["metrics"] is not None:
        metrics = PrometheusMetrics(store, reactor.seconds)  # type: ignore[attr-defined]
        MetricsService(reactor, config["metrics"], metrics).setServiceParent(  # type: ignore[no-untyped-call]
            relay
        )
    runner = QueueRunner(
        store,
        pools,
        reactor,  # type: ignore[arg-type]
        DeliverySettings(
            hostname=relay_hostname(config),
            retry=RetryPolicy(
                minimal_backoff=config["minimal-backoff"],
                maximal_backoff=config["maximal-backoff"],
                maximal_lifetime=config["maximal-lifetime"],
                delay_warning=config["delay-warning"],
            ),
            max_concurrent=config["max-concurrent"],
            rewrite_sender=config["rewrite-sender"],
            rewrite_from=config["rewrite-from"],
        ),
        metrics=metrics,
    )
    runner.setServiceParent(relay)  # type: ignore[no-untyped-call]
    OperatorRequests(reactor, queue, runner).setServiceParent(relay)  # type: ignore[no-untyped-call]
    in_process = list(config["listen"])
    if config["listener-processes"]:
        shared = [d for d in in_process if d.startswith(SHAREABLE_LISTENERS)]
        in_process = [d for d in in_process if d not in shared]
        assert store.lock_fd is not None
        if shared:
            ListenerProcesses(
                reactor,
                shared,
                config["listener-processes"],
                listener_process_settings(config, shared),
                store.lock_fd,
                runner,
                metrics or NullMetrics(),
            ).setServiceParent(relay)  # type: ignore[no-untyped-call]
    for description in in_process:
        factory = RelayServerFactory(
            replace(settings, implicit_tls=description.startswith("ssl:")),
            store,
            reactor,  # type: ignore[arg-type]
            portal=portal,
        )
        factory.on_queued = runner.notify_queued
        if metrics is not None:
            factory.metrics = metrics
        ListenerService(reactor, description, factory).setServiceParent(relay)  # type: ignore[no-untyped-call]
    return relay
