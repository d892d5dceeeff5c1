# -*- test-case-name: haikutx.test.test_metrics -*-
"""
The Prometheus metrics every haikutx service reports, in one registry, and
the C{GET /_haiku/metrics} page that shows them to local clients.

The metrics are module-level, as C{prometheus_client} intends: one process
runs one runtime, job runner and gate at most. Tests compare values before
and after what they do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request

from haikutx.net.local import is_local_request

#: The registry of haikutx's own metrics.
REGISTRY = CollectorRegistry(auto_describe=True)

#: Requests the runtime answered, by handler (SPEC's accounting name, or
#: C{other}) and status code.
REQUESTS = Counter(
    "haiku_requests",
    "Requests the runtime answered, by handler and status.",
    ["handler", "status"],
    registry=REGISTRY,
)

#: How long the runtime took to answer, by handler.
REQUEST_DURATION = Histogram(
    "haiku_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by handler.",
    ["handler"],
    registry=REGISTRY,
)

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


def fold_handler(requests: Any, durations: Any, name: str, into: str) -> None:
    """
    Forget handler C{name}'s series: its answered requests are added to
    C{into}'s (so that totals never go down), its durations are dropped.

    @param requests: a counter like L{REQUESTS}.
    @param durations: a histogram like L{REQUEST_DURATION}.
    """
    counts: dict[str, float] = {}
    for metric in requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("handler") == name:
                counts[sample.labels["status"]] = sample.value
    for status, value in counts.items():
        requests.labels(into, status).inc(value)
        requests.remove(name, status)
    try:
        durations.remove(name)
    except KeyError:
        pass


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
