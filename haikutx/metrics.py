# -*- test-case-name: haikutx.test.test_metrics -*-
"""
The Prometheus metrics every haikutx service reports, in one registry, and
the C{GET /_haiku/metrics} page that shows them to local clients.

The metrics are module-level, as C{prometheus_client} intends: one process
runs one runtime, job runner and gate at most. Tests compare values before
and after what they do.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import Interface

from haikutx.net.local import is_local_request

#: The registry of haikutx's own metrics.
REGISTRY = CollectorRegistry(auto_describe=True)

#: Bounds (seconds) of the buckets of C{haiku_request_duration_seconds},
#: C{+Inf} aside.
DURATION_BUCKETS = tuple(b for b in Histogram.DEFAULT_BUCKETS if b != float("inf"))


class IRequestCounts(Interface):
    """
    What a runtime counted of the requests it answered (its table of
    handlers, L{haikutx.runtime.tenants.Tenants}).
    """

    def request_counts() -> Iterable[tuple[str, dict[int, int], list[int], float]]:
        """
        Per handler: its name, its answers by status, its answers by
        duration bucket (one count per bound of L{DURATION_BUCKETS}, then
        one for longer ones, not cumulative) and the sum of its durations.
        """


class RequestsCollector:
    """
    C{haiku_requests_total{handler,status}} and the histogram
    C{haiku_request_duration_seconds{handler}}, made at each scrape from
    the counts the runtimes keep themselves (a request costs two integer
    increments, not two metric updates).
    """

    def __init__(self) -> None:
        self._sources: weakref.WeakSet[Any] = weakref.WeakSet()

    def add(self, source: IRequestCounts) -> None:
        """
        Show C{source}'s counts (for as long as it lives).
        """
        self._sources.add(source)

    def describe(self) -> list[Any]:
        return list(self._families())

    def collect(self) -> Iterable[Any]:
        merged: dict[str, tuple[dict[int, int], list[int], list[float]]] = {}
        for source in list(self._sources):
            for name, answers, durations, total in source.request_counts():
                counts, buckets, sums = merged.setdefault(
                    name, ({}, [0] * (len(DURATION_BUCKETS) + 1), [0.0])
                )
                for status, count in answers.items():
                    counts[status] = counts.get(status, 0) + count
                for i, count in enumerate(durations):
                    buckets[i] += count
                sums[0] += total
        requests, durations = self._families()
        bounds = [floatToGoString(b) for b in DURATION_BUCKETS] + ["+Inf"]
        for name, (counts, buckets, sums) in sorted(merged.items()):
            for status, count in sorted(counts.items()):
                requests.add_metric([name, str(status)], count)
            if any(buckets):
                durations.add_metric(
                    [name], list(zip(bounds, accumulate(buckets), strict=True)), sum_value=sums[0]
                )
        return [requests, durations]

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily]:
        return (
            CounterMetricFamily(
                "haiku_requests",
                "Requests the runtime answered, by handler and status.",
                labels=["handler", "status"],
            ),
            HistogramMetricFamily(
                "haiku_request_duration_seconds",
                "Time from a request's arrival to the end of its answer, by handler.",
                labels=["handler"],
            ),
        )


#: Requests the runtime answered, by handler (its accounting name, or
#: C{other}) and status code, and their durations by handler.
REQUESTS = RequestsCollector()
REGISTRY.register(REQUESTS)

#: Worker processes by state (idle, busy, starting, ...).
WORKERS = Gauge(
    "haiku_workers",
    "Worker slots of the runtime's pool, by state.",
    ["state"],
    registry=REGISTRY,
)

#: Jobs of the job runner by what happened to them (accepted, finished,
#: failed, interrupted, deleted, ...).
JOBS = Counter(
    "haiku_jobs",
    "Jobs of the job runner, by state reached.",
    ["state"],
    registry=REGISTRY,
)

#: Requests the gate answered or forwarded, by application and status.
GATE_REQUESTS = Counter(
    "haiku_gate_requests",
    "Requests through the gate, by application and status.",
    ["app", "status"],
    registry=REGISTRY,
)


#: Worker states always shown by L{WORKERS}, at 0 when no worker is in them.
WORKER_STATES = ("starting", "ready", "idle", "busy", "recycling")


def show_workers(states: dict[str, int], gauge: Any = WORKERS) -> None:
    """
    Set C{gauge} (L{WORKERS}) to the pool's workers by state.

    @param states: workers by state, as the pool's status has them.
    """
    for state in set(WORKER_STATES) | set(states):
        gauge.labels(state).set(states.get(state, 0))


class MetricsResource(Resource):
    """
    C{GET /_haiku/metrics}: the Prometheus text format, for local clients
    only (L{is_local_request}).

    @param registry: the metrics shown.
    @param refresh: callables run before each page, to bring gauges up to
        date (L{show_workers} for the pool).
    """

    isLeaf = True

    def __init__(
        self,
        registry: CollectorRegistry = REGISTRY,
        refresh: Iterable[Callable[[], object]] = (),
    ) -> None:
        super().__init__()
        self._registry = registry
        self._refresh = tuple(refresh)

    def render_GET(self, request: Request) -> bytes:
        if not is_local_request(request):
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"The metrics are shown to loopback clients only.\n"
        for refresh in self._refresh:
            refresh()
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)
