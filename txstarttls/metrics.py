"""Prometheus metrics for the relay: what an operator graphs and alerts on.

The listener and the queue runner report events through the small
``RelayMetrics`` interface; ``NullMetrics`` is the default, so neither needs
prometheus-client unless ``--metrics`` is given. Queue size and the age of
the oldest message are read from the store at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from txstarttls.queue import IMessageStore, MessageNotFound

# Seconds from arrival to the end of a delivery attempt.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 86400)


class RelayMetrics(Protocol):
    """What the listener and the runner report."""

    def message_received(self, size: int) -> None: ...

    def auth_failed(self) -> None: ...

    def inbound_tls(self, version: str) -> None: ...

    def delivery(self, status: str, seconds: float) -> None: ...

    def outbound_tls(self, version: str) -> None: ...


class NullMetrics:
    """Reports go nowhere: the default when --metrics is not given."""

    def message_received(self, size: int) -> None:
        pass

    def auth_failed(self) -> None:
        pass

    def inbound_tls(self, version: str) -> None:
        pass

    def delivery(self, status: str, seconds: float) -> None:
        pass

    def outbound_tls(self, version: str) -> None:
        pass


class PrometheusMetrics:
    """Counters and a histogram in a registry of their own."""

    def __init__(self, store: IMessageStore, clock: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self._received = Counter(
            "txstarttls_messages_received",
            "Messages accepted and queued by the listeners",
            registry=self.registry,
        )
        self._received_bytes = Counter(
            "txstarttls_received_bytes",
            "Octets of messages accepted",
            registry=self.registry,
        )
        self._outcomes = Counter(
            "txstarttls_recipient_outcomes",
            "Recipient delivery attempts by status (sent, deferred, bounced, expired)",
            ["status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "txstarttls_delivery_latency_seconds",
            "Time from arrival to a recipient's final delivery",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._auth_failures = Counter(
            "txstarttls_listener_auth_failures",
            "Failed AUTH attempts on the listeners",
            registry=self.registry,
        )
        self._tls = Counter(
            "txstarttls_tls_sessions",
            "TLS sessions by direction and protocol version",
            ["direction", "version"],
            registry=self.registry,
        )
        self.registry.register(_QueueCollector(store, clock))

    def message_received(self, size: int) -> None:
        self._received.inc()
        self._received_bytes.inc(size)

    def auth_failed(self) -> None:
        self._auth_failures.inc()

    def inbound_tls(self, version: str) -> None:
        self._tls.labels("inbound", version).inc()

    def delivery(self, status: str, seconds: float) -> None:
        self._outcomes.labels(status).inc()
        if status == "sent":
            self._latency.observe(seconds)

    def outbound_tls(self, version: str) -> None:
        self._tls.labels("outbound", version).inc()


class _QueueCollector(Collector):
    """Queue size and oldest message age, read from the store when scraped."""

    def __init__(self, store: IMessageStore, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        ids = self._store.queue_ids()
        oldest = 0.0
        if ids:
            try:
                oldest = self._clock() - self._store.get(ids[0]).arrival_time
            except (MessageNotFound, ValueError):
                oldest = 0.0
        size = GaugeMetricFamily(
            "txstarttls_queue_messages", "Messages waiting in the queue"
        )
        size.add_metric([], len(ids))
        age = GaugeMetricFamily(
            "txstarttls_queue_oldest_seconds", "Age of the oldest queued message"
        )
        age.add_metric([], max(oldest, 0.0))
        yield size
        yield age
