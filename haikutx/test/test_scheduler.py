"""
Tests of L{haikutx.runtime.scheduler} and L{haikutx.runtime.tenants}: unit
tests on a fake pool and a L{Clock}, and one integration test with real
workers (a flooding handler and a victim).
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haikutx.config import Limits
from haikutx.metrics import RequestsCollector
from haikutx.runtime.pool import PoolBusy
from haikutx.runtime.scheduler import (
    Overloaded,
    Scheduler,
    Turn,
    default_max_concurrency,
    default_max_queue,
)
from haikutx.runtime.tenants import MAX_NAME, OTHER, Tenants, handler_identity
from haikutx.test.support import http, ready, start_runtime


class FakePool:
    """
    A pool of C{size} workers (strings) that hands out its idle ones at
    once and makes the others wait until L{give}.
    """

    def __init__(self, size: int, idle: int | None = None) -> None:
        self.size = size
        self.idle = size if idle is None else idle
        self.waiters: list[Deferred[Any]] = []
        self.timeouts: list[float] = []
        self.handed = 0

    def acquire(self, timeout: float, kind: str | None = None) -> Deferred[Any]:
        self.timeouts.append(timeout)
        if self.idle:
            self.idle -= 1
            self.handed += 1
            return succeed(f"worker-{self.handed}")
        d: Deferred[Any] = Deferred(self.waiters.remove)
        self.waiters.append(d)
        return d

    def give(self) -> None:
        self.handed += 1
        self.waiters.pop(0).callback(f"worker-{self.handed}")

    def release(self, worker: str) -> None:
        if self.waiters:
            self.waiters.pop(0).callback(worker)
        else:
            self.idle += 1


class _Waiting:
    """
    A wait of L{Scheduler.wait}, cancelled as L{Scheduler.acquire}'s
    L{Deferred} is.
    """

    def __init__(self, scheduler: Scheduler, turn: Turn) -> None:
        self._scheduler = scheduler
        self._turn = turn

    def cancel(self) -> None:
        self._scheduler.cancel(self._turn)


class Requests:
    """
    Requests made through one scheduler, by label, and what became of them.

    @cvar by_wait: ask with L{Scheduler.wait}, not L{Scheduler.acquire}.
    """

    by_wait = False

    def __init__(self, scheduler: Scheduler, pool: FakePool) -> None:
        self.scheduler = scheduler
        self.pool = pool
        self.results: dict[str, Any] = {}
        self.pending: dict[str, Any] = {}
        self.order: list[str] = []

    def send(self, handler: str, label: str, timeout: float = 10.0) -> None:
        tenant = self.scheduler.tenants.lookup(handler)

        def done(result: Any) -> None:
            self.assertNotIn(label, self.results)
            self.results[label] = result
            if isinstance(result, Turn):
                self.order.append(label)

        if self.by_wait:
            turn = self.scheduler.wait(tenant, timeout, None, done)
            self.pending[label] = _Waiting(self.scheduler, turn)
            return
        d = self.scheduler.acquire(tenant, timeout)
        self.pending[label] = d
        d.addBoth(done)

    def assertNotIn(self, label: str, results: dict[str, Any]) -> None:
        # A wait ends once.
        assert label not in results, label

    def finish(self, label: str) -> None:
        turn = self.results[label]
        assert isinstance(turn, Turn), (label, turn)
        # As the runtime does: the worker back to the pool, then the turn.
        self.pool.release(turn.worker)
        self.scheduler.release(turn)

    def failed(self, label: str) -> type[BaseException] | None:
        result = self.results.get(label)
        return None if result is None or isinstance(result, Turn) else type(result.value)


def _scheduler(size: int = 2, **kwargs: Any) -> tuple[Scheduler, FakePool, Clock, Requests]:
    clock = Clock()
    pool = FakePool(size)
    kwargs.setdefault("tenants", _tenants())
    scheduler = Scheduler(clock, pool, **kwargs)
    return scheduler, pool, clock, Requests(scheduler, pool)


def _tenants(max_tracked: int = 1000) -> Tenants:
    return Tenants(max_tracked, collector=None)


def _metrics(tenants: Tenants) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    The samples of C{tenants}' request metrics, by name and labels.
    """
    registry = CollectorRegistry()
    collector = RequestsCollector()
    collector.add(tenants)
    registry.register(collector)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()
        for s in metric.samples
    }


class FairnessTests(SynchronousTestCase):
    """
    A free turn goes to the waiting handler with the fewest running, the
    longest-waiting first among equals.
    """

    def test_fewest_running_first(self) -> None:
        """
        Handler A holds both turns and has requests waiting; B and C wait
        too.  Each turn A gives back goes to the handler with the fewest
        running: B (waiting longer than C), then A's oldest (A and C have
        none running, A's request waited longer), then C.
        """
        scheduler, pool, clock, requests = _scheduler(size=2, max_concurrency=2)
        requests.send("a", "a1")
        requests.send("a", "a2")
        requests.send("a", "a3")
        clock.advance(1)
        requests.send("b", "b1")
        clock.advance(1)
        requests.send("c", "c1")
        requests.send("a", "a4")
        self.assertEqual(requests.order, ["a1", "a2"])
        requests.finish("a1")
        self.assertEqual(requests.order, ["a1", "a2", "b1"])
        requests.finish("a2")
        self.assertEqual(requests.order, ["a1", "a2", "b1", "a3"])
        requests.finish("b1")
        self.assertEqual(requests.order, ["a1", "a2", "b1", "a3", "c1"])
        requests.finish("a3")
        self.assertEqual(requests.order[-1], "a4")
        self.assertEqual(scheduler.waiting, 0)

    def test_work_conserving(self) -> None:
        """
        One handler alone has all the turns its cap allows, the default
        cap being all workers but one.
        """
        scheduler, pool, clock, requests = _scheduler(size=4)
        self.assertEqual(scheduler.max_concurrency, 3)
        for i in range(5):
            requests.send("a", f"a{i}")
        self.assertEqual(requests.order, ["a0", "a1", "a2"])
        self.assertEqual(scheduler.waiting, 2)
        requests.send("b", "b0")
        self.assertEqual(requests.order[-1], "b0")
        requests.finish("a0")
        self.assertEqual(requests.order[-1], "a3")

    def test_defaults(self) -> None:
        """
        By default a handler runs on all workers but one (at least one) and
        queues twice the workers.
        """
        self.assertEqual(
            [default_max_concurrency(n) for n in (1, 2, 4, 8)], [1, 1, 3, 7]
        )
        self.assertEqual(default_max_queue(4), 8)


class CapTests(SynchronousTestCase):
    """
    No handler holds more than C{max_concurrency} turns, and a handler with
    C{max_queue} waiting is refused at once.
    """

    def test_concurrency_cap(self) -> None:
        """
        Turns are free, but a handler at its cap waits; another handler
        gets a turn at once.
        """
        scheduler, pool, clock, requests = _scheduler(size=3, max_concurrency=1)
        requests.send("a", "a1")
        requests.send("a", "a2")
        requests.send("b", "b1")
        self.assertEqual(requests.order, ["a1", "b1"])
        self.assertEqual(scheduler.tenants.lookup("a").running, 1)
        self.assertEqual(len(scheduler.tenants.lookup("a").waiting), 1)
        requests.finish("a1")
        self.assertEqual(requests.order, ["a1", "b1", "a2"])

    def test_queue_full_refused_at_once(self) -> None:
        """
        Beyond C{max_queue} waiting, a request fails with L{Overloaded}
        at once, without waiting for the clock; the others are untouched.
        """
        scheduler, pool, clock, requests = _scheduler(
            size=2, max_concurrency=1, max_queue=2
        )
        for i in range(4):
            requests.send("a", f"a{i}")
        self.assertEqual(requests.order, ["a0"])
        self.assertIs(requests.failed("a3"), Overloaded)
        self.assertEqual(requests.results["a3"].value.tenant.name, "a")
        self.assertEqual(scheduler.waiting, 2)
        # The queue's one timer.
        self.assertEqual(len(clock.getDelayedCalls()), 1)

    def test_no_queue(self) -> None:
        """
        With C{max_queue} 0, a request that cannot start is refused.
        """
        scheduler, pool, clock, requests = _scheduler(
            size=1, max_concurrency=1, max_queue=0
        )
        requests.send("a", "a0")
        requests.send("a", "a1")
        self.assertIs(requests.failed("a1"), Overloaded)

    def test_waiting_too_long(self) -> None:
        """
        A request that waits for its turn longer than its timeout fails
        with L{PoolBusy} (503); the pool is asked for a worker with what
        remains of the timeout.
        """
        scheduler, pool, clock, requests = _scheduler(size=1)
        requests.send("a", "a0", timeout=5)
        requests.send("b", "b0", timeout=5)
        clock.advance(2)
        requests.finish("a0")
        self.assertEqual(requests.order, ["a0", "b0"])
        self.assertEqual(pool.timeouts, [5, 3])
        requests.send("c", "c0", timeout=5)
        clock.advance(5)
        self.assertIs(requests.failed("c0"), PoolBusy)
        self.assertEqual((scheduler.waiting, clock.getDelayedCalls()), (0, []))

    def test_pool_fails(self) -> None:
        """
        When the pool fails to give a granted request a worker, the
        request fails with the pool's error and its turn is given back.
        """
        scheduler, pool, clock, requests = _scheduler(size=1)
        pool.idle = 0
        requests.send("a", "a0")
        self.assertEqual(scheduler.granted, 1)
        pool.waiters.pop(0).errback(PoolBusy("all workers are busy"))
        self.assertIs(requests.failed("a0"), PoolBusy)
        self.assertEqual((scheduler.granted, scheduler.tenants.lookup("a").running), (0, 0))

    def test_release_twice(self) -> None:
        """
        Releasing a turn twice gives it back once.
        """
        scheduler, pool, clock, requests = _scheduler(size=2)
        requests.send("a", "a0")
        requests.finish("a0")
        requests.finish("a0")
        self.assertEqual((scheduler.granted, scheduler.tenants.lookup("a").running), (0, 0))

    def test_stop(self) -> None:
        """
        L{Scheduler.stop} fails every waiting request with L{PoolBusy}.
        """
        scheduler, pool, clock, requests = _scheduler(size=1)
        requests.send("a", "a0")
        requests.send("b", "b0")
        scheduler.stop()
        self.assertIs(requests.failed("b0"), PoolBusy)
        self.assertEqual(clock.getDelayedCalls(), [])


class TakeTests(SynchronousTestCase):
    """
    L{Scheduler.take}: a turn at once, exactly when L{Scheduler.acquire}
    would grant one at once, with the same accounting.
    """

    def test_take(self) -> None:
        """
        A handler below its cap takes a turn and an idle worker at once;
        at its cap, or with no turn or no idle worker free, it takes
        nothing and nothing changes; a taken turn is given back like any.
        """
        from haikutx.runtime.pool import WorkerPool
        from haikutx.testing import FakeSpawner

        clock = Clock()
        pool = WorkerPool(clock, 3, 0, spawner=FakeSpawner())
        pool.startService()
        scheduler = Scheduler(clock, pool, max_concurrency=2, tenants=_tenants())
        a, b = scheduler.tenants.lookup("a"), scheduler.tenants.lookup("b")
        self.assertIsNone(scheduler.take(a))
        for started in pool._spawner.started[:2]:
            started.start_child()
        first = scheduler.take(a)
        second = scheduler.take(a)
        assert first is not None and second is not None
        self.assertEqual(
            (first.worker.state, a.running, scheduler.granted, first.tenant), ("idle", 2, 2, a)
        )
        self.assertIsNot(first.worker, second.worker)
        # At its cap: nothing taken, and acquire would queue it.
        self.assertIsNone(scheduler.take(a))
        # Below its cap but no idle worker: nothing taken, nothing counted.
        self.assertIsNone(scheduler.take(b))
        self.assertEqual((b.running, scheduler.granted), (0, 2))
        pool._spawner.started[2].start_child()
        third = scheduler.take(b)
        assert third is not None
        self.assertEqual((b.running, scheduler.granted), (1, 3))
        # No turn free at all.
        self.assertIsNone(scheduler.take(scheduler.tenants.lookup("c")))
        scheduler.release(first)
        scheduler.release(first)
        self.assertEqual((a.running, scheduler.granted), (1, 2))


class CancellationTests(SynchronousTestCase):
    """
    A request whose client left gives up everything it held at once: its
    place in the queue, or its turn and its wait at the pool.
    """

    def test_cancel_waiting(self) -> None:
        """
        A cancelled waiting request leaves the queue, its timer cancelled;
        the next free turn goes to the next request.
        """
        scheduler, pool, clock, requests = _scheduler(size=1)
        requests.send("a", "a0")
        requests.send("b", "b0")
        requests.send("c", "c0")
        requests.pending["b0"].cancel()
        self.assertIs(requests.failed("b0"), CancelledError)
        self.assertTrue(scheduler.tenants.lookup("b").idle)
        self.assertEqual((scheduler.waiting, len(clock.getDelayedCalls())), (1, 1))
        requests.finish("a0")
        self.assertEqual(requests.order, ["a0", "c0"])

    def test_cancel_at_pool(self) -> None:
        """
        A request granted a turn but still waiting for the pool (its
        worker is starting a fresh process) gives back the turn and leaves
        the pool's queue when cancelled.
        """
        scheduler, pool, clock, requests = _scheduler(size=1)
        pool.idle = 0
        requests.send("a", "a0")
        requests.send("b", "b0")
        self.assertEqual(len(pool.waiters), 1)
        requests.pending["a0"].cancel()
        self.assertIs(requests.failed("a0"), CancelledError)
        self.assertEqual(scheduler.tenants.lookup("a").running, 0)
        # The turn went to b, which now waits at the pool in a's place.
        self.assertEqual((scheduler.granted, scheduler.waiting, len(pool.waiters)), (1, 0, 1))
        pool.give()
        self.assertEqual(requests.order, ["b0"])

    def test_cancel_after_turn(self) -> None:
        """
        Cancelling a request that already has its worker changes nothing:
        its turn is given back with L{Scheduler.release}.
        """
        scheduler, pool, clock, requests = _scheduler(size=1)
        requests.send("a", "a0")
        requests.pending["a0"].cancel()
        self.assertEqual(scheduler.granted, 1)
        requests.finish("a0")
        self.assertEqual(scheduler.granted, 0)

    def test_many_leave(self) -> None:
        """
        Any mix of requests leaving, waiting and finishing leaves nothing
        held: no turn, no waiter, no timer.
        """
        scheduler, pool, clock, requests = _scheduler(size=2, max_queue=100)
        for i in range(30):
            requests.send("abc"[i % 3], f"r{i}")
        for i in range(0, 30, 2):
            requests.pending[f"r{i}"].cancel()
        finished: set[str] = set()
        for _ in range(30):
            for label in [label for label in requests.order if label not in finished]:
                finished.add(label)
                requests.finish(label)
        # The odd ones, and r0, which had its worker before it was cancelled.
        self.assertEqual(len(finished), 16)
        self.assertEqual((scheduler.granted, scheduler.waiting), (0, 0))
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertTrue(all(tenant.idle for tenant in scheduler.tenants))


class ExpiryTests(SynchronousTestCase):
    """
    Waiting requests share one timer, which fails each at its own deadline.
    """

    def test_each_at_its_deadline(self) -> None:
        """
        Requests waiting with different timeouts (a later one with a
        shorter one) each fail with L{PoolBusy} at their own deadline, not
        before, with one timer at a time.
        """
        scheduler, pool, clock, requests = _scheduler(size=1)
        requests.send("a", "a0")
        requests.send("b", "b0", timeout=10)
        clock.advance(1)
        requests.send("c", "c0", timeout=4)
        requests.send("d", "d0", timeout=20)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(4 - 1e-6)
        self.assertEqual(requests.results, {"a0": requests.results["a0"]})
        clock.advance(1e-6)
        self.assertIs(requests.failed("c0"), PoolBusy)
        self.assertEqual(sorted(requests.results), ["a0", "c0"])
        clock.advance(5)
        self.assertIs(requests.failed("b0"), PoolBusy)
        self.assertNotIn("d0", requests.results)
        clock.advance(11)
        self.assertIs(requests.failed("d0"), PoolBusy)
        self.assertEqual((scheduler.waiting, clock.getDelayedCalls()), (0, []))

    def test_left_before_its_deadline(self) -> None:
        """
        When the request the timer was set for gets its turn, the next
        waiting one still fails at its own deadline, and the one granted
        does not fail.
        """
        scheduler, pool, clock, requests = _scheduler(size=1)
        requests.send("a", "a0")
        requests.send("b", "b0", timeout=5)
        clock.advance(2)
        requests.send("c", "c0", timeout=5)
        requests.finish("a0")
        self.assertEqual(requests.order, ["a0", "b0"])
        clock.advance(3)
        self.assertNotIn("c0", requests.results)
        clock.advance(2)
        self.assertIs(requests.failed("c0"), PoolBusy)
        self.assertEqual(requests.order, ["a0", "b0"])
        self.assertEqual((scheduler.waiting, clock.getDelayedCalls()), (0, []))


class _ByWait:
    """
    The tests of a class, asking for turns with L{Scheduler.wait}.
    """

    def setUp(self) -> None:
        self.patch(Requests, "by_wait", True)  # type: ignore[attr-defined]


class FairnessByWaitTests(_ByWait, FairnessTests):
    """
    L{FairnessTests} with L{Scheduler.wait}: the same turns, in the same
    order, each wait ended once.
    """


class CapByWaitTests(_ByWait, CapTests):
    """
    L{CapTests} with L{Scheduler.wait}: the same caps, refusals and time
    limits (a L{Failure} given to C{then}).
    """


class CancellationByWaitTests(_ByWait, CancellationTests):
    """
    L{CancellationTests} with L{Scheduler.cancel}: the same places and
    turns given up, and C{then} called with a L{CancelledError}.
    """


class TenantsTests(SynchronousTestCase):
    """
    Handler identities and the bounded table of handlers.
    """

    def test_identity(self) -> None:
        """
        A handler is what C{x-haiku-handler} names, without query string,
        fragment and credentials; a URL's scheme and host are lower case.
        """
        self.assertEqual(handler_identity("hello.py?x=1#top"), "hello.py")
        self.assertEqual(
            handler_identity("HTTP://User:secret@Example.COM:8080/h.py?k=v#f"),
            "http://example.com:8080/h.py",
        )
        self.assertEqual(handler_identity("https://[::1]/a"), "https://[::1]/a")
        self.assertEqual(handler_identity("x" * (MAX_NAME + 1)), OTHER)

    def test_other_when_all_busy(self) -> None:
        """
        With the table full of busy handlers, a new one is scheduled as
        L{OTHER}: one bucket, whose requests share one cap.
        """
        scheduler, pool, clock, requests = _scheduler(
            size=4, max_concurrency=1, tenants=_tenants(max_tracked=2)
        )
        requests.send("a", "a0")
        requests.send("b", "b0")
        requests.send("c", "c0")
        requests.send("d", "d0")
        self.assertIs(scheduler.tenants.lookup("c"), scheduler.tenants.other)
        self.assertEqual(requests.order, ["a0", "b0", "c0"])
        self.assertEqual(len(scheduler.tenants.other.waiting), 1)
        requests.finish("c0")
        self.assertEqual(requests.order[-1], "d0")

    def test_idle_handler_forgotten(self) -> None:
        """
        With the table full, the least recently used idle handler is
        forgotten to make room, its counts added to L{OTHER}'s (in the
        metrics too).
        """
        tenants = _tenants(max_tracked=2)
        a = tenants.lookup("a")
        tenants.answered(a, 200, 0.1)
        tenants.answered(a, 429, 0.0)
        b = tenants.lookup("b")
        b.running = 1
        tenants.lookup("a")
        c = tenants.lookup("c")
        self.assertEqual(c.name, "c")
        self.assertEqual(sorted(t.name for t in tenants), ["b", "c", OTHER])
        counts = tenants.other.counts()
        self.assertEqual((counts["served"], counts["refused"]), (1, 1))
        samples = _metrics(tenants)
        requests = {
            labels: value for (name, labels), value in samples.items()
            if name == "haiku_requests_total"
        }
        self.assertEqual(
            requests,
            {
                (("handler", OTHER), ("status", "200")): 1.0,
                (("handler", OTHER), ("status", "429")): 1.0,
            },
        )
        self.assertEqual(
            samples[("haiku_request_duration_seconds_count", (("handler", OTHER),))], 2
        )

    def test_answered(self) -> None:
        """
        Each answer counts as served, refused (429), errors (500 and up)
        or gone (no answer), in the status and the metrics.
        """
        tenants = _tenants()
        a = tenants.lookup("a")
        for status in (200, 404, 429, 500, 503, None):
            tenants.answered(a, status, 0.25)
        self.assertEqual(
            tenants.status()["a"],
            {"running": 0, "waiting": 0, "served": 2, "refused": 1, "errors": 2, "gone": 1},
        )
        samples = _metrics(tenants)
        a = (("handler", "a"),)
        self.assertEqual(samples[("haiku_request_duration_seconds_count", a)], 5)
        self.assertEqual(samples[("haiku_request_duration_seconds_sum", a)], 1.25)
        self.assertEqual(
            samples[("haiku_request_duration_seconds_bucket", (*a, ("le", "0.1")))], 0
        )
        self.assertEqual(
            samples[("haiku_request_duration_seconds_bucket", (*a, ("le", "0.25")))], 5
        )
        self.assertEqual(samples[("haiku_requests_total", (*a, ("status", "503")))], 1)

    def test_collector_merges(self) -> None:
        """
        Two runtimes in one process (two tables) show one series per
        handler, their sums.
        """
        first, second = _tenants(), _tenants()
        first.answered(first.lookup("a"), 200, 0.01)
        second.answered(second.lookup("a"), 200, 0.01)
        registry = CollectorRegistry()
        collector = RequestsCollector()
        collector.add(first)
        collector.add(second)
        registry.register(collector)
        self.assertEqual(
            registry.get_sample_value(
                "haiku_requests_total", {"handler": "a", "status": "200"}
            ),
            2,
        )


FLOOD = "import asyncio\nawait asyncio.sleep(1)\nres.end('slept')\n"
HELLO = "res.end('Hello')\n"


class FloodTests(TestCase):
    """
    With real workers: one handler floods the pool with slow requests;
    another handler's requests are still answered within a second, and
    the flooder's excess is refused with 429 at once.
    """

    timeout = 120

    async def _flood(self, max_requests: int) -> None:
        port, pool = start_runtime(
            self,
            {"flood.py": FLOOD, "hello.py": HELLO},
            workers=4,
            max_requests=max_requests,
            limits=Limits(max_time=20),
        )
        await ready(pool)
        # The flooder, knowing that the runtime shares per handler, names
        # its handler with a different query string each time: still one
        # handler.
        flooding = [
            Deferred.fromCoroutine(
                http(port, "/", headers={"x-haiku-handler": f"flood.py?n={i}#{i}"})
            )
            for i in range(16)
        ]
        # The flooder holds its three workers (its cap); its queue is full.
        deadline = reactor.seconds() + 20
        while True:
            status = json.loads((await http(port, "/_haiku/status")).body)
            flood = status["handlers"].get("flood.py", {})
            if flood.get("running") == 3 and flood.get("waiting") == 8:
                break
            self.assertLess(reactor.seconds(), deadline, status)
        latencies = []
        for _ in range(5):
            started = reactor.seconds()
            response = await http(port, "/?x-haiku-handler=hello.py")
            latencies.append(reactor.seconds() - started)
            self.assertEqual((response.status, response.text), (200, "Hello"))
        responses = [await d for d in flooding]
        statuses = sorted(r.status for r in responses)
        self.assertEqual(statuses, [200] * 11 + [429] * 5)
        refused = [r for r in responses if r.status == 429]
        self.assertEqual(refused[0].headers["retry-after"], "1")
        self.assertIn("Too many requests for handler", refused[0].text)
        # The SPEC's bound: a victim is answered within a second.
        self.assertLess(max(latencies), 1.0, latencies)
        status = json.loads((await http(port, "/_haiku/status")).body)
        self.assertEqual(status["handlers"]["flood.py"]["refused"], 5)
        self.assertEqual(status["handlers"]["flood.py"]["served"], 11)
        self.assertEqual(status["handlers"]["hello.py"]["served"], 5)

    async def test_flood_fresh_processes(self) -> None:
        """
        With C{-r 1} (a fresh process per request).
        """
        await self._flood(1)

    async def test_flood_reused_processes(self) -> None:
        """
        With C{-r 0} (processes reused).
        """
        await self._flood(0)


class OptionTests(SynchronousTestCase):
    """
    C{--maxconcurrency} and C{--maxqueue} reach the runtime's scheduler.
    """

    def test_options(self) -> None:
        """
        Both are whole numbers (C{--maxqueue} may be 0); unset, the
        scheduler derives them from C{--workers}.
        """
        from twisted.python.usage import UsageError

        from haikutx.service import build_runtime
        from haikutx.tap import Options

        def parse(*argv: str) -> Any:
            options = Options()
            options.parseOptions(["--port", "0", "--sslport", "none", *argv])
            return options.config

        config = parse("-w", "6")
        self.assertEqual((config.max_concurrency, config.max_queue), (None, None))
        config = parse("-w", "6", "--maxconcurrency", "2", "--maxqueue", "0")
        self.assertEqual((config.max_concurrency, config.max_queue), (2, 0))
        for bad in (["--maxconcurrency", "0"], ["--maxqueue", "-1"], ["--maxqueue", "x"]):
            self.assertRaises(UsageError, parse, *bad)
        pool, root, fetcher = build_runtime(reactor, config)
        scheduler = root._handlers.scheduler
        self.assertEqual((scheduler.max_concurrency, scheduler.max_queue), (2, 0))
        pool, root, fetcher = build_runtime(reactor, parse("-w", "6"))
        scheduler = root._handlers.scheduler
        self.assertEqual((scheduler.max_concurrency, scheduler.max_queue), (5, 12))


class ResourceTurnTests(SynchronousTestCase):
    """
    L{HandlerResource} gives back every turn it takes, whatever happens to
    the request (real twisted.web requests on a L{DummyChannel}; the pool's
    worker is a fake that fails).
    """

    def test_turn_released_when_run_fails(self) -> None:
        """
        When sending the request to the worker raises, the request is
        answered 500 and its turn is given back.
        """
        import io

        from twisted.web.server import Request
        from twisted.web.test.requesthelper import DummyChannel

        from haikutx.runtime.loader import HandlerSource
        from haikutx.runtime.resource import HandlerResource

        class BrokenWorker:
            pid = 1

            def run(self, exchange: Any, head: Any, body: Any) -> None:
                raise RuntimeError("the worker's pipe is gone")

        class Loader:
            def load(self, name: str) -> Deferred[HandlerSource]:
                return succeed(HandlerSource(url=name, source=b"res.end('x')\n"))

        pool = FakePool(2)
        pool.acquire = lambda timeout, kind=None: succeed(BrokenWorker())  # type: ignore
        clock = Clock()
        scheduler = Scheduler(clock, pool, tenants=_tenants())
        resource = HandlerResource(clock, pool, Loader(), scheduler=scheduler)
        request = Request(DummyChannel(), False)
        request.method, request.clientproto = b"GET", b"HTTP/1.1"
        request.uri = b"/?x-haiku-handler=a.py"
        request.content = io.BytesIO(b"")
        resource.render(request)
        self.assertEqual(request.code, 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual((scheduler.granted, scheduler.tenants.lookup("a.py").running), (0, 0))
