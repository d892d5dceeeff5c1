"""
Unit tests of L{haikutx.runtime.pool.WorkerPool} and L{haikutx.runtime.worker.WorkerProtocol}
on fake workers and a L{Clock}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from haikutx.child import wire
from haikutx.interfaces import IExchange, IWorkerSpawner
from haikutx.runtime.pool import PoolBusy, PythonWorkerSpawner, WorkerPool
from haikutx.testing import FakeSpawner


class SpawnerTests(SynchronousTestCase):
    """
    The spawners provide L{IWorkerSpawner}.
    """

    def test_interfaces(self) -> None:
        """
        The real and the fake spawner provide the interface.
        """
        verifyObject(IWorkerSpawner, PythonWorkerSpawner(Clock()))
        verifyObject(IWorkerSpawner, FakeSpawner())


@implementer(IExchange)
class RecordingExchange:
    """
    Records what a worker sends back.
    """

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def head(self, status, headers):
        self.events.append(("head", status, headers))

    def data(self, data):
        self.events.append(("data", data))

    def flush(self):
        pass

    def finish(self, trailers):
        self.events.append(("finish", trailers))

    def fail(self, status, message):
        self.events.append(("fail", status, message))

    def lost(self, reason):
        self.events.append(("lost", reason))


class PoolTests(SynchronousTestCase):
    """
    Tests for L{WorkerPool}.
    """

    def make_pool(self, size: int = 2, max_requests: int = 1) -> WorkerPool:
        self.clock = Clock()
        self.spawner = FakeSpawner()
        pool = WorkerPool(
            self.clock,
            size=size,
            max_requests=max_requests,
            spawner=self.spawner,
            keepalive_interval=5,
            keepalive_timeout=2,
        )
        pool.startService()
        return pool

    def ready(self, index: int, pid: int | None = None) -> None:
        self.spawner.started[index].start_child(pid)

    def serve(self, pool: WorkerPool, worker) -> None:
        worker.run(RecordingExchange(), {}, b"")
        worker.transport.send(wire.FINISH, b'{"trailers": []}')
        pool.release(worker)

    def test_starts_size_workers(self) -> None:
        """
        Starting the pool starts C{size} workers ahead of demand.
        """
        pool = self.make_pool(size=3)
        self.assertEqual(len(self.spawner.started), 3)
        self.assertEqual(pool.status()["workers"], {"starting": 3})

    def test_acquire_waits_for_ready(self) -> None:
        """
        A request waits until a worker is ready.
        """
        pool = self.make_pool(size=1)
        acquired = pool.acquire(5)
        self.assertNoResult(acquired)
        self.ready(0)
        worker = self.successResultOf(acquired)
        self.assertEqual(worker.state, "idle")

    def test_busy_times_out(self) -> None:
        """
        When no worker is free within the timeout, L{PoolBusy}.
        """
        pool = self.make_pool(size=1)
        acquired = pool.acquire(5)
        self.clock.advance(5)
        self.failureResultOf(acquired, PoolBusy)
        self.ready(0)
        self.assertEqual(pool.status()["workers"], {"idle": 1})

    def test_waiters_time_out_each_at_its_time(self) -> None:
        """
        Each waiting request fails at its own timeout, whatever the order
        in which they came, served or not by then; a cancelled one never
        does.
        """
        pool = self.make_pool(size=1)
        first = pool.acquire(5)
        sooner = pool.acquire(2)
        cancelled = pool.acquire(1)
        cancelled.cancel()
        self.failureResultOf(cancelled)
        self.clock.advance(1.5)
        later = pool.acquire(4)
        self.clock.advance(0.5)
        self.failureResultOf(sooner, PoolBusy)
        self.assertNoResult(first)
        self.clock.advance(2.9)
        self.assertNoResult(first)
        self.clock.advance(0.1)
        self.failureResultOf(first, PoolBusy)
        self.assertNoResult(later)
        self.ready(0)
        self.assertEqual(self.successResultOf(later).state, "idle")
        self.clock.advance(10)
        self.assertEqual(pool.status()["waiting"], 0)

    def test_recycle(self) -> None:
        """
        A worker released at its quota closes its child's channel, tells
        its zygote to retire that child, waits for the zygote's next child
        and is then handed out again; no zygote is spawned.
        """
        pool = self.make_pool(size=1, max_requests=1)
        self.ready(0, pid=1)
        worker = self.successResultOf(pool.acquire(5))
        first = self.spawner.started[0].child
        self.serve(pool, worker)
        self.assertEqual(worker.state, "recycling")
        self.assertTrue(first.closed)
        self.assertEqual(self.spawner.started[0].zygote_frames(), [(wire.RETIRE, {"pid": 1})])
        waiting = pool.acquire(5)
        self.assertNoResult(waiting)
        self.ready(0, pid=2)
        self.assertIs(self.successResultOf(waiting), worker)
        self.assertEqual(worker.child_pid, 2)
        self.assertEqual(len(self.spawner.started), 1)
        self.assertEqual(pool.counters["recycled"], 1)
        self.clock.advance(10)
        self.assertEqual(self.spawner.started[0].signals, [])

    def test_recycled_worker_killed_if_it_lingers(self) -> None:
        """
        A recycled worker whose fresh process does not come is killed after
        the kill time.
        """
        pool = self.make_pool(size=1, max_requests=1)
        self.ready(0)
        worker = self.successResultOf(pool.acquire(5))
        self.serve(pool, worker)
        self.clock.advance(5)
        self.assertIn("KILL", self.spawner.started[0].signals)

    def test_reuse(self) -> None:
        """
        With no quota a released worker serves the next request.
        """
        pool = self.make_pool(size=1, max_requests=0)
        self.ready(0)
        worker = self.successResultOf(pool.acquire(5))
        self.serve(pool, worker)
        self.assertIs(self.successResultOf(pool.acquire(5)), worker)
        self.assertEqual(len(self.spawner.started), 1)

    def test_death_replaced(self) -> None:
        """
        A worker that dies is replaced.
        """
        pool = self.make_pool(size=1, max_requests=0)
        self.ready(0)
        self.spawner.started[0].exit(1)
        self.assertEqual(len(self.spawner.started), 2)
        self.assertEqual(pool.counters["died"], 1)

    def test_backoff(self) -> None:
        """
        Workers that keep dying before they are ready are restarted with a
        growing delay, not in a busy loop.
        """
        pool = self.make_pool(size=1, max_requests=0)
        for i in range(3):
            self.spawner.started[i].exit(1)
        self.assertEqual(len(self.spawner.started), 3)
        self.assertEqual(pool.counters["died"], 3)
        self.clock.advance(2)
        self.assertEqual(len(self.spawner.started), 4)

    def serve_kind(self, pool: WorkerPool, worker, language: str) -> None:
        worker.run(RecordingExchange(), {"language": language}, b"")
        worker.transport.send(wire.FINISH, b'{"trailers": []}')
        pool.release(worker)

    def test_kind_kept(self) -> None:
        """
        A worker whose process ran a Python handler is handed out again for
        Python handlers, and for callers that do not say.
        """
        pool = self.make_pool(size=1, max_requests=0)
        self.ready(0)
        worker = self.successResultOf(pool.acquire(5, "python"))
        self.serve_kind(pool, worker, "python")
        self.assertEqual(worker.kind, "python")
        self.assertIs(self.successResultOf(pool.acquire(5, "python")), worker)
        self.serve_kind(pool, worker, "python")
        self.assertIs(self.successResultOf(pool.acquire(5)), worker)

    def test_other_kind_gets_a_fresh_process(self) -> None:
        """
        A request for the other kind of handler does not get a process
        confined for the first: the idle process is asked to exit, and the
        request gets the worker once its fresh process is ready.
        """
        pool = self.make_pool(size=1, max_requests=0)
        self.ready(0)
        worker = self.successResultOf(pool.acquire(5, "python"))
        self.serve_kind(pool, worker, "python")
        waiting = pool.acquire(5, "stdio")
        self.assertNoResult(waiting)
        self.assertEqual(worker.state, "recycling")
        retired = self.spawner.started[0].child.pid
        self.assertEqual(
            self.spawner.started[0].zygote_frames()[-1], (wire.RETIRE, {"pid": retired})
        )
        self.ready(0, pid=3)
        self.assertIs(self.successResultOf(waiting), worker)
        self.assertIsNone(worker.kind)
        self.assertEqual(len(self.spawner.started), 1)

    def test_recycles_logged(self) -> None:
        """
        Every recycle is logged with its reason (SPEC §7).
        """
        from twisted.logger import capturedLogs

        pool = self.make_pool(size=1, max_requests=1)
        self.ready(0)
        worker = self.successResultOf(pool.acquire(5))
        with capturedLogs() as events:
            self.serve(pool, worker)
        recycled = [e for e in events if "recycling" in e["log_format"]]
        self.assertEqual(len(recycled), 1)
        self.assertEqual(recycled[0]["reason"], "served its quota of 1 requests")
        self.assertEqual(recycled[0]["worker_pid"], worker.pid)
        # With --maxrequests 1 the quota recycle follows every request: debug,
        # its text made once (no field left for the observer to format).
        self.assertEqual(recycled[0]["log_level"].name, "debug")
        from twisted.logger import formatEvent

        self.assertEqual(formatEvent(recycled[0]), recycled[0]["log_format"])
        self.assertEqual(
            recycled[0]["log_format"],
            f"worker {worker.pid} recycling its process {recycled[0]['child_pid']}: "
            "served its quota of 1 requests",
        )

    def test_other_recycles_logged_at_info(self) -> None:
        """
        A quota recycle with C{--maxrequests} above 1 is logged at info.
        """
        from twisted.logger import capturedLogs

        pool = self.make_pool(size=1, max_requests=2)
        self.ready(0)
        worker = self.successResultOf(pool.acquire(5))
        self.serve(pool, worker)
        worker = self.successResultOf(pool.acquire(5))
        with capturedLogs() as events:
            self.serve(pool, worker)
        recycled = [e for e in events if "recycling" in e["log_format"]]
        self.assertEqual([e["log_level"].name for e in recycled], ["info"])

    def test_released_worker_goes_to_a_waiter_it_suits(self) -> None:
        """
        A released worker skips waiting requests of the other kind for one
        of its own kind; when none suits, its process is replaced.
        """
        pool = self.make_pool(size=1, max_requests=0)
        self.ready(0)
        worker = self.successResultOf(pool.acquire(5, "python"))
        stdio = pool.acquire(5, "stdio")
        python = pool.acquire(5, "python")
        self.serve_kind(pool, worker, "python")
        self.assertIs(self.successResultOf(python), worker)
        self.assertNoResult(stdio)
        self.serve_kind(pool, worker, "python")
        self.assertEqual(worker.state, "recycling")
        self.ready(0, pid=4)
        self.assertIs(self.successResultOf(stdio), worker)

    def test_stop(self) -> None:
        """
        Stopping the pool terminates every worker, kills those that linger,
        and fires once all have ended.
        """
        pool = self.make_pool(size=2)
        self.ready(0)
        self.ready(1)
        stopped = pool.stopService()
        self.assertEqual([t.signals for t in self.spawner.started], [["TERM"], ["TERM"]])
        self.spawner.started[0].exit(0)
        self.assertNoResult(stopped)
        self.clock.advance(5)
        self.assertEqual(self.spawner.started[1].signals, ["TERM", "KILL"])
        self.spawner.started[1].exit(signal=9)
        self.successResultOf(stopped)
        self.assertEqual(len(self.spawner.started), 2)


#: What the server tells a zygote about a child it had killed.
KILLED = {"pid": 7, "report": True}


class WorkerProtocolTests(SynchronousTestCase):
    """
    Tests for L{haikutx.runtime.worker.WorkerProtocol}: framing and heartbeat.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.spawner = FakeSpawner()
        self.pool = WorkerPool(
            self.clock, size=1, max_requests=0, spawner=self.spawner,
            keepalive_interval=5, keepalive_timeout=2,
        )
        self.pool.startService()
        self.transport = self.spawner.started[0]
        self.transport.start_child(7)
        self.worker = self.transport.protocol

    def test_request_frames(self) -> None:
        """
        A request is sent as a head frame, body frames and a body end.
        """
        exchange = RecordingExchange()
        verifyObject(IExchange, exchange)
        body = b"x" * (wire.CHUNK + 1)
        self.worker.run(exchange, {"method": "POST"}, body)
        kinds = [kind for kind, _ in self.transport.frames()]
        self.assertEqual(kinds, [wire.REQUEST, wire.BODY, wire.BODY, wire.BODY_END])
        self.transport.send(wire.HEAD, b'{"status": 201, "headers": [["a", "b"]]}')
        self.transport.send(wire.DATA, b"hi")
        self.transport.send(wire.FINISH, b'{"trailers": []}')
        self.assertEqual(
            exchange.events,
            [("head", 201, [["a", "b"]]), ("data", b"hi"), ("finish", [])],
        )

    def test_same_head_decoded_once(self) -> None:
        """
        A response head whose bytes the same child sent before is not decoded
        again (each child's channel remembers its own): each
        exchange gets its status and its own list of the same headers. A
        head with an invalid status is never remembered: each kills its
        child.
        """
        from haikutx.runtime import child_response as module

        decoded = []
        real = module.json.loads

        class Counting:
            @staticmethod
            def loads(payload: bytes) -> object:
                decoded.append(payload)
                return real(payload)

        self.patch(module, "json", Counting)
        head = b'{"status": 203, "headers": [["a", "b"], ["c", "d"]]}'
        exchanges = []
        for _ in range(3):
            exchange = RecordingExchange()
            self.worker.run(exchange, {"method": "GET"}, b"")
            self.transport.send(wire.HEAD, head)
            self.transport.send(wire.FINISH, b'{"trailers": []}')
            self.pool.release(self.worker)
            exchanges.append(exchange)
        self.assertEqual(decoded.count(head), 1)
        heads = [exchange.events[0] for exchange in exchanges]
        self.assertEqual(heads, [("head", 203, [["a", "b"], ["c", "d"]])] * 3)
        self.assertIsNot(heads[1][2], heads[2][2])
        bad = b'{"status": 101, "headers": []}'
        self.worker.run(RecordingExchange(), {"method": "GET"}, b"")
        child = self.transport.child
        self.transport.send(wire.HEAD, bad)
        # Remembered by that child's channel alone, the invalid one never.
        self.assertIn(head, child.protocol.heads)
        self.assertEqual(child.protocol.kill_reason, "sent an invalid status 101")
        self.assertNotIn(bad, child.protocol.heads)

    def test_heartbeat_answered(self) -> None:
        """
        A worker that echoes each challenge lives on.
        """
        for _ in range(3):
            self.clock.advance(5)
            challenge = self.transport.frames()[-1]
            self.assertEqual(challenge[0], wire.CHALLENGE)
            self.transport.send(wire.ANSWER, challenge[1])
            self.clock.advance(2)
        self.assertEqual(self.transport.signals, [])

    def test_heartbeat_missed(self) -> None:
        """
        A child that does not answer within the timeout is killed by its
        zygote, and the request it held is answered with the reason; the
        zygote lives on and its next child serves.
        """
        exchange = RecordingExchange()
        self.worker.run(exchange, {}, b"")
        self.clock.advance(5)
        self.clock.advance(2)
        self.assertEqual(self.transport.zygote_frames(), [(wire.RETIRE, KILLED)])
        self.assertEqual(self.transport.signals, [])
        self.transport.end_child(7, code=None, signal=9)
        self.assertEqual(
            exchange.events,
            [("lost", "the worker process did not answer a heartbeat within 2000 ms")],
        )
        self.assertEqual(self.pool.counters["killed"], 1)
        self.transport.start_child(8)
        self.assertEqual(self.worker.state, "idle")
        self.assertEqual(len(self.spawner.started), 1)

    def test_heartbeat_wrong(self) -> None:
        """
        A wrong answer has the child killed.
        """
        child = self.transport.child
        self.clock.advance(5)
        self.transport.send(wire.ANSWER, b"forged")
        self.assertEqual(self.transport.zygote_frames(), [(wire.RETIRE, KILLED)])
        self.assertEqual(child.protocol.kill_reason, "sent an incorrect heartbeat answer")
        self.assertTrue(child.closed)

    def test_malformed_frame(self) -> None:
        """
        A malformed frame has the child killed.
        """
        self.transport.child.protocol.dataReceived(b"\xff\xff\xff\xff\x00")
        self.assertEqual(self.transport.zygote_frames(), [(wire.RETIRE, KILLED)])

    def test_zygote_frames_refused_from_a_child(self) -> None:
        """
        A child that sends a frame of the zygote's kinds (or an old READY)
        is killed, and nothing it claimed is believed: no new child, no
        idle slot.
        """
        for kind in (wire.CHILD, wire.ENDED, wire.SANDBOX, wire.OUTPUT, wire.READY,
                     wire.RETIRE, wire.REQUEST):
            self.setUp()
            exchange = RecordingExchange()
            self.worker.run(exchange, {}, b"")
            self.transport.send(kind, b'{"pid": 99, "code": 0, "signal": null}')
            self.assertEqual(
                self.transport.zygote_frames(), [(wire.RETIRE, {"pid": 7, "report": True})], kind
            )
            self.assertEqual(self.worker.state, "recycling")
            self.assertIsNone(self.worker.child)
            self.assertEqual(list(self.transport.children), [7])

    def test_child_closes_its_channel(self) -> None:
        """
        A child that closes its channel mid-request is given a moment for
        its end to be reported, then killed; its request is answered with
        the reason, and the slot waits for the zygote's next child.
        """
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        exchange = RecordingExchange()
        self.worker.run(exchange, {}, b"")
        self.transport.child.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.worker.state, "recycling")
        self.assertEqual(self.transport.zygote_frames(), [])
        self.clock.advance(1)
        self.assertEqual(self.transport.zygote_frames(), [(wire.RETIRE, KILLED)])
        self.transport.end_child(7, code=None, signal=9)
        self.assertEqual(exchange.events, [("lost", "the worker process closed its channel")])
        self.transport.start_child(8)
        self.assertEqual(self.worker.state, "idle")

    def test_child_dies_on_its_own(self) -> None:
        """
        A child that dies mid-request (its end reported by the zygote) has
        its request answered with the cause and is counted as died.
        """
        exchange = RecordingExchange()
        self.worker.run(exchange, {}, b"")
        self.transport.end_child(7, code=3)
        self.assertEqual(exchange.events, [("lost", "the worker process exited with status 3")])
        self.assertEqual(self.pool.counters["died"], 1)
        self.assertEqual(self.worker.state, "recycling")

    def test_second_child_kills_zygote(self) -> None:
        """
        A zygote that reports a second child while one is current is killed
        (a zygote forks the next child only once the last is retired or
        ended), and the extra child is not handed out.
        """
        self.transport.start_child(8)
        self.assertEqual(self.transport.signals, ["KILL"])
        self.assertEqual(self.worker.child_pid, 7)
        self.assertTrue(self.transport.children[8].closed)

    def test_zygote_malformed_frame(self) -> None:
        """
        A malformed frame from the zygote kills the zygote.
        """
        self.worker.zygote_data(b"\xff\xff\xff\xff\x00", None)
        self.assertEqual(self.transport.signals, ["KILL"])

    def test_child_frame_forms(self) -> None:
        """
        A C{CHILD} frame's pid is read in the zygote's compact form and in
        any other JSON form alike; a payload that is not a JSON object with
        an integer pid is refused as JSON refuses it.
        """
        from haikutx.runtime.slot_wire import child_pid

        self.assertEqual(child_pid(b'{"pid":1234}'), 1234)
        self.assertEqual(child_pid(b'{"pid": 1234}'), 1234)
        self.assertEqual(child_pid(b'{"pid":1234, "x": 1}'), 1234)
        self.assertEqual(child_pid(b'{"pid":0}'), 0)
        for bad in (b'{"pid":0012}', b'{"pid":12a}', b'{"pid":}', b"{}", b'{"pid":"x"}'):
            self.assertRaises((ValueError, KeyError), child_pid, bad)

    def test_child_frame_not_compact(self) -> None:
        """
        A zygote's child announced in a JSON form other than its own is
        taken all the same; a malformed announcement kills the zygote.
        """
        from collections import deque

        self.worker.retire()
        self.worker.zygote_data(wire.encode(wire.CHILD, b'{"pid": 8}'), deque([-1, -1]))
        self.assertEqual(self.worker.child_pid, 8)
        self.assertEqual(self.transport.signals, [])
        self.worker.retire()
        self.worker.zygote_data(wire.encode(wire.CHILD, b'{"pid":09}'), deque([-1, -1]))
        self.assertEqual(self.transport.signals, ["KILL"])

    def test_retire_order_is_compact_json(self) -> None:
        """
        The C{RETIRE} orders are the compact JSON the zygote reads by hand.
        """
        from haikutx.runtime.slot_wire import retire_order

        self.assertEqual(
            retire_order(77, False), wire.encode_json(wire.RETIRE, {"pid": 77})
        )
        self.assertEqual(
            retire_order(77, True), wire.encode_json(wire.RETIRE, {"pid": 77, "report": True})
        )

    def test_child_output_logged(self) -> None:
        """
        What a child writes to its stdout or stderr, forwarded by its
        zygote, is logged line by line with the child's pid.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.transport.zygote(wire.OUTPUT, (7).to_bytes(4, "big") + b"one\ntw")
        self.transport.zygote(wire.OUTPUT, (7).to_bytes(4, "big") + b"o\n")
        lines = [(e["child_pid"], e["line"]) for e in events if e.get("stream") == "output"]
        self.assertEqual(lines, [(7, "one"), (7, "two")])

    def test_output_logged(self) -> None:
        """
        What a worker prints is logged line by line with its stream.
        """
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.worker.childDataReceived(2, b"one\ntw")
        self.worker.childDataReceived(2, b"o\n")
        lines = [(e["stream"], e["line"]) for e in events if "stream" in e]
        self.assertEqual(lines, [("stderr", "one"), ("stderr", "two")])


class ChannelTransportTests(SynchronousTestCase):
    """
    Tests for L{haikutx.runtime.channels.ChannelTransport} over a real
    socketpair and a L{MemoryReactor}.
    """

    def setUp(self) -> None:
        import socket

        from twisted.internet.testing import MemoryReactor

        self.reactor = MemoryReactor()
        ours, self.peer = socket.socketpair()
        self.addCleanup(self.peer.close)
        self.received: list[object] = []
        test = self

        class Recorder:
            def makeConnection(self, transport):
                self.transport = transport

            def dataReceived(self, data):
                test.received.append(data)

            def fileDescriptorReceived(self, fd):
                test.received.append(("fd", fd))

            def connectionLost(self, reason):
                test.received.append("lost")

        from haikutx.runtime.channels import ChannelTransport

        self.protocol = Recorder()
        self.transport = ChannelTransport(
            self.reactor, ours.detach(), self.protocol, receive_fds=True
        )
        self.addCleanup(self.transport.loseConnection)

    def test_write_now_or_buffer(self) -> None:
        """
        A write the socket takes at once leaves nothing to do; the rest of a
        larger one waits for the socket to be writable.
        """
        self.transport.write(b"small")
        self.assertEqual(self.peer.recv(100), b"small")
        self.assertNotIn(self.transport, self.reactor.writers)
        self.transport.write(b"x" * (8 << 20))
        self.assertIn(self.transport, self.reactor.writers)
        self.peer.setblocking(False)
        got = 0
        for _ in range(10000):
            try:
                got += len(self.peer.recv(1 << 20))
            except BlockingIOError:
                self.transport.doWrite()
                if self.transport not in self.reactor.writers:
                    break
        self.assertNotIn(self.transport, self.reactor.writers)

    def test_read_bytes_fds_and_end(self) -> None:
        """
        Bytes and passed descriptors reach the protocol (descriptors
        first); the peer's close ends the connection once.
        """
        import os
        import socket

        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        socket.send_fds(self.peer, [b"frame"], [read])
        self.transport.doRead()
        self.assertEqual(self.received[1], b"frame")
        kind, fd = self.received[0]
        self.addCleanup(os.close, fd)
        self.assertEqual(os.fstat(fd).st_ino, os.fstat(read).st_ino)
        self.peer.close()
        self.transport.doRead()
        self.assertEqual(self.received[2:], ["lost"])
        self.assertNotIn(self.transport, self.reactor.readers)
        self.transport.loseConnection()
        self.assertEqual(self.received[2:], ["lost"])


class ProcessesLeftTests(SynchronousTestCase):
    """
    L{WorkerProtocol._may_have_started_processes}: whether a retired
    child's group must be listed and killed.
    """

    def worker(self, kind, seccomp="active"):
        from haikutx.runtime.worker import WorkerProtocol

        worker = WorkerProtocol(Clock(), lambda w: None, lambda w, r: None, 5, 5)
        worker.kind = kind
        worker.sandbox = {"layers": {"seccomp": seccomp}}
        return worker

    def test_kinds(self) -> None:
        """
        A child that ran nothing, or Python handlers under seccomp, cannot
        have started processes; a stdio child, or a Python one without the
        seccomp layer, may have.
        """
        self.assertFalse(self.worker(None)._may_have_started_processes())
        self.assertFalse(self.worker("python")._may_have_started_processes())
        self.assertTrue(self.worker("stdio")._may_have_started_processes())
        self.assertTrue(
            self.worker("python", "turned off by name")._may_have_started_processes()
        )

    def test_confined_alone(self) -> None:
        """
        Only a Python child under both the seccomp and the uid layers goes
        without a cgroup of its own.
        """
        def alone(kind, seccomp="active", uid="active, no capabilities"):
            worker = self.worker(kind, seccomp)
            worker.sandbox["layers"]["uid"] = uid
            return worker._confined_alone()

        self.assertTrue(alone("python"))
        self.assertFalse(alone("stdio"))
        self.assertFalse(alone("python", seccomp="turned off by name"))
        self.assertFalse(alone("python", uid="no identity given: handlers run as root"))
