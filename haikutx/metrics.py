# -*- test-case-name: haikutx.test.test_metrics -*-
"""
The Prometheus metrics every haikutx service reports, in one registry, and
the C{GET /_haiku/metrics} page that shows them to local clients.

The metrics are module-level, as C{prometheus_client} intends: one process
runs one runtime, job runner and gate at most. Tests compare values before
and after what they do.
"""

from __future__ import annotations

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


class MetricsResource(Resource):
    """
    C{GET /_haiku/metrics}: the Prometheus text format, for local clients
    only (L{is_local_request}).
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        if not is_local_request(request):
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"The metrics are shown to loopback clients only.\n"
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)
