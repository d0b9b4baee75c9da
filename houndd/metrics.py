"""Prometheus metrics of one node. One registry per daemon, so several daemons can share a
process in tests without colliding.

Names follow Prometheus conventions: counters end in `_total` (prometheus-client appends it to
a Counter's name), sizes in `_bytes`, durations in `_seconds`, and `houndd_build_info` is the
usual constant 1 carrying the version as labels.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from houndd import __version__


class _Callback(Collector):
    """Values read at scrape time from the live node (no bookkeeping twice). A counter's
    values must only grow; its name is given without `_total`."""

    def __init__(
        self,
        name: str,
        doc: str,
        labels: tuple[str, ...],
        read: Callable[[], Mapping[tuple[str, ...], float]],
        *,
        counter: bool = False,
    ) -> None:
        self.name, self.doc, self.labels, self.read = name, doc, labels, read
        self.counter = counter

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        family: GaugeMetricFamily | CounterMetricFamily
        if self.counter:
            family = CounterMetricFamily(self.name, self.doc, labels=list(self.labels))
        else:
            family = GaugeMetricFamily(self.name, self.doc, labels=list(self.labels))
        for key, value in self.read().items():
            family.add_metric(list(key), value)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.bytes_pulled = Counter(
            "houndd_pulled_bytes", "bytes pulled by this node's puller", registry=r
        )
        self.pull_duration = Histogram(
            "houndd_pull_duration_seconds",
            "duration of finished pulls on this node",
            ["outcome"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        self.dispatch_latency = Histogram(
            "houndd_dispatch_latency_seconds",
            "coordinator: a dispatch request's round trip to a worker (sent to accepted); "
            "the coordinator's own share is executed locally and not counted",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5),
            registry=r,
        )
        self.plans_submitted = Counter(
            "houndd_plans_submitted", "plans accepted through this node's API", registry=r
        )
        self.fenced = Counter(
            "houndd_fenced_refusals",
            "coordinator messages refused because their term was stale",
            registry=r,
        )
        self.engine_pulls = Counter(
            "houndd_engine_pulls",
            "pulls this node's Docker engine was asked to start (after dedupe and IfNotPresent)",
            registry=r,
        )
        self.peer_handler_errors = Counter(
            "houndd_peer_handler_errors",
            "peer messages (and coordinator steps) whose handling raised, by type; each was "
            "dropped and the daemon kept running",
            ["type"],
            registry=r,
        )
        self.term = Gauge("houndd_term", "highest election term this node has seen", registry=r)
        Info("houndd_build", "version of houndd and Python on this node", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )

    def watch(
        self,
        name: str,
        doc: str,
        labels: tuple[str, ...],
        read: Callable[[], Mapping[tuple[str, ...], float]],
        *,
        counter: bool = False,
    ) -> None:
        """Expose values computed at scrape time (members by state, items by state, ...)."""
        self.registry.register(_Callback(name, doc, labels, read, counter=counter))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
