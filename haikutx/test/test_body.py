"""
Tests for request bodies (L{haikutx.runtime.body}): C{--maxbody} refused
before the body is read, and bodies sent to workers in bounded frames,
without the server's memory growing with them.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import ClientFactory
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from zope.interface import implementer

from haikutx.child import wire
from haikutx.config import Limits
from haikutx.runtime.body import LINGER, BodyFeed, RequestBody, body_too_large
from haikutx.runtime.site import RuntimeSite
from haikutx.test.support import Response, _RawClient, http, start_runtime, until


class _Recorder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render(self, request: Any) -> bytes:
        self.bodies.append(request.content.read())
        return b"rendered"


class LimitedRequestTests(SynchronousTestCase):
    """
    L{RuntimeSite}'s requests refuse a body over C{max_body} with 413, from
    C{Content-Length} before reading it, or when a chunked body passes it.
    """

    def setUp(self) -> None:
        self.resource = _Recorder()
        self.clock = Clock()
        self.site = RuntimeSite(self.resource, max_body=100, reactor=self.clock)
        self.channel = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def answer(self) -> Response:
        return Response([(0.0, self.transport.value())])

    def test_content_length_over(self) -> None:
        """
        A C{Content-Length} over the limit is answered 413 as soon as the
        head is in, with no C{100 Continue}, and the connection is
        half-closed; the resource is never rendered.
        """
        self.channel.dataReceived(
            b"POST /?x-haiku-handler=up.py HTTP/1.1\r\nHost: x\r\n"
            b"Expect: 100-continue\r\nContent-Length: 101\r\n\r\n"
        )
        raw = self.transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw)
        self.assertNotIn(b"100 Continue", raw)
        response = self.answer()
        self.assertEqual((response.status, response.text), (413, body_too_large(100) + "\n"))
        self.assertEqual(response.headers["connection"], "close")
        self.channel.dataReceived(b"x" * 100)
        self.assertEqual(self.resource.bodies, [])
        self.assertEqual(self.transport.value(), raw)
        [event] = [e for e in self.events if e.get("status") == 413]
        self.assertEqual(event["handler_url"], "up.py")
        self.assertEqual(event["method"], "POST")
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(LINGER)
        self.assertTrue(self.transport.disconnecting)
        self.channel.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closed_once_body_in(self) -> None:
        """
        Once the client has sent all of the body it announced (discarded),
        the connection closes without waiting.
        """
        self.channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 150\r\n\r\n" + b"x" * 100
        )
        self.assertEqual(self.answer().status, 413)
        self.assertFalse(self.transport.disconnecting)
        self.channel.dataReceived(b"x" * 50)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.resource.bodies, [])
        self.channel.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_content_length_at_limit(self) -> None:
        """
        A body of exactly C{max_body} bytes is accepted.
        """
        self.channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"y" * 100
        )
        self.assertEqual(self.resource.bodies, [b"y" * 100])
        self.assertEqual(self.answer().status, 200)

    def test_chunked_over(self) -> None:
        """
        A chunked body is cut off with 413 when it passes the limit; the
        rest of it is discarded.
        """
        self.channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: x\r\nx-haiku-handler: chunky.py\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        self.channel.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n")
        self.assertEqual(self.transport.value(), b"")
        self.channel.dataReceived(b"40\r\n" + b"b" * 64 + b"\r\n")
        response = self.answer()
        self.assertEqual((response.status, response.text), (413, body_too_large(100) + "\n"))
        self.channel.dataReceived(b"40\r\n" + b"c" * 64 + b"\r\n0\r\n\r\n")
        self.assertEqual(self.resource.bodies, [])
        # The channel still reads (to see the client go), and parses nothing.
        self.assertFalse(self.channel._channel._handlingRequest)
        self.assertEqual(self.transport.producerState, "producing")
        self.channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.resource.bodies, [])
        [event] = [e for e in self.events if e.get("status") == 413]
        self.assertEqual(event["handler_url"], "chunky.py")
        self.channel.connectionLost(None)

    def test_fixed_handler_named(self) -> None:
        """
        A site that runs one handler names it in the log of a refusal.
        """
        self.site.handler_name = "/srv/only.py"
        self.channel.dataReceived(
            b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        )
        [event] = [e for e in self.events if e.get("status") == 413]
        self.assertEqual(event["handler_url"], "/srv/only.py")
        self.channel.connectionLost(None)


@implementer(IConsumer)
class _PipeConsumer:
    """
    A consumer like a process pipe: it calls a pull producer back when its
    buffer has drained (L{drain}).
    """

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert not streaming and self.producer is None
        self.producer = producer
        producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def drain(self) -> None:
        if self.producer is not None:
            self.producer.resumeProducing()

    def frames(self) -> list[tuple[int, bytes]]:
        return list(wire.FrameReader().feed(b"".join(self.written)))


class _Content:
    """
    What C{request.content} is for a large body: a real temporary file.
    """

    def __init__(self, case: SynchronousTestCase, data: bytes) -> None:
        import tempfile

        self.file = tempfile.TemporaryFile()
        self.file.write(data)
        self.file.seek(0)
        case.addCleanup(self.file.close)


class BodyFeedTests(SynchronousTestCase):
    """
    L{BodyFeed} sends a body in frames of at most L{wire.CHUNK} bytes, one
    each time the pipe has drained.
    """

    def test_small_in_one_write(self) -> None:
        """
        A small body goes with the request head in one write.
        """
        consumer = _PipeConsumer()
        feed = BodyFeed(consumer.write, consumer)
        feed.start(wire.encode(wire.REQUEST, b"{}"), RequestBody.of(_Request(b"abc")))
        self.assertEqual(len(consumer.written), 1)
        self.assertEqual(
            consumer.frames(),
            [(wire.REQUEST, b"{}"), (wire.BODY, b"abc"), (wire.BODY_END, b"")],
        )
        self.assertIsNone(consumer.producer)

    def test_large_pulled(self) -> None:
        """
        A large body is written a frame per drain, never ahead of the pipe,
        and reads right after twisted.web has closed C{request.content}.
        """
        data = os.urandom(wire.CHUNK * 5 + 7)
        content = _Content(self, data)
        consumer = _PipeConsumer()
        feed = BodyFeed(consumer.write, consumer)
        feed.start(wire.encode(wire.REQUEST, b"{}"), RequestBody(content.file))
        content.file.close()
        self.assertEqual(len(consumer.written), 2)
        for _ in range(10):
            before = len(consumer.written)
            consumer.drain()
            self.assertLessEqual(len(consumer.written), before + 1)
        frames = consumer.frames()
        self.assertEqual(frames[-1], (wire.BODY_END, b""))
        body = [payload for kind, payload in frames if kind == wire.BODY]
        self.assertTrue(all(len(p) <= wire.CHUNK for p in body))
        self.assertEqual(b"".join(body), data)
        self.assertIsNone(consumer.producer)

    def test_stop_early(self) -> None:
        """
        Stopped before the end (the response is complete), the feed sends
        the body's end and nothing more.
        """
        content = _Content(self, b"z" * (wire.CHUNK * 4))
        consumer = _PipeConsumer()
        feed = BodyFeed(consumer.write, consumer)
        feed.start(wire.encode(wire.REQUEST, b"{}"), RequestBody(content.file))
        feed.stop()
        consumer.drain()
        kinds = [kind for kind, _ in consumer.frames()]
        self.assertEqual(kinds[-1], wire.BODY_END)
        self.assertEqual(kinds.count(wire.BODY_END), 1)
        self.assertIsNone(consumer.producer)


class _Request:
    def __init__(self, data: bytes) -> None:
        from io import BytesIO

        self.content = BytesIO(data)


HANDLERS = {
    "digest.py": (
        "import hashlib\n"
        "body = req.body\n"
        "res.end(f'{len(body)} {hashlib.sha256(body).hexdigest()}')\n"
    ),
    "hello.py": "res.end('hello')\n",
    "digest.py3": (
        "import hashlib, os, sys\n"
        "body = sys.stdin.buffer.read()\n"
        "print(len(body), hashlib.sha256(body).hexdigest(), os.environ['CONTENT_LENGTH'])\n"
    ),
    "ignore.py3": "print('ignored')\n",
}


async def _raw(port: int, data: bytes) -> Response:
    done: Deferred[list[tuple[float, bytes]]] = Deferred()
    factory = ClientFactory.forProtocol(lambda: _RawClient(data, done))
    reactor.connectTCP("127.0.0.1", port, factory)
    return Response(await done)


async def _refused_connections_closed() -> None:
    """
    Wait (bounded) until the server has closed every connection whose body
    it refused: the client may see the answer and go before the server has
    read its going.
    """
    def lingering() -> list[Any]:
        return [
            call for call in reactor.getDelayedCalls()
            if getattr(call.func, "__name__", "") in ("abortConnection", "loseConnection")
        ]

    await until(lambda: not lingering(), LINGER + 2, lambda: f"still open: {lingering()}")


def _memory(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(field)


class MaxBodyTests(TestCase):
    """
    C{--maxbody} on a running runtime, and bodies that reach handlers.
    """

    def setUp(self) -> None:
        self.port, self.pool = start_runtime(
            self, HANDLERS, workers=1, max_requests=0,
            limits=Limits(max_time=20.0, max_body=16 << 20),
        )

    async def test_refused_before_reading(self) -> None:
        """
        A client that sends only the head, announcing a body over the limit,
        gets 413 at once and the connection closes: nothing of the body was
        needed.
        """
        response = await _raw(
            self.port,
            b"POST /?x-haiku-handler=digest.py HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1000000000\r\n\r\n",
        )
        self.assertEqual(
            (response.status, response.text), (413, body_too_large(16 << 20) + "\n")
        )
        await _refused_connections_closed()

    async def test_refused_with_body_sent(self) -> None:
        """
        A client that sends its over-limit body with the head still reads
        the 413 (the server drains before closing rather than resetting).
        """
        head = (
            b"POST /?x-haiku-handler=digest.py HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: %d\r\n\r\n" % ((16 << 20) + 1)
        )
        response = await _raw(self.port, head + b"q" * (1 << 20))
        self.assertEqual(response.status, 413)
        await _refused_connections_closed()

    async def test_chunked_over_limit(self) -> None:
        """
        A chunked body is cut off at the limit with 413.
        """
        chunk = b"%x\r\n" % (1 << 20) + b"c" * (1 << 20) + b"\r\n"
        response = await _raw(
            self.port,
            b"POST /?x-haiku-handler=digest.py HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 17 + b"0\r\n\r\n",
        )
        self.assertEqual(response.status, 413)
        await _refused_connections_closed()

    async def test_large_body_whole(self) -> None:
        """
        A body of several frames reaches a Python handler whole in
        C{req.body}, and the worker serves the next request normally.
        """
        body = os.urandom(3 << 20)
        response = await http(self.port, "/?x-haiku-handler=digest.py", "POST", body=body)
        self.assertEqual(response.text, f"{len(body)} {hashlib.sha256(body).hexdigest()}")
        response = await http(self.port, "/?x-haiku-handler=hello.py")
        self.assertEqual(response.text, "hello")

    async def test_stdio_stdin(self) -> None:
        """
        A stdio handler reads a large body from stdin, with its length in
        C{CONTENT_LENGTH} (a chunked one's too); one that answers without
        reading it leaves the worker in step for the next request.
        """
        body = os.urandom(2 << 20)
        response = await http(self.port, "/?x-haiku-handler=digest.py3", "POST", body=body)
        self.assertEqual(
            response.text, f"{len(body)} {hashlib.sha256(body).hexdigest()} {len(body)}\n"
        )
        chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        response = await _raw(
            self.port,
            b"POST /?x-haiku-handler=digest.py3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked,
        )
        self.assertEqual(
            response.text, f"{len(body)} {hashlib.sha256(body).hexdigest()} {len(body)}\n"
        )
        response = await http(self.port, "/?x-haiku-handler=ignore.py3", "POST", body=body)
        self.assertEqual(response.text, "ignored\n")
        response = await http(self.port, "/?x-haiku-handler=digest.py", "POST", body=b"after")
        self.assertEqual(response.text, f"5 {hashlib.sha256(b'after').hexdigest()}")

    async def test_server_memory_flat(self) -> None:
        """
        An 8 MiB body does not grow the server's peak memory by anything
        like 8 MiB (the body passes through a temporary file and frames of
        64 KiB).  The client is a separate process (curl), so that only the
        server's memory is measured.
        """
        body_path = self.mktemp()
        body = os.urandom(8 << 20)
        with open(body_path, "wb") as f:
            f.write(body)
        # Warm up: the first request allocates what every request needs.
        await http(self.port, "/?x-haiku-handler=hello.py")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident size (VmHWM)
        before = _memory("VmRSS")
        out, err, code = await getProcessOutputAndValue(
            "curl",
            ["-sS", "--data-binary", "@" + body_path,
             "-H", "Content-Type: application/octet-stream",
             f"http://127.0.0.1:{self.port}/?x-haiku-handler=digest.py"],
            env=dict(os.environ),
        )
        self.assertEqual((code, err), (0, b""))
        self.assertEqual(out.decode(), f"{len(body)} {hashlib.sha256(body).hexdigest()}")
        growth = _memory("VmHWM") - before
        self.assertLess(growth, 3 << 20, f"server peak grew by {growth} bytes")


class PlainSiteTests(TestCase):
    """
    L{haikutx.runtime.resource.HandlerResource} mounted in a plain C{Site}
    (as a library user may) still refuses a body over its limit, once
    twisted.web has read it.
    """

    async def test_refused_after_reading(self) -> None:
        """
        A body over C{Limits.max_body} gets 413 with the runtime's message,
        and nothing runs; one within it is served.
        """
        from pathlib import Path

        from twisted.web.server import Site

        from haikutx.config import Config
        from haikutx.service import build_runtime
        from haikutx.test.support import write_handlers

        handlers = write_handlers(Path(self.mktemp()), HANDLERS)
        config = Config(http=None, https=None, workers=1, handlers=handlers,
                        limits=Limits(max_body=1000))
        pool, root, fetcher = build_runtime(reactor, config)
        pool.startService()
        self.addCleanup(pool.stopService)
        self.addCleanup(fetcher.close)
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        response = await http(number, "/?x-haiku-handler=digest.py", "POST", body=b"b" * 1001)
        self.assertEqual((response.status, response.text), (413, body_too_large(1000) + "\n"))
        response = await http(number, "/?x-haiku-handler=digest.py", "POST", body=b"b" * 1000)
        self.assertEqual(response.text, f"1000 {hashlib.sha256(b'b' * 1000).hexdigest()}")


class WatchLostTests(SynchronousTestCase):
    """
    L{LimitedRequest.watch_lost}: what a C{notifyFinish} errback would be
    told, without its Deferred.
    """

    def request(self) -> Any:
        from twisted.web.test.requesthelper import DummyChannel

        from haikutx.runtime.body import LimitedRequest

        request = LimitedRequest(DummyChannel(), False)
        request.method, request.clientproto, request.uri = b"GET", b"HTTP/1.1", b"/"
        return request

    def test_lost_before_the_answer(self) -> None:
        """
        The callable is called once with the reason when the connection is
        lost before the response is finished; the last one given only.
        """
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        request, told = self.request(), []
        request.watch_lost(lambda reason: told.append(("first", reason)))
        request.watch_lost(lambda reason: told.append(("second", reason)))
        reason = Failure(ConnectionLost())
        request.connectionLost(reason)
        request.connectionLost(reason)
        self.assertEqual(told, [("second", reason)])

    def test_not_after_the_answer(self) -> None:
        """
        A connection lost after the response is finished calls nothing.
        """
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        request, told = self.request(), []
        request.watch_lost(told.append)
        request.finish()
        request.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(told, [])
