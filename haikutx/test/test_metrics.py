"""
Tests of C{GET /_haiku/metrics} (L{haikutx.metrics}): the Prometheus text
format, parsed back with C{prometheus_client}'s own parser, shown to local
clients only.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from haikutx.metrics import GATE_REQUESTS, JOBS, WORKERS, MetricsResource, show_workers
from haikutx.test.support import http, ready, start_runtime

HANDLERS = {
    "hello.py": "res.end('Hello')\n",
    "fails.py": "1 / 0\n",
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of a metrics page, by name and labels.
    """
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(page: dict[Any, float], name: str, **labels: str) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


class MetricsPageTests(TestCase):
    """
    The runtime's metrics page, through a real runtime.
    """

    def setUp(self) -> Any:
        from twisted.internet.defer import Deferred

        self.port, self.pool = start_runtime(self, HANDLERS, workers=2, max_requests=0)
        return Deferred.fromCoroutine(ready(self.pool))

    async def page(self, **headers: str) -> Any:
        return await http(self.port, "/_haiku/metrics", headers=headers)

    async def test_requests_and_workers(self) -> None:
        """
        Requests are counted by handler (without the query string) and
        status, their durations in a histogram by handler; the workers by
        state; the page is the Prometheus text format.
        """
        before = samples((await self.page()).text)
        for target in ("hello.py?x=1", "hello.py#top", "hello.py"):
            response = await http(self.port, "/", headers={"x-haiku-handler": target})
            self.assertEqual(response.status, 200)
        for _ in range(2):
            self.assertEqual((await http(self.port, "/?x-haiku-handler=missing.py")).status, 404)
        self.assertEqual((await http(self.port, "/?x-haiku-handler=fails.py")).status, 500)
        response = await self.page()
        self.assertEqual(response.status, 200)
        self.assertTrue(response.headers["content-type"].startswith("text/plain; version="))
        after = samples(response.text)

        def grew(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        self.assertEqual(grew("haiku_requests_total", handler="hello.py", status="200"), 3)
        self.assertEqual(grew("haiku_requests_total", handler="missing.py", status="404"), 2)
        self.assertEqual(grew("haiku_requests_total", handler="fails.py", status="500"), 1)
        self.assertEqual(grew("haiku_request_duration_seconds_count", handler="hello.py"), 3)
        self.assertEqual(
            grew("haiku_request_duration_seconds_bucket", handler="hello.py", le="+Inf"), 3
        )
        self.assertEqual(value(after, "haiku_workers", state="idle"), 2)
        self.assertEqual(value(after, "haiku_workers", state="busy"), 0)

    async def test_jobs_and_gate_shown(self) -> None:
        """
        The job runner's and the gate's counters, incremented by their
        owners, are on the same page.
        """
        JOBS.labels("accepted").inc()
        GATE_REQUESTS.labels("app", "200").inc()
        page = samples((await self.page()).text)
        self.assertGreaterEqual(value(page, "haiku_jobs_total", state="accepted"), 1)
        self.assertGreaterEqual(
            value(page, "haiku_gate_requests_total", app="app", status="200"), 1
        )

    async def test_forwarded_refused(self) -> None:
        """
        A request that came through a proxy (the gate, say) is not local,
        although it comes from loopback: 403.
        """
        for header in ("X-Forwarded-For", "Forwarded", "Via"):
            response = await self.page(**{header: "1.2.3.4"})
            self.assertEqual(response.status, 403, header)
            self.assertNotIn("haiku_requests_total", response.text)

    async def test_status_per_handler(self) -> None:
        """
        C{/_haiku/status} shows each handler's running, waiting, served,
        refused and errors.
        """
        import json

        await http(self.port, "/?x-haiku-handler=hello.py")
        await http(self.port, "/?x-haiku-handler=fails.py")
        status = json.loads((await http(self.port, "/_haiku/status")).body)
        self.assertEqual(
            status["handlers"]["hello.py"],
            {"running": 0, "waiting": 0, "served": 1, "refused": 0, "errors": 0, "gone": 0},
        )
        self.assertEqual(status["handlers"]["fails.py"]["errors"], 1)
        self.assertEqual(status["scheduler"]["max_concurrency"], 1)
        self.assertEqual(status["scheduler"]["max_queue"], 4)


class MetricsResourceTests(SynchronousTestCase):
    """
    L{MetricsResource} on its own.
    """

    def test_remote_refused(self) -> None:
        """
        A client that is not on loopback is refused (the address is only
        compared, never connected to).
        """
        request = DummyRequest([b""])
        request.client = IPv4Address("TCP", "192.0.2.7", 4321)
        body = MetricsResource().render_GET(request)
        self.assertEqual(request.responseCode, 403)
        self.assertIn(b"loopback", body)

    def test_refresh(self) -> None:
        """
        The refresh callables run before the page is made: the workers'
        gauge shows every usual state, 0 when no worker is in it.
        """
        request = DummyRequest([b""])
        request.client = IPv4Address("TCP", "127.0.0.1", 4321)
        resource = MetricsResource(refresh=[lambda: show_workers({"busy": 3})])
        page = samples(resource.render_GET(request).decode())
        self.assertEqual(value(page, "haiku_workers", state="busy"), 3)
        self.assertEqual(value(page, "haiku_workers", state="idle"), 0)
        show_workers({})
        self.assertEqual(WORKERS.labels("busy")._value.get(), 0)
