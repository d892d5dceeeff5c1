"""
Integration tests of the runtime: real worker processes, real sockets on
127.0.0.1, responses parsed by h11.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from haikutx.config import Limits, bundled_samples
from haikutx.runtime.loader import HandlerLoader
from haikutx.runtime.pool import WorkerPool
from haikutx.runtime.resource import NO_HANDLER, HandlerResource
from haikutx.test.support import http, ready, start_runtime, until

HANDLERS = {
    "hello.py": (
        "res.write_head(200, {'Content-Type': 'text/plain'})\nres.end('Hello, world!\\n')\n"
    ),
    "raises.py": "res.write_head(200)\nres.write('partial')\n1 / 0\n",
    "raises-head-only.py": "res.write_head(200, {'X-Own': 'yes'})\n1 / 0\n",
    "raises-early.py": "def f():\n    return {}['missing']\nf()\n",
    "syntax.py": "res.end('x'\n",
    "never.py": "res.write_head(200, {'Content-Type': 'text/plain'})\nres.write('partial')\n",
    "never-silent.py": "pass\n",
    "spin.py": "while True:\n    pass\n",
    "counter.py": (
        "import os, sys\n"
        "sys.haiku_count = getattr(sys, 'haiku_count', 0) + 1\n"
        "res.end(f'{sys.haiku_count} {os.getpid()}')\n"
    ),
    "pid-wait.py": (
        "import os\n"
        "res.write_head(200)\n"
        "res.write(str(os.getpid()))\n"
    ),
    "pid-wait-silent.py": "import asyncio\nawait asyncio.sleep(30)\n",
    "console.py": (
        "console.log('Before write_head')\n"
        "res.write_head(201, {'Content-Type': 'text/plain', 'X-Own': 'yes'})\n"
        "console.warn('After', 'write_head', 42)\n"
        "print('printed')\n"
        "res.write('body ')\n"
        "console.error('after write')\n"
        "res.end('end\\n')\n"
    ),
    "console-end-only.py": "console.info('only é')\nres.end()\n",
    "console-long.py": "for i in range(100):\n    console.log('line %03d' % i)\nres.end('ok')\n",
    "delayed.py": (
        "res.write_head(200, {'Content-Type': 'text/plain'})\n"
        "res.write('Hello, ')\n"
        "set_timeout(lambda: res.end('world!\\n'), 600)\n"
    ),
    "blocking-stream.py": (
        "import time\n"
        "res.write_head(200, {'Content-Type': 'text/plain'})\n"
        "res.write('Hello, ')\n"
        "time.sleep(0.6)\n"
        "res.end('world!\\n')\n"
    ),
    "request.py": (
        "import json\n"
        "res.write_head(200, {'Content-Type': 'application/json'})\n"
        "res.end(json.dumps({'method': req.method, 'url': req.url, 'path': req.path,\n"
        "  'query': req.query, 'agent': req.headers['X-Test'], 'has': 'x-test' in req.headers,\n"
        "  'body': req.body.decode(), 'params': req.params, 'remote': req.remote_addr}))\n"
    ),
    "timers.py": (
        "events = []\n"
        "t = set_timeout(lambda: events.append('cancelled'), 50)\n"
        "clear_timeout(t)\n"
        "def tick():\n"
        "    events.append('tick')\n"
        "    if len(events) == 3:\n"
        "        clear_interval(i)\n"
        "        set_timeout(lambda x: res.end(','.join(events + [x])), 20, 'done')\n"
        "i = set_interval(tick, 10)\n"
    ),
    "await.py": (
        "import asyncio\n"
        "await asyncio.sleep(0.05)\n"
        "res.status_code = 202\n"
        "res.set_header('X-Slept', 'yes')\n"
        "res.end('awaited')\n"
    ),
    "timer-raises.py": "res.write_head(200)\nset_timeout(lambda: res.end(1 / 0), 10)\n",
    "timer-raises-streaming.py": "res.write('x')\nset_timeout(lambda: res.end(1 / 0), 10)\n",
    "bad-params.py": "res.end(str(req.params))\n",
    "random.py": "import random\nres.end(str(random.getrandbits(64)))\n",
}


class ErrorTests(TestCase):
    """
    The runtime's own answers (SPEC §2.1).
    """

    def setUp(self) -> None:
        self.port, self.pool = start_runtime(self, HANDLERS, limits=Limits(max_size=200))

    async def test_hello(self) -> None:
        """
        A local handler named by the query string answers.
        """
        response = await http(self.port, "/?x-haiku-handler=hello.py")
        self.assertEqual((response.status, response.text), (200, "Hello, world!\n"))
        self.assertEqual(response.headers["content-type"], "text/plain")

    async def test_header_wins(self) -> None:
        """
        The x-haiku-handler header wins over the query parameter.
        """
        response = await http(
            self.port, "/?x-haiku-handler=missing.py", headers={"x-haiku-handler": "hello.py"}
        )
        self.assertEqual(response.text, "Hello, world!\n")

    async def test_no_handler(self) -> None:
        """
        A request naming no handler gets 400 and the SPEC's message.
        """
        response = await http(self.port, "/some/path?a=1")
        self.assertEqual((response.status, response.text), (400, NO_HANDLER + "\n"))

    async def test_favicon(self) -> None:
        """
        C{/favicon.ico} naming no handler gets an empty 404.
        """
        response = await http(self.port, "/favicon.ico")
        self.assertEqual((response.status, response.body), (404, b""))

    async def test_unsupported_protocol(self) -> None:
        """
        A scheme other than http or https gets 400.
        """
        for name in ("ftp://example.com/x.py", "file:///etc/passwd"):
            response = await http(self.port, f"/?x-haiku-handler={name}")
            self.assertEqual(response.status, 400)
            self.assertIn("Only http and https are supported.", response.text)

    async def test_outside_handlers_directory(self) -> None:
        """
        A relative name that leaves the handlers directory gets 400 and
        reads nothing.
        """
        for name in ("../../../../etc/passwd", "/etc/passwd", "a/../../hello.py"):
            response = await http(self.port, f"/?x-haiku-handler={name}")
            self.assertEqual(response.status, 400, name)
            self.assertNotIn("root:", response.text)

    async def test_missing(self) -> None:
        """
        A local handler that does not exist gets 404.
        """
        response = await http(self.port, "/?x-haiku-handler=nope.py")
        self.assertEqual(response.status, 404)
        self.assertIn("nope.py", response.text)

    async def test_too_large(self) -> None:
        """
        A handler larger than --maxsize gets 400 with the quota.
        """
        response = await http(self.port, "/?x-haiku-handler=request.py")
        self.assertEqual(
            (response.status, response.text),
            (400, "The size of the handler exceeded the quota of 200 bytes.\n"),
        )

    async def test_syntax_error(self) -> None:
        """
        A handler that does not compile gets 500 with the syntax error.
        """
        response = await http(self.port, "/?x-haiku-handler=syntax.py")
        self.assertEqual(response.status, 500)
        first = response.text.splitlines()[0]
        self.assertTrue(
            first.startswith("Handler syntax.py could not be compiled: SyntaxError"), first
        )

    async def test_raises(self) -> None:
        """
        A handler that raises gets 500: the message, then its traceback with
        the file named by the handler's URL.
        """
        response = await http(self.port, "/?x-haiku-handler=raises-early.py")
        self.assertEqual(response.status, 500)
        lines = response.text.splitlines()
        self.assertEqual(
            lines[0],
            "Handler raises-early.py generated an exception at runtime: KeyError: 'missing'",
        )
        self.assertIn('File "raises-early.py", line 3, in <module>', response.text)
        self.assertIn('File "raises-early.py", line 2, in f', response.text)
        self.assertNotIn("runner.py", response.text)

    async def test_raises_after_head(self) -> None:
        """
        When the response has started, a handler's exception closes the
        connection: the response is incomplete.
        """
        response = await http(self.port, "/?x-haiku-handler=raises.py")
        self.assertEqual((response.status, response.body), (200, b"partial"))
        self.assertFalse(response.complete)

    async def test_raises_after_head_unsent(self) -> None:
        """
        A head the client has not received yet (no body written) is replaced
        by the runtime's 500, without the handler's headers.
        """
        response = await http(self.port, "/?x-haiku-handler=raises-head-only.py")
        self.assertEqual(response.status, 500)
        self.assertNotIn("x-own", response.headers)
        self.assertIn("ZeroDivisionError", response.text)

    async def test_exception_in_timer(self) -> None:
        """
        An exception raised in a timer callback answers 500 at once (not
        at the time limit), and closes a response already streaming.
        """
        started = reactor.seconds()
        response = await http(self.port, "/?x-haiku-handler=timer-raises.py")
        self.assertEqual(response.status, 500)
        self.assertIn("generated an exception at runtime: ZeroDivisionError", response.text)
        self.assertIn('File "timer-raises.py", line 2, in <lambda>', response.text)
        response = await http(self.port, "/?x-haiku-handler=timer-raises-streaming.py")
        self.assertEqual(response.body, b"x")
        self.assertFalse(response.complete)
        self.assertLess(reactor.seconds() - started, 3)

    async def test_bad_request_body(self) -> None:
        """
        A malformed body read through C{req.params} gets 400.
        """
        response = await http(
            self.port,
            "/?x-haiku-handler=bad-params.py",
            method="POST",
            headers={"Content-Type": "application/json"},
            body=b"{not json",
        )
        self.assertEqual(response.status, 400)
        self.assertIn("JSON body does not parse", response.text)


class LocalNameTests(TestCase):
    """
    Local handler names resolve inside --handlers only, symlinks included:
    a link out of it serves nothing, and no answer carries the content of
    the file it points to.
    """

    def setUp(self) -> None:
        from pathlib import Path

        base = Path(self.mktemp()).absolute()
        outside = base / "outside"
        outside.mkdir(parents=True)
        # Not Python: before the fix its first line came back in the 500
        # "could not be compiled" answer.
        (outside / "shadow").write_text("root-secret:$6$hash:19000:0:99999:7:::\n")
        handlers = base / "handlers"
        (handlers / "lib").mkdir(parents=True)
        (handlers / "lib" / "real.py").write_text("res.end('inside')\n")
        (handlers / "link.py").symlink_to("lib/real.py")
        (handlers / "etcdir").symlink_to("/etc")
        (handlers / "outdir").symlink_to(outside)
        (handlers / "outfile.py").symlink_to(outside / "shadow")
        self.port, self.pool = start_runtime(self, handlers)

    async def test_links_out_refused(self) -> None:
        """
        C{etcdir/shadow} through C{etcdir -> /etc}, a linked directory and a
        linked file outside all get 403, and nothing of their targets.
        """
        for name in ("etcdir/shadow", "etcdir/passwd", "outdir/shadow", "outfile.py"):
            response = await http(self.port, f"/?x-haiku-handler={name}")
            self.assertEqual(
                (response.status, response.text),
                (403, f"The handler {name} leads outside the handlers directory.\n"),
            )
            self.assertNotIn("secret", response.text)
            self.assertNotIn("root:", response.text)

    async def test_link_inside_served(self) -> None:
        """
        A link that stays inside the directory is served.
        """
        response = await http(self.port, "/?x-haiku-handler=link.py")
        self.assertEqual((response.status, response.text), (200, "inside"))


class TimeLimitTests(TestCase):
    """
    --maxtime and dead workers: every request is answered, never hung.
    """

    def setUp(self) -> Deferred[None]:
        self.port, self.pool = start_runtime(
            self, HANDLERS, workers=1, max_requests=0, limits=Limits(max_time=0.5)
        )
        return Deferred.fromCoroutine(ready(self.pool))

    async def test_never_ends(self) -> None:
        """
        A handler that never calls C{res.end()} gets 500 at the time limit,
        and the next request is served by a fresh worker.
        """
        response = await http(self.port, "/?x-haiku-handler=never-silent.py")
        self.assertEqual(
            (response.status, response.text),
            (500, "Handler never-silent.py did not complete within the time limit of 500 ms\n"),
        )
        response = await http(self.port, "/?x-haiku-handler=hello.py")
        self.assertEqual(response.text, "Hello, world!\n")
        # The killed child is counted when its zygote reports its end,
        # which may come after the next child (already waiting) answered.
        await until(lambda: self.pool.counters["killed"] >= 1, timeout=5.0)
        self.assertEqual(self.pool.counters["killed"], 1)

    async def test_endless_loop(self) -> None:
        """
        A handler spinning in an endless loop is killed at the time limit.
        """
        response = await http(self.port, "/?x-haiku-handler=spin.py")
        self.assertEqual(response.status, 500)
        self.assertIn("time limit of 500 ms", response.text)
        response = await http(self.port, "/?x-haiku-handler=hello.py")
        self.assertEqual(response.status, 200)

    async def test_never_ends_after_head(self) -> None:
        """
        Past the time limit with the head sent, the connection is closed.
        """
        response = await http(self.port, "/?x-haiku-handler=never.py")
        self.assertEqual((response.status, response.body), (200, b"partial"))
        self.assertFalse(response.complete)

    async def test_worker_killed(self) -> None:
        """
        A worker killed with SIGKILL mid-request answers 500 naming the
        cause, and is replaced.
        """
        pending = Deferred.fromCoroutine(http(self.port, "/?x-haiku-handler=pid-wait-silent.py"))
        for _ in range(100):
            busy = [w for w in self.pool.workers if w.state == "busy"]
            if busy:
                break
            await deferLater(reactor, 0.02, lambda: None)
        os.kill(busy[0].pid, signal.SIGKILL)
        response = await pending
        self.assertEqual(response.status, 500)
        self.assertEqual(
            response.text,
            "Handler pid-wait-silent.py did not complete: the worker process was "
            "killed by signal 9 (SIGKILL).\n",
        )
        # A new zygote starts an interpreter: longer than this --maxtime
        # allows a request to wait on a loaded machine.
        await ready(self.pool)
        response = await http(self.port, "/?x-haiku-handler=hello.py")
        self.assertEqual(response.status, 200)

    async def test_handler_process_killed(self) -> None:
        """
        When the process running the handler (the zygote's child) is killed
        with SIGKILL, the answer names that signal, and the slot is
        replaced.
        """
        pending = Deferred.fromCoroutine(http(self.port, "/?x-haiku-handler=pid-wait-silent.py"))
        await until(lambda: any(w.state == "busy" for w in self.pool.workers))
        busy = next(w for w in self.pool.workers if w.state == "busy")
        os.kill(busy.child_pid, signal.SIGKILL)
        response = await pending
        self.assertEqual(
            (response.status, response.text),
            (500, "Handler pid-wait-silent.py did not complete: the worker process was "
                  "killed by signal 9 (SIGKILL).\n"),
        )
        response = await http(self.port, "/?x-haiku-handler=hello.py")
        self.assertEqual(response.status, 200)


class SharedTimeLimitTests(SynchronousTestCase):
    """
    A slot's requests share one time limit (the worker's): the request
    that ends gives up only its own, never that of the next request its
    worker was handed to meanwhile.
    """

    def test_next_request_keeps_its_limit(self) -> None:
        """
        A request answered after its worker went on to the next request
        (the pool hands it out as it is released) leaves that request's
        limit in force: it still runs out, answered 500, and its worker is
        killed.
        """
        import io

        from twisted.internet.task import Clock
        from twisted.web.server import Request
        from twisted.web.test.requesthelper import DummyChannel

        from haikutx.runtime.exchange import Exchange
        from haikutx.runtime.loader import HandlerSource
        from haikutx.runtime.timers import Deadline

        clock = Clock()

        class Worker:
            pid = 1
            kind = "python"
            child = None

            def __init__(self) -> None:
                self.time_limit = Deadline(clock)
                self.killed: list[str] = []

            def run(self, exchange: Any, head: Any, body: Any) -> None:
                pass

            def detach(self, exchange: Any) -> None:
                pass

            def kill(self, reason: str) -> None:
                self.killed.append(reason)

        def request() -> Request:
            request = Request(DummyChannel(), False)
            request.method, request.clientproto = b"GET", b"HTTP/1.1"
            request.uri = b"/?x-haiku-handler=a.py"
            request.content = io.BytesIO(b"")
            return request

        worker = Worker()
        handler = HandlerSource(url="a.py", source=b"")
        second = Exchange(clock, request(), worker, None, handler, 5.0)  # type: ignore[arg-type]

        class Pool:
            def release(self, released: Any) -> None:
                # Handed on at once, as to a request waiting for it.
                second.start({}, b"")  # type: ignore[arg-type]

        first = Exchange(clock, request(), worker, Pool(), handler, 5.0)  # type: ignore[arg-type]
        ends: list[int | None] = []
        first.on_end = ends.append
        first.start({}, b"")  # type: ignore[arg-type]
        clock.advance(1)
        first.head(200, [])
        first.finish([])
        # Its end told once, to on_end, and to done, asked for after it.
        self.assertEqual(ends, [200])
        self.assertEqual(self.successResultOf(first.done), 200)
        clock.advance(4.9)
        self.assertNoResult(second.done)
        self.assertEqual(worker.killed, [])
        clock.advance(0.1)
        self.assertEqual(self.successResultOf(second.done), 500)
        self.assertEqual(worker.killed, ["exceeded the time limit of its request"])
        self.assertFalse(worker.time_limit.pending)


class IdleTimeoutTests(SynchronousTestCase):
    """
    A runtime connection's idle timeout (L{RuntimeChannel}'s, one timer
    for the connection's life) behaves as twisted.web's.
    """

    def test_idle_timeout(self) -> None:
        """
        An idle connection is closed C{timeout} seconds after its last
        bytes; never while a request is answered; again C{timeout} seconds
        after each answer; its timer is gone once the connection is.
        """
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport
        from twisted.web.server import NOT_DONE_YET

        from haikutx.runtime.site import RuntimeSite

        answering: list[Any] = []

        class Slow(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> Any:
                answering.append(request)
                return NOT_DONE_YET

        clock = Clock()
        site = RuntimeSite(Slow(), reactor=clock, timeout=10)
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        clock.advance(9)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
        clock.advance(9)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"\r\n")
        clock.advance(100)
        self.assertFalse(transport.disconnecting)
        for _ in range(3):
            answering.pop().finish()
            clock.advance(9.5)
            self.assertFalse(transport.disconnecting)
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            clock.advance(30)
            self.assertFalse(transport.disconnecting)
        answering.pop().finish()
        clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(None)
        self.assertEqual(
            [call for call in clock.getDelayedCalls() if "Deadline" in repr(call.func)], []
        )


class ResponseHeadTests(SynchronousTestCase):
    """
    L{RuntimeChannel} writes a response head as twisted.web does.
    """

    def test_same_bytes(self) -> None:
        """
        The head written is byte for byte twisted.web's, in one write.
        """
        from twisted.internet.testing import StringTransport
        from twisted.web.http import HTTPChannel
        from twisted.web.http_headers import Headers

        from haikutx.runtime.site import RuntimeChannel

        headers = Headers()
        headers.addRawHeader(b"content-type", b"text/plain")
        headers.addRawHeader(b"x-two", b"a")
        headers.addRawHeader(b"x-two", b"b")
        headers.addRawHeader(b"Content-Length", b"14")
        written = []
        for channel in (HTTPChannel(), RuntimeChannel()):
            transport = StringTransport()
            channel.makeConnection(transport)
            channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
            channel.writeHeaders(b"HTTP/1.0", b"404", b"Not Found", Headers())
            written.append(transport.value())
            channel.connectionLost(None)
        self.assertEqual(written[0], written[1])
        self.assertTrue(written[1].startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"))
        transport = StringTransport()
        channel = RuntimeChannel()
        channel.makeConnection(transport)
        self.assertRaises(TypeError, channel.writeHeaders, b"HTTP/1.1", b"200", "OK", headers)
        channel.connectionLost(None)


class RequestParameterTests(SynchronousTestCase):
    """
    L{request_parameter}: a C{x-haiku-*} header if given and not empty,
    else the query string's last value.
    """

    def test_parameters(self) -> None:
        """
        A non-empty header wins, whatever its case; an empty one is not
        given; the query string's last value, percent-decoded as UTF-8;
        the last of repeated headers; any other header as twisted.web
        gives it.
        """
        from twisted.web.server import Request
        from twisted.web.test.requesthelper import DummyChannel

        from haikutx.runtime.parameters import request_parameter

        request = Request(DummyChannel(), False)
        request.uri = (
            b"/?x-haiku-handler=q.py&x-haiku-language=ruby&x-haiku-language=lua"
            b"&x-haiku-console=h%C3%A9"
        )
        request.requestHeaders.addRawHeader(b"X-HAIKU-HANDLER", b"h\xc3\xa9.py")
        request.requestHeaders.addRawHeader(b"x-haiku-language", b"")
        request.requestHeaders.addRawHeader(b"x-other", b"no")
        self.assertEqual(request_parameter(request, "x-haiku-handler"), "h\u00e9.py")
        self.assertEqual(request_parameter(request, "x-haiku-language"), "lua")
        self.assertEqual(request_parameter(request, "x-haiku-console"), "h\u00e9")
        self.assertIsNone(request_parameter(request, "x-haiku-missing"))
        self.assertEqual(request_parameter(request, "x-other"), "no")
        bare = Request(DummyChannel(), False)
        bare.uri = b"/"
        bare.requestHeaders.addRawHeader(b"X-Haiku-Handler", b"one.py")
        bare.requestHeaders.addRawHeader(b"X-Haiku-Handler", b"two.py")
        self.assertEqual(request_parameter(bare, "x-haiku-handler"), "two.py")

    def test_queries_kept(self) -> None:
        """
        A URI's query is parsed once while it is one of the few kept: the
        same URI again gives the same parameters, another URI its own; no
        more than C{_QUERIES_KEPT} are kept, none longer than
        C{_QUERY_KEPT_SIZE} bytes.
        """
        from twisted.web.server import Request
        from twisted.web.test.requesthelper import DummyChannel

        from haikutx.runtime import parameters as resource
        from haikutx.runtime.parameters import HANDLER, request_parameter

        def handler(uri: bytes) -> str | None:
            request = Request(DummyChannel(), False)
            request.uri = uri
            return request_parameter(request, HANDLER)

        self.patch(resource, "_QUERIES", {})
        parsed = []
        real = resource.parse_qsl

        def counting(*args: Any, **kwargs: Any) -> Any:
            parsed.append(args[0])
            return real(*args, **kwargs)

        self.patch(resource, "parse_qsl", counting)
        for _ in range(3):
            self.assertEqual(handler(b"/?x-haiku-handler=a.py"), "a.py")
        self.assertEqual(handler(b"/?x-haiku-handler=b.py"), "b.py")
        self.assertEqual(len(parsed), 2)
        for i in range(resource._QUERIES_KEPT * 2):
            self.assertEqual(handler(b"/?x-haiku-handler=%d.py" % i), f"{i}.py")
            self.assertLessEqual(len(resource._QUERIES), resource._QUERIES_KEPT)
        long = b"/?x-haiku-handler=c.py&pad=" + b"x" * resource._QUERY_KEPT_SIZE
        self.assertEqual(handler(long), "c.py")
        self.assertNotIn(long, resource._QUERIES)


class LogTests(TestCase):
    """
    One structured event per request (SPEC §7), and no second line for it
    in a L{RuntimeSite}'s access log.
    """

    async def test_one_event_per_request(self) -> None:
        """
        A served request emits one event naming the client, method,
        handler, status, duration and worker; a refused one a warning with
        the reason. The access log keeps only the other requests.
        """
        from pathlib import Path

        from twisted.logger import globalLogPublisher

        from haikutx.config import Config
        from haikutx.runtime.site import RuntimeSite
        from haikutx.service import build_runtime
        from haikutx.test.support import write_handlers

        handlers = write_handlers(Path(self.mktemp()), HANDLERS)
        pool, root, fetcher = build_runtime(
            reactor, Config(http=None, https=None, workers=1, handlers=handlers)
        )
        pool.startService()
        self.addCleanup(fetcher.close)
        self.addCleanup(pool.stopService)
        access = Path(self.mktemp())
        site = RuntimeSite(root, logPath=str(access), reactor=reactor)
        listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        self.assertEqual((await http(port, "/?x-haiku-handler=hello.py")).status, 200)
        self.assertEqual((await http(port, "/?x-haiku-handler=missing.py")).status, 404)
        self.assertEqual((await http(port, "/_haiku/status")).status, 200)

        namespace = "haikutx.runtime.resource.HandlerResource"
        mine = [e for e in events if e.get("log_namespace") == namespace]
        served, refused = mine
        self.assertEqual(
            (served["client"], served["method"], served["handler_url"], served["status"],
             served["log_level"].name),
            ("127.0.0.1", "GET", "hello.py", 200, "info"),
        )
        self.assertEqual(served["worker_pid"], next(iter(pool.workers)).pid)
        self.assertGreater(served["duration"], 0)
        # The fields Logger.emit gives every event.
        import time

        self.assertEqual(served["log_logger"].namespace, namespace)
        self.assertEqual(type(served["log_source"]).__name__, "HandlerResource")
        self.assertLess(abs(served["log_time"] - time.time()), 60)
        # Its system given as a text log shows one not given, made once.
        from twisted.logger import formatEventAsClassicLogText

        self.assertEqual(served["log_system"], namespace + "#info")
        self.assertIn(f"[{namespace}#info] 127.0.0.1 GET hello.py -> 200 in ",
                      formatEventAsClassicLogText(served))
        self.assertEqual(
            (refused["handler_url"], refused["status"], refused["log_level"].name),
            ("missing.py", 404, "warn"),
        )
        site.stopFactory()
        lines = access.read_text().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn('"GET /_haiku/status HTTP/1.1" 200', lines[0])

    def test_startup_heap_frozen(self) -> None:
        """
        Once the runtime's site has started, the objects made before are
        out of the garbage collector's sight (collections do not walk them
        on every request's path).
        """
        import gc

        start_runtime(self, HANDLERS)
        self.assertGreater(gc.get_freeze_count(), 0)

    async def test_response_sent_before_event(self) -> None:
        """
        The response is on its way to the client when the request's event
        is emitted: the bookkeeping after an answer does not delay it.
        """
        import socket

        from twisted.logger import globalLogPublisher

        port, _ = start_runtime(self, HANDLERS)
        client = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(client.close)
        seen: list[bytes] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("handler_url") == "hello.py" and "status" in event:
                try:
                    seen.append(client.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT))
                except BlockingIOError:
                    seen.append(b"")

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        client.sendall(b"GET /?x-haiku-handler=hello.py HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(100):
            if seen:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(seen), 1)
        self.assertTrue(seen[0].endswith(b"\r\n\r\nHello, world!\n"), seen[0])

    async def test_event_text(self) -> None:
        """
        The request event's text is made when it is emitted: a text log
        shows it as is, braces in the handler's name included.
        """
        from twisted.logger import formatEvent, globalLogPublisher

        port, _ = start_runtime(self, {"b{r}ace{}.py": "res.end('ok')\n"})
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual((await http(port, "/?x-haiku-handler=b%7Br%7Dace%7B%7D.py")).status, 200)
        [served] = [e for e in events if e.get("handler_url") == "b{r}ace{}.py"]
        self.assertEqual(
            formatEvent(served),
            f"127.0.0.1 GET b{{r}}ace{{}}.py -> 200 in {served['duration']:.3f}s",
        )
        self.assertEqual((served["status"], served["answer"]), (200, 200))


class SiteTests(TestCase):
    """
    The runtime's site.
    """

    def test_local_address_asked_once_per_connection(self) -> None:
        """
        Requests on one connection ask its transport for the local address
        once (a system call each on TCP), and each request still has it.
        (A L{StringTransport}, so that the asking is counted.)
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from haikutx.runtime.site import RuntimeSite

        class Counting(StringTransport):
            asked = 0

            def getHost(self) -> Any:
                self.asked += 1
                return super().getHost()

        hosts = []

        class Page(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                hosts.append(request.getHost())
                return b"ok"

        site = RuntimeSite(Page(), reactor=reactor)
        transport = Counting(hostAddress=IPv4Address("TCP", "127.0.0.1", 8080))
        protocol = site.buildProtocol(None)
        protocol.makeConnection(transport)
        for _ in range(3):
            protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        protocol.connectionLost(None)
        self.assertEqual(transport.value().count(b"200 OK"), 3)
        self.assertEqual(hosts, [IPv4Address("TCP", "127.0.0.1", 8080)] * 3)
        self.assertEqual(transport.asked, 1)


class LanguageMemoTests(TestCase):
    """
    A handler's language is worked out once for its URL, override and code.
    """

    def test_remembered_per_code(self) -> None:
        """
        The same handler again is not detected again; new code at the same
        URL, or another override, is.
        """
        from haikutx.languages import UnknownLanguage
        from haikutx.runtime import resource as module
        from haikutx.runtime.loader import HandlerSource

        calls = []
        real = module.detect

        def counting(*args: Any) -> Any:
            calls.append(args[1:3])
            return real(*args)

        self.patch(module, "detect", counting)
        resource = HandlerResource(reactor, None, None, scheduler=object())  # type: ignore
        python = HandlerSource(url="h", source=b"res.end('x')\n")
        names = [resource._detect(None, python).name for _ in range(3)]
        names.append(resource._detect(None, HandlerSource(url="h", source=b"res.end('x')\n")).name)
        ruby = HandlerSource(url="h", source=b"#!/usr/bin/env ruby\nputs 1\n")
        names.append(resource._detect(None, ruby).name)
        names.append(resource._detect("lua", ruby).name)
        names.append(resource._detect("lua", ruby).name)
        self.assertEqual(names, ["python"] * 4 + ["ruby", "lua", "lua"])
        self.assertEqual(calls, [(None, "h"), (None, "h"), ("lua", "h")])
        for _ in range(2):
            self.assertRaises(UnknownLanguage, resource._detect, "cobol", ruby)
        self.assertEqual(len(calls), 5)


class ClientGoneTests(TestCase):
    """
    A client that goes away while its request waits for a worker loses
    its place, and the worker goes to the next request.
    """

    def setUp(self) -> Deferred[None]:
        self.port, self.pool = start_runtime(
            self, HANDLERS, workers=1, max_requests=0, limits=Limits(max_time=3)
        )
        return Deferred.fromCoroutine(ready(self.pool))

    async def test_leaves_while_waiting(self) -> None:
        """
        The only worker is busy; a second client sends a request and leaves
        while it waits. The wait is dropped at once, and once the first
        request is answered the worker serves a third request.
        """
        first = Deferred.fromCoroutine(http(self.port, "/?x-haiku-handler=delayed.py"))
        await until(lambda: self.pool.status()["workers"] == {"busy": 1})
        leaving = await _connect(self.port)
        leaving.transport.write(
            b"GET /?x-haiku-handler=hello.py HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        await _until_waiting(self.port, 1)
        leaving.transport.abortConnection()
        await _until_waiting(self.port, 0)
        self.assertEqual((await first).text, "Hello, world!\n")
        started = reactor.seconds()
        third = await http(self.port, "/?x-haiku-handler=hello.py")
        self.assertEqual((third.status, third.text), (200, "Hello, world!\n"))
        self.assertLess(reactor.seconds() - started, 2)


async def _until_waiting(port: int, count: int, timeout: float = 10.0) -> None:
    """
    Wait (bounded) until C{count} requests wait for a worker, for their
    turn (the scheduler) or at the pool, as C{/_haiku/status} says.
    """
    deadline = reactor.seconds() + timeout
    while True:
        status = json.loads((await http(port, "/_haiku/status")).body)
        waiting = status["scheduler"]["waiting"] + status["pool"]["waiting"]
        if waiting == count:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"{waiting} requests wait, not {count}: {status}")
        await deferLater(reactor, 0.01, lambda: None)


async def _connect(port: int) -> Protocol:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    return await connectProtocol(endpoint, Protocol())


class HeartbeatTests(TestCase):
    """
    The heartbeat catches a worker whose loop is blocked.
    """

    async def test_blocked_loop_is_killed(self) -> None:
        """
        A handler that blocks the loop stops the heartbeat answers: the
        worker is killed well before the (long) time limit, with the reason.
        """
        port, pool = start_runtime(
            self,
            HANDLERS,
            workers=1,
            limits=Limits(max_time=30),
            keepalive_interval=0.2,
            keepalive_timeout=0.3,
        )
        started = reactor.seconds()
        response = await http(port, "/?x-haiku-handler=spin.py")
        self.assertLess(reactor.seconds() - started, 10)
        self.assertEqual(response.status, 500)
        self.assertIn("did not answer a heartbeat within 300 ms", response.text)


class RecyclingTests(TestCase):
    """
    --maxrequests.
    """

    async def test_fresh_process_per_request(self) -> None:
        """
        With --maxrequests 1 every request gets a fresh process: a global
        counted in the process is 1 every time.
        """
        port, pool = start_runtime(self, HANDLERS, workers=1, max_requests=1)
        answers = [(await http(port, "/?x-haiku-handler=counter.py")).text for _ in range(3)]
        self.assertEqual([a.split()[0] for a in answers], ["1", "1", "1"])
        self.assertEqual(len({a.split()[1] for a in answers}), 3)

    async def test_random_numbers_per_process(self) -> None:
        """
        Each fresh process has random numbers of its own: C{random} is
        reseeded in every child, not inherited from the zygote.
        """
        port, pool = start_runtime(self, HANDLERS, workers=1, max_requests=1)
        answers = [(await http(port, "/?x-haiku-handler=random.py")).text for _ in range(3)]
        self.assertEqual(len(set(answers)), 3, answers)

    async def test_reused_process(self) -> None:
        """
        With --maxrequests 0 one process serves every request.
        """
        port, pool = start_runtime(self, HANDLERS, workers=1, max_requests=0)
        answers = [(await http(port, "/?x-haiku-handler=counter.py")).text for _ in range(3)]
        self.assertEqual([a.split()[0] for a in answers], ["1", "2", "3"])
        self.assertEqual(len({a.split()[1] for a in answers}), 1)


class HandlerAPITests(TestCase):
    """
    The Python handler API (SPEC §3.1).
    """

    def setUp(self) -> None:
        self.port, self.pool = start_runtime(self, HANDLERS)

    async def test_request(self) -> None:
        """
        C{req} carries the method, URL, path, query, headers, body, merged
        params and the client's address.
        """
        response = await http(
            self.port,
            "/a/b?x-haiku-handler=request.py&q=1&q=2",
            method="POST",
            headers={"X-Test": "yes", "Content-Type": "application/x-www-form-urlencoded"},
            body=b"f=3",
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(
            json.loads(response.body),
            {
                "method": "POST",
                "url": "/a/b?x-haiku-handler=request.py&q=1&q=2",
                "path": "/a/b",
                "query": {"x-haiku-handler": "request.py", "q": "2"},
                "agent": "yes",
                "has": True,
                "body": "f=3",
                "params": {"x-haiku-handler": "request.py", "q": "2", "f": "3"},
                "remote": "127.0.0.1",
            },
        )

    async def test_json_params(self) -> None:
        """
        A JSON body's members are merged into C{req.params}.
        """
        response = await http(
            self.port,
            "/?x-haiku-handler=request.py",
            method="POST",
            headers={"X-Test": "j", "Content-Type": "application/json"},
            body=b'{"n": 1, "s": "x"}',
        )
        self.assertEqual(
            json.loads(response.body)["params"],
            {"x-haiku-handler": "request.py", "n": 1, "s": "x"},
        )

    async def test_timers(self) -> None:
        """
        C{set_timeout}, C{clear_timeout}, C{set_interval} and
        C{clear_interval} work, with extra arguments passed on.
        """
        response = await http(self.port, "/?x-haiku-handler=timers.py")
        self.assertEqual(response.text, "tick,tick,tick,done")

    async def test_top_level_await(self) -> None:
        """
        Top-level C{await} works; C{res.status_code} and C{set_header} set
        the head.
        """
        response = await http(self.port, "/?x-haiku-handler=await.py")
        self.assertEqual((response.status, response.text), (202, "awaited"))
        self.assertEqual(response.headers["x-slept"], "yes")

    async def test_whole_response_has_length(self) -> None:
        """
        A response that the handler ends at once is sent with its
        C{Content-Length}, in one piece; one that streams is chunked.
        """
        response = await http(self.port, "/?x-haiku-handler=hello.py")
        self.assertEqual(response.headers.get("content-length"), "14")
        self.assertNotIn("transfer-encoding", response.headers)
        response = await http(self.port, "/?x-haiku-handler=delayed.py")
        self.assertEqual(response.headers.get("transfer-encoding"), "chunked")
        self.assertNotIn("content-length", response.headers)

    async def test_streaming(self) -> None:
        """
        The response streams: the first part arrives before the handler
        writes the second.
        """
        response = await http(self.port, "/?x-haiku-handler=delayed.py")
        self.assertEqual(response.text, "Hello, world!\n")
        first = next(t for t, data in response.arrivals if b"Hello, " in data)
        last = next(t for t, data in response.arrivals if b"world!" in data)
        self.assertGreater(last - first, 0.4)

    async def test_streaming_without_yielding(self) -> None:
        """
        A C{res.write} reaches the client at once, even when the handler
        then computes without yielding to its loop.
        """
        response = await http(self.port, "/?x-haiku-handler=blocking-stream.py")
        self.assertEqual(response.text, "Hello, world!\n")
        first = next(t for t, data in response.arrivals if b"Hello, " in data)
        last = next(t for t, data in response.arrivals if b"world!" in data)
        self.assertGreater(last - first, 0.4)

    async def test_samples(self) -> None:
        """
        The bundled samples run.
        """
        port, pool = start_runtime(self, bundled_samples())
        response = await http(port, "/?x-haiku-handler=hello.py")
        self.assertEqual(response.text, "Hello, world!\n")
        response = await http(port, "/p?x-haiku-handler=echo.py&c=3", method="POST",
                              headers={"Content-Type": "application/x-www-form-urlencoded"},
                              body=b"a=1")
        self.assertEqual(
            json.loads(response.body),
            {"method": "POST", "path": "/p", "body": "a=1",
             "params": {"a": "1", "c": "3", "x-haiku-handler": "echo.py"}},
        )


class ConsoleTests(TestCase):
    """
    Console capture (SPEC §2.2), byte for byte.
    """

    def setUp(self) -> None:
        self.port, self.pool = start_runtime(self, HANDLERS, limits=Limits(max_console=40))

    async def test_none(self) -> None:
        """
        By default the console is discarded and the response untouched.
        """
        response = await http(self.port, "/?x-haiku-handler=console.py")
        self.assertEqual((response.status, response.text), (201, "body end\n"))
        self.assertNotIn("x-haiku-console", response.headers)
        unknown = await http(self.port, "/?x-haiku-handler=console.py&x-haiku-console=BODY")
        self.assertEqual(unknown.text, "body end\n")

    async def test_header(self) -> None:
        """
        In header mode the console up to the head is sent, encoded, in the
        x-haiku-console header; the body is untouched.
        """
        response = await http(self.port, "/?x-haiku-handler=console.py&x-haiku-console=header")
        self.assertEqual(response.headers["x-haiku-console"], "Before write_head%0A")
        self.assertEqual((response.status, response.text), (201, "body end\n"))
        self.assertEqual(response.headers["x-own"], "yes")

    async def test_body(self) -> None:
        """
        In body mode the body is the console (the most recent --maxconsole
        bytes), with the handler's status and headers.
        """
        response = await http(self.port, "/?x-haiku-handler=console.py&x-haiku-console=body")
        self.assertEqual(response.status, 201)
        self.assertEqual(response.headers["x-own"], "yes")
        full = "Before write_head\nAfter write_head 42\nprinted\nafter write\n"
        self.assertEqual(response.text, full[-40:])

    async def test_trailer(self) -> None:
        """
        In trailer mode the response is chunked and announces the trailer,
        which carries the encoded console up to C{res.end()}.
        """
        response = await http(self.port, "/?x-haiku-handler=console.py&x-haiku-console=trailer")
        self.assertEqual(response.headers["trailer"], "x-haiku-console")
        self.assertEqual(response.headers["transfer-encoding"], "chunked")
        self.assertEqual(response.text, "body end\n")
        full = "Before write_head\nAfter write_head 42\nprinted\nafter write\n"
        self.assertEqual(
            response.trailers,
            {"x-haiku-console": full[-40:].replace("\n", "%0A")},
        )

    async def test_trailer_end_only(self) -> None:
        """
        The trailer is sent even when the handler's first call is
        C{res.end()}, UTF-8 percent-encoded.
        """
        response = await http(
            self.port,
            "/?x-haiku-handler=console-end-only.py",
            headers={"x-haiku-console": "trailer"},
        )
        self.assertTrue(response.complete)
        self.assertEqual(response.trailers, {"x-haiku-console": "only %C3%A9%0A"})

    async def test_trailer_http10(self) -> None:
        """
        An HTTP/1.0 client, which cannot take trailers, gets the body alone.
        """
        response = await http(
            self.port, "/?x-haiku-handler=console.py&x-haiku-console=trailer", version="1.0"
        )
        self.assertEqual(response.text, "body end\n")
        self.assertNotIn("trailer", response.headers)


class LibraryTests(TestCase):
    """
    The runtime as a resource in a user's own site (SPEC §6).
    """

    async def test_mounted(self) -> None:
        """
        A L{HandlerResource} with a fixed handler, given the reactor and a
        pool, serves under a child of a user's own root resource.
        """
        pool = WorkerPool(reactor, size=1, max_requests=1)
        pool.startService()
        self.addCleanup(pool.stopService)
        loader = HandlerLoader(reactor, bundled_samples(), 16384)
        root = Resource()
        root.putChild(b"hello", HandlerResource(reactor, pool, loader, handler="hello.py"))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        response = await http(port.getHost().port, "/hello/anything")
        self.assertEqual((response.status, response.text), (200, "Hello, world!\n"))


class URLHandlerTests(TestCase):
    """
    Handlers fetched by URL through the runtime (SPEC §2.1).
    """

    def setUp(self) -> None:
        from twisted.web.static import Data

        origin = Resource()
        origin.putChild(b"hello.py", Data(HANDLERS["hello.py"].encode(), "text/plain"))
        origin.putChild(b"big.py", Data(b"#" * 300, "text/plain"))
        listening = reactor.listenTCP(0, Site(origin), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.origin = f"http://127.0.0.1:{listening.getHost().port}/"
        self.port, self.pool = start_runtime(
            self, {}, limits=Limits(max_size=200), allow=(self.origin,), debug=True
        )

    async def test_fetched_and_cached(self) -> None:
        """
        A handler named by an allowed URL runs; the second request is served
        from the cache (C{x-haiku-cache} under --debug).
        """
        first = await http(self.port, f"/?x-haiku-handler={self.origin}hello.py")
        second = await http(self.port, f"/?x-haiku-handler={self.origin}hello.py")
        self.assertEqual((first.status, first.text), (200, "Hello, world!\n"))
        self.assertEqual((first.headers["x-haiku-cache"], second.headers["x-haiku-cache"]),
                         ("miss", "hit"))
        self.assertEqual(second.text, "Hello, world!\n")

    async def test_errors(self) -> None:
        """
        A non-200 origin answers 502, an oversized handler 400, a loopback
        URL no prefix allows 403.
        """
        missing = await http(self.port, f"/?x-haiku-handler={self.origin}missing.py")
        self.assertEqual(
            (missing.status, missing.text),
            (502, f"HTTP error when obtaining handler code from {self.origin}missing.py: 404\n"),
        )
        big = await http(self.port, f"/?x-haiku-handler={self.origin}big.py")
        self.assertEqual(
            (big.status, big.text),
            (400, "The size of the handler exceeded the quota of 200 bytes.\n"),
        )
        other = self.origin.replace("127.0.0.1", "localhost")
        refused = await http(self.port, f"/?x-haiku-handler={other}hello.py")
        self.assertEqual(refused.status, 403)
