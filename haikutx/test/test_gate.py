"""
Tests for L{haikutx.gate.service}: unit tests on Clock and StringTransport, and
integration tests with real backends, a real started application and real
TLS on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import sys
from pathlib import Path

import h11
from twisted.application.service import IServiceCollection
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

import twisted
from haikutx.config import Config
from haikutx.gate.apps import Application
from haikutx.gate.names import NamesEntry, NamesFile
from haikutx.gate.request import forwarded_head
from haikutx.gate.routing import route
from haikutx.gate.service import GateService
from haikutx.net.http1 import parse_request_head
from haikutx.service import build_service
from haikutx.tap import Options

SERVER_PEM = os.path.join(os.path.dirname(twisted.__file__), "test", "server.pem")


# --- helpers -----------------------------------------------------------------


class Echo(Resource):
    """
    Answers with a JSON description of the request it got, in two writes
    (so twisted.web sends it chunked).
    """

    isLeaf = True

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag

    def render(self, request):
        body = request.content.read()
        info = {
            "tag": self.tag,
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "headers": {k.decode().lower(): v[0].decode()
                        for k, v in request.requestHeaders.getAllRawHeaders()},
            "body_length": len(body),
            "body": body[:100].decode("latin-1"),
        }
        data = json.dumps(info).encode()
        request.setHeader(b"content-type", b"application/json")
        request.write(data[:10])
        request.write(data[10:])
        request.finish()
        return NOT_DONE_YET


@implementer(IPushProducer)
class _Zeros:
    """
    Writes C{total} zero bytes to a transport, honouring back-pressure.
    """

    def __init__(self, transport, total: int, chunk: int = 65536) -> None:
        self.transport, self.left, self.chunk = transport, total, chunk
        self.paused = False
        self.done: Deferred = Deferred()

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        block = b"\0" * self.chunk
        while not self.paused and self.left > 0:
            n = min(self.chunk, self.left)
            self.left -= n
            self.transport.write(block if n == self.chunk else block[:n])
        if self.left == 0 and not self.done.called:
            self.transport.unregisterProducer()
            self.done.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True
        self.left = 0


class BigDownload(Resource):
    """
    Answers with C{size} zero bytes, streamed with a producer.
    """

    isLeaf = True

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def render_GET(self, request):
        request.setHeader(b"content-length", b"%d" % self.size)
        zeros = _Zeros(request, self.size)
        zeros.done.addCallback(lambda _: request.finish())
        zeros.start()
        return NOT_DONE_YET


class CountingBackend(Protocol):
    """
    A raw HTTP server that counts a Content-Length body without keeping it
    and answers with the count.
    """

    def connectionMade(self) -> None:
        self.head = b""
        self.left = None
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        if self.left is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")][0]
            self.left = length
        self.count += len(data)
        self.left -= len(data)
        if self.left <= 0:
            body = b"%d" % self.count
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))


class UpgradeBackend(Protocol):
    """
    Answers an upgrade request with 101, then echoes every byte upper-cased.
    """

    def connectionMade(self) -> None:
        self.head = b""
        self.tunnel = False

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel:
            self.transport.write(data.upper())
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.factory.heads.append(self.head)
            self.tunnel = True
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\nhello-"
            )


class RawClient(Protocol):
    """
    A client that writes raw bytes and reads responses with h11.
    """

    def __init__(self) -> None:
        self.h11 = h11.Connection(h11.CLIENT)
        self.events: list = []
        self.waiting: list[Deferred] = []
        self.raw = b""
        self.lost: Deferred = Deferred()
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        if not getattr(self, "discard", False):
            self.raw += data
        self.h11.receive_data(data)
        self._pump()

    def connectionLost(self, reason=None) -> None:
        if self.h11.their_state is not h11.CLOSED:
            try:
                self.h11.receive_data(b"")
            except h11.RemoteProtocolError:
                pass
        self._pump()
        self.lost.callback(None)

    def _pump(self) -> None:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                return
            if event in (h11.NEED_DATA, h11.PAUSED):
                return
            if isinstance(event, h11.Data):
                self.received += len(event.data)
                if len(self.events) and getattr(self, "discard", False):
                    continue
            self.events.append(event)
            if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                waiting, self.waiting = self.waiting, []
                for d in waiting:
                    d.callback(None)
            if isinstance(event, h11.ConnectionClosed):
                return

    async def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """
        The next complete response: status, headers, body.
        """
        while not any(isinstance(e, (h11.EndOfMessage, h11.ConnectionClosed))
                      for e in self.events):
            d: Deferred = Deferred()
            self.waiting.append(d)
            await d
        events = []
        while self.events:
            e = self.events.pop(0)
            events.append(e)
            if isinstance(e, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        head = next(e for e in events if isinstance(e, h11.Response))
        body = b"".join(e.data for e in events if isinstance(e, h11.Data))
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self._pump()
        return head.status_code, dict(head.headers), body

    def request(self, method: bytes, target: bytes, headers=(), body: bytes = b"") -> None:
        """
        Send one request through h11.
        """
        headers = [(b"host", b"gate.example")] + list(headers)
        if body:
            headers.append((b"content-length", b"%d" % len(body)))
        data = self.h11.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        self.transport.write(data)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class _Integration(TestCase):
    """
    Real sockets on 127.0.0.1.
    """

    timeout = 60
    #: Whether the gate listens with its own factory, unwrapped, so its
    #: client connections are Twisted's plain TCP transports (the gate
    #: writes on those at once, L{haikutx.net.sending}).
    plain_listener = False

    def listen(self, factory) -> int:
        wrapped = WrappingFactory(factory)
        port = reactor.listenTCP(0, wrapped, interface="127.0.0.1")

        async def close() -> None:
            await port.stopListening()
            for protocol in list(wrapped.protocols):
                protocol.transport.loseConnection()
            for _ in range(200):
                if not wrapped.protocols:
                    break
                await deferLater(reactor, 0.01)

        self.addCleanup(lambda: Deferred.fromCoroutine(close()))
        return port.getHost().port

    def backend(self, tag: str = "a") -> int:
        return self.listen(Site(Echo(tag)))

    def gate(self, **kwargs) -> tuple[GateService, int]:
        kwargs.setdefault("install_sighup", False)
        gate = GateService(reactor, **kwargs)
        gate.startService()
        self.addCleanup(gate.stopService)
        if self.plain_listener:
            port = reactor.listenTCP(0, gate.factory, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            return gate, port.getHost().port
        return gate, self.listen(gate.factory)

    async def client(self, port: int) -> RawClient:
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(RawClient)
        )
        self.addCleanup(self.close_client, client)
        return client

    def close_client(self, client: RawClient) -> Deferred:
        client.transport.loseConnection()
        return client.lost

    async def get(self, port: int, target: bytes, method=b"GET", headers=(), body=b""):
        client = await self.client(port)
        client.request(method, target, headers, body)
        return await client.response()


# --- unit tests ----------------------------------------------------------------


class RouteTests(SynchronousTestCase):
    """
    L{route} applies httpGate's routing rules.
    """

    names = NamesFile(
        (
            NamesEntry("app", 8080, command=("x",)),
            NamesEntry("old", 0, redirect="https://example.invalid/"),
            NamesEntry("@", 9000),
        )
    )

    def test_port(self) -> None:
        """
        C{/<port>/<rest>} goes to that port with C{/<rest>} and the query.
        """
        r = route(b"/8081/a/b?x=1", NamesFile())
        self.assertEqual((r.port, r.target, r.status), (8081, b"/a/b?x=1", 0))
        self.assertEqual(route(b"/8081", NamesFile()).target, b"/")
        self.assertEqual(route(b"/8081?q", NamesFile()).target, b"/?q")

    def test_port_range(self) -> None:
        """
        Ports outside 1024-65535 are refused with 403.
        """
        for port in (b"0", b"80", b"1023", b"65536", b"99999"):
            self.assertEqual(route(b"/" + port + b"/x", NamesFile()).status, 403)
        self.assertEqual(route(b"/1024/", NamesFile()).port, 1024)
        self.assertEqual(route(b"/65535/", NamesFile()).port, 65535)

    def test_names(self) -> None:
        """
        A name routes to its port; port 0 redirects with 301; any other path
        goes, unchanged, to the default application.
        """
        r = route(b"/app/x", self.names)
        self.assertEqual((r.port, r.target, r.app.name), (8080, b"/x", "app"))
        r = route(b"/old/x", self.names)
        self.assertEqual((r.status, r.location), (301, "https://example.invalid/"))
        r = route(b"/other/x", self.names)
        self.assertEqual((r.port, r.target, r.app.name), (9000, b"/other/x", "@"))
        self.assertEqual(route(b"/other/x", NamesFile()).status, 404)

    def test_single_target(self) -> None:
        """
        With C{--gate-target} every request goes to that port unchanged.
        """
        r = route(b"/8081/x", self.names, 7000)
        self.assertEqual((r.port, r.target), (7000, b"/8081/x"))
        self.assertEqual(route(b"http://x/", NamesFile()).status, 400)


class ForwardedHeadTests(SynchronousTestCase):
    """
    L{forwarded_head}: the head an application gets, with and without the
    hop-by-hop fields it must lose.
    """

    def forwarded(self, head: bytes) -> list[bytes]:
        return forwarded_head(
            parse_request_head(head), b"/x", 8081, b"127.0.0.1", False, b"g:1", False
        ).split(b"\r\n")

    def test_plain(self) -> None:
        """
        Without hop-by-hop fields every field goes on, in order, but the
        client's identity claims, which the gate's own replace.
        """
        lines = self.forwarded(
            b"GET /8081/x HTTP/1.1\r\nHost: h\r\nX-Real-IP: 6.6.6.6\r\nA: 1\r\n"
            b"Forwarded: for=6.6.6.6\r\nB: 2\r\n\r\n"
        )
        self.assertEqual(lines, [
            b"GET /x HTTP/1.1", b"host: h", b"a: 1", b"b: 2", b"x-forwarded-for: 127.0.0.1",
            b"x-forwarded-proto: http", b"x-forwarded-host: h", b"", b"",
        ])

    def test_chunked(self) -> None:
        """
        A chunked request (no other hop-by-hop field) goes on with one
        C{Transfer-Encoding}, the gate's.
        """
        lines = self.forwarded(
            b"POST /8081/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.assertEqual([x for x in lines if x.startswith(b"transfer-encoding")],
                         [b"transfer-encoding: chunked"])

    def test_connection_named(self) -> None:
        """
        C{Connection}, the fields it names and the other hop-by-hop fields
        are dropped.
        """
        lines = self.forwarded(
            b"GET /8081/x HTTP/1.1\r\nHost: h\r\nConnection: x-a\r\nX-A: 1\r\n"
            b"Keep-Alive: 5\r\nX-B: 2\r\n\r\n"
        )
        self.assertEqual(lines[:3], [b"GET /x HTTP/1.1", b"host: h", b"x-b: 2"])
        self.assertNotIn(b"x-a: 1", lines)


class IdleTests(SynchronousTestCase):
    """
    A gate connection idle for C{idle} seconds is closed.
    """

    def test_idle_closed(self) -> None:
        """
        The connection is closed after C{idle} seconds without traffic, and
        traffic postpones it.
        """
        clock = Clock()
        gate = GateService(clock, idle=420.0, install_sighup=False)
        protocol = gate.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        clock.advance(400)
        protocol.dataReceived(b"GET /8080/ HT")
        clock.advance(419)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_head_too_large(self) -> None:
        """
        A request head larger than 16 KiB is refused with 431 and the
        connection closed.
        """
        gate = GateService(Clock(), install_sighup=False)
        protocol = gate.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /8080/ HTTP/1.1\r\nX: " + b"a" * 17000)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))
        self.assertTrue(transport.disconnecting)


class _FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _ProcessClock(Clock):
    """
    A Clock that also records spawned processes: the retirement timer is
    Clock-driven, and a Clock cannot run processes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list = []

    def spawnProcess(self, protocol, executable, args, **kwargs):
        process = _FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, executable, args, kwargs))
        protocol.makeConnection(process)
        return process


class RetireTests(SynchronousTestCase):
    """
    An application the gate started is stopped after C{retire} idle seconds.
    """

    def test_retire(self) -> None:
        """
        Requests keep the application alive; after C{retire} seconds without
        one it gets TERM, then KILL after C{kill_time}.
        """
        from twisted.internet.error import ProcessDone
        from twisted.python.failure import Failure

        clock = _ProcessClock()
        entry = NamesEntry("app", 8080, command=(sys.executable, "-V"))
        app = Application(entry, clock, retire=600.0, kill_time=5.0)
        app._spawn()
        process = app.process
        self.assertEqual(clock.spawned[0][2], [sys.executable, "-V"])
        app.request_started()
        clock.advance(1000)
        self.assertEqual(process.signals, [])
        app.request_finished()
        clock.advance(599)
        self.assertEqual(process.signals, [])
        app.request_started()
        app.request_finished()
        clock.advance(599)
        self.assertEqual(process.signals, [])
        clock.advance(1)
        self.assertEqual(process.signals, ["TERM"])
        clock.advance(5)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        app._protocol.processEnded(Failure(ProcessDone(0)))
        self.assertFalse(app.running)
        self.assertEqual(clock.getDelayedCalls(), [])


# --- integration tests -------------------------------------------------------


class ForwardingTests(_Integration):
    """
    The gate forwards C{/<port>/<rest>} to real backends.
    """

    async def test_forward(self) -> None:
        """
        A GET reaches the backend as C{/<rest>} with X-Forwarded-For, -Proto
        and -Host set; client-sent X-Forwarded-For is replaced.
        """
        backend = self.backend()
        _, gate = self.gate()
        status, headers, body = await self.get(
            gate, b"/%d/a/b?q=1" % backend, headers=[(b"x-forwarded-for", b"6.6.6.6")]
        )
        info = json.loads(body)
        self.assertEqual(status, 200)
        self.assertEqual(info["uri"], "/a/b?q=1")
        self.assertEqual(info["headers"]["x-forwarded-for"], "127.0.0.1")
        self.assertEqual(info["headers"]["x-forwarded-proto"], "http")
        self.assertEqual(info["headers"]["x-forwarded-host"], "gate.example")
        self.assertEqual(info["headers"]["host"], "gate.example")

    async def test_post_chunked(self) -> None:
        """
        A chunked POST body reaches the backend whole.
        """
        backend = self.backend()
        _, gate = self.gate()
        client = await self.client(gate)
        client.transport.write(
            b"POST /%d/p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n" % backend
        )
        client.h11.send(h11.Request(method=b"POST", target=b"/", headers=[
            (b"host", b"h"), (b"transfer-encoding", b"chunked")]))
        client.h11.send(h11.EndOfMessage())
        status, _, body = await client.response()
        info = json.loads(body)
        self.assertEqual((status, info["method"], info["body"]), (200, "POST", "abcdefg"))

    async def test_keep_alive_routes_each_request(self) -> None:
        """
        Two requests on one kept-alive connection go to two different
        ports, each routed by its own path.
        """
        a, b = self.backend("a"), self.backend("b")
        _, gate = self.gate()
        client = await self.client(gate)
        client.request(b"GET", b"/%d/first" % a)
        status1, _, body1 = await client.response()
        client.request(b"GET", b"/%d/second" % b)
        status2, _, body2 = await client.response()
        client.request(b"GET", b"/%d/third" % a)
        status3, _, body3 = await client.response()
        got = [(json.loads(x)["tag"], json.loads(x)["uri"]) for x in (body1, body2, body3)]
        self.assertEqual(got, [("a", "/first"), ("b", "/second"), ("a", "/third")])
        self.assertEqual((status1, status2, status3), (200, 200, 200))
        self.assertFalse(client.lost.called)

    async def test_pipelined(self) -> None:
        """
        Pipelined requests are answered in order, each routed by its path.
        """
        a, b = self.backend("a"), self.backend("b")
        _, gate = self.gate()
        client = await self.client(gate)
        client.transport.write(
            b"GET /%d/1 HTTP/1.1\r\nHost: h\r\n\r\nGET /%d/2 HTTP/1.1\r\nHost: h\r\n\r\n"
            % (a, b)
        )
        client.h11.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"h")]))
        client.h11.send(h11.EndOfMessage())
        _, _, body1 = await client.response()
        client.h11.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"h")]))
        client.h11.send(h11.EndOfMessage())
        _, _, body2 = await client.response()
        self.assertEqual(json.loads(body1)["uri"], "/1")
        self.assertEqual((json.loads(body2)["tag"], json.loads(body2)["uri"]), ("b", "/2"))

    async def test_http10_backend(self) -> None:
        """
        A close-delimited HTTP/1.0 response is re-chunked, so the client's
        connection stays usable.
        """

        class OldServer(Protocol):
            def dataReceived(self, data):
                self.transport.write(b"HTTP/1.0 200 OK\r\n\r\nold body")
                self.transport.loseConnection()

        old = self.listen(Factory.forProtocol(OldServer))
        new = self.backend("new")
        _, gate = self.gate()
        client = await self.client(gate)
        client.request(b"GET", b"/%d/" % old)
        status, headers, body = await client.response()
        self.assertEqual((status, body), (200, b"old body"))
        client.request(b"GET", b"/%d/x" % new)
        _, _, body = await client.response()
        self.assertEqual(json.loads(body)["tag"], "new")

    async def test_low_port_refused(self) -> None:
        """
        Ports below 1024 are refused with 403.
        """
        _, gate = self.gate()
        status, _, body = await self.get(gate, b"/80/x")
        self.assertEqual(status, 403)
        self.assertIn(b"1024-65535", body)

    async def test_methods(self) -> None:
        """
        Methods other than GET and POST are refused with 405 and an Allow
        header; C{--gate-methods} widens the list.
        """
        backend = self.backend()
        _, gate = self.gate()
        status, headers, _ = await self.get(gate, b"/%d/" % backend, method=b"PUT")
        self.assertEqual((status, headers[b"allow"]), (405, b"GET, POST"))
        _, wide = self.gate(methods=("GET", "POST", "PUT"))
        status, _, body = await self.get(wide, b"/%d/" % backend, method=b"PUT",
                                         body=b"x")
        self.assertEqual((status, json.loads(body)["method"]), (200, "PUT"))

    async def test_head_too_large(self) -> None:
        """
        An oversized request head gets 431 over a real socket.
        """
        _, gate = self.gate()
        status, _, _ = await self.get(gate, b"/8080/", headers=[(b"x-big", b"a" * 20000)])
        self.assertEqual(status, 431)

    async def test_gate_target(self) -> None:
        """
        With a single target every path goes there unchanged.
        """
        backend = self.backend()
        _, gate = self.gate(target=backend)
        _, _, body = await self.get(gate, b"/8080/x?y")
        self.assertEqual(json.loads(body)["uri"], "/8080/x?y")

    async def test_unreachable(self) -> None:
        """
        A port nothing listens on gets 502.
        """
        _, gate = self.gate()
        status, _, _ = await self.get(gate, b"/%d/" % _free_port())
        self.assertEqual(status, 502)

    async def test_upgrade_tunnel(self) -> None:
        """
        After a 101 the connection is a raw tunnel both ways.
        """
        factory = Factory.forProtocol(UpgradeBackend)
        factory.heads = []
        backend = self.listen(factory)
        _, gate = self.gate()
        client = await self.client(gate)
        client.transport.write(
            b"GET /%d/ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n" % backend
        )
        while b"hello-" not in client.raw:
            await deferLater(reactor, 0.01)
        client.transport.write(b"ping")
        while b"PING" not in client.raw:
            await deferLater(reactor, 0.01)
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 101 "))
        self.assertTrue(client.raw.endswith(b"hello-PING"))
        head = factory.heads[0].lower()
        self.assertIn(b"get /ws http/1.1", head)
        self.assertIn(b"upgrade: websocket", head)
        self.assertIn(b"connection: upgrade", head)

    async def test_https_listener(self) -> None:
        """
        An C{ssl:} listener terminates TLS and sets X-Forwarded-Proto https.
        """
        backend = self.backend()
        gate = GateService(
            reactor, listeners=(f"ssl:0:interface=127.0.0.1:privateKey={SERVER_PEM}",),
            install_sighup=False,
        )
        gate.startService()
        self.addCleanup(gate.stopService)
        listening = await list(gate)[0]._waitingForPort
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", listening.getHost().port,
                                      CertificateOptions())
        client = await endpoint.connect(Factory.forProtocol(RawClient))
        self.addCleanup(self.close_client, client)
        client.request(b"GET", b"/%d/tls" % backend)
        status, _, body = await client.response()
        info = json.loads(body)
        self.assertEqual((status, info["uri"]), (200, "/tls"))
        self.assertEqual(info["headers"]["x-forwarded-proto"], "https")


def _buffered(gate: GateService) -> int:
    """
    Bytes held right now by the gate's connections: their own buffers and
    both transports' write buffers.
    """
    total = 0
    for connection in gate.factory.connections:
        total += len(connection.buffer) + connection.side.response.buffered
        for transport in (connection.transport,
                          connection.side.backend.transport if connection.side.backend else None):
            if transport is not None:
                total += len(transport.dataBuffer) + transport._tempDataLen
    return total


class StreamingTests(_Integration):
    """
    Bodies stream through the gate with bounded memory.
    """

    size = 64 * 1024 * 1024
    bound = 2 * 1024 * 1024

    def sample(self, gate: GateService) -> list[int]:
        samples = [0]

        def tick() -> None:
            samples.append(_buffered(gate))
            self.call = reactor.callLater(0.005, tick)

        tick()
        self.addCleanup(lambda: self.call.cancel() if self.call.active() else None)
        return samples

    async def test_download(self) -> None:
        """
        A 64 MiB response passes while the gate never holds more than 2 MiB
        and the process's peak memory grows by less than the body.
        """
        backend = self.listen(Site(BigDownload(self.size)))
        gate_service, gate = self.gate()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        samples = self.sample(gate_service)
        client = await self.client(gate)
        client.discard = True
        client.request(b"GET", b"/%d/big" % backend)
        status, headers, _ = await client.response()
        self.assertEqual((status, client.received), (200, self.size))
        self.assertLess(max(samples), self.bound)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
        self.assertLess(grown * 1024, self.size // 2)

    async def test_upload(self) -> None:
        """
        A 64 MiB request body passes while the gate never holds more than
        2 MiB.
        """
        backend = self.listen(Factory.forProtocol(CountingBackend))
        gate_service, gate = self.gate()
        samples = self.sample(gate_service)
        client = await self.client(gate)
        client.transport.write(
            b"POST /%d/up HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n"
            % (backend, self.size)
        )
        client.h11.send(h11.Request(method=b"POST", target=b"/", headers=[
            (b"host", b"h"), (b"transfer-encoding", b"chunked")]))
        client.h11.send(h11.EndOfMessage())
        zeros = _Zeros(client.transport, self.size)
        zeros.start()
        await zeros.done
        status, _, body = await client.response()
        self.assertEqual((status, int(body)), (200, self.size))
        self.assertLess(max(samples), self.bound)


class PlainStreamingTests(StreamingTests):
    """
    The same with the gate's client connections on Twisted's plain TCP
    transports, which the gate writes on at once: the client's flow
    control (a paused consumer, partial sends) still bounds what it holds.
    """

    plain_listener = True


class NoDelayTests(_Integration):
    """
    The gate's connections do not wait to coalesce small writes.
    """

    plain_listener = True

    async def test_no_delay(self) -> None:
        """
        Both the client connection and the application connection have
        C{TCP_NODELAY} set, so a streamed response's parts are not held
        back waiting for the peer's delayed acknowledgement.
        """
        backend = self.backend()
        gate_service, gate = self.gate()
        client = await self.client(gate)
        client.request(b"GET", b"/%d/" % backend)
        status, _, _ = await client.response()
        self.assertEqual(status, 200)
        [connection] = gate_service.factory.connections
        for transport in (connection.transport, connection.side.backend.transport):
            self.assertTrue(
                transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            )


class NamesTests(_Integration):
    """
    Names-file applications: forwarding, redirects, C{void}, on-demand
    start, supervision and reload.
    """

    def names_file(self, text: str) -> Path:
        path = Path(self.mktemp())
        path.write_text(text)
        return path

    async def test_names_and_redirect(self) -> None:
        """
        C{/<name>/} goes to the application's port; C{@} takes other paths;
        port 0 answers 301 with the URL.
        """
        a, b = self.backend("a"), self.backend("default")
        path = self.names_file(
            f"app {a}\n@ {b}\nold 0 https://example.invalid/new\n"
        )
        _, gate = self.gate(names_path=path)
        _, _, body = await self.get(gate, b"/app/x")
        self.assertEqual((json.loads(body)["tag"], json.loads(body)["uri"]), ("a", "/x"))
        _, _, body = await self.get(gate, b"/else/y")
        self.assertEqual(json.loads(body)["uri"], "/else/y")
        status, headers, _ = await self.get(gate, b"/old/z")
        self.assertEqual((status, headers[b"location"]), (301, b"https://example.invalid/new"))

    async def test_void(self) -> None:
        """
        An unreachable application with a C{void} file in its directory is
        answered 503 text/html with that file; without one, 502.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "void").write_bytes(b"<h1>down</h1>")
        path = self.names_file(
            f"app {_free_port()} ^ {directory} ^ /nonexistent/command\n"
            f"bare {_free_port()}\n"
        )
        _, gate = self.gate(names_path=path)
        status, headers, body = await self.get(gate, b"/app/")
        self.assertEqual((status, headers[b"content-type"], body),
                         (503, b"text/html", b"<h1>down</h1>"))
        status, _, _ = await self.get(gate, b"/bare/")
        self.assertEqual(status, 502)

    async def test_on_demand_start(self) -> None:
        """
        Concurrent first requests for a stopped application start its
        command once, in its directory, output appended to its log; a crash
        is logged and the next request starts it again; stopping the gate
        stops it. The readiness probe leaves no traceback in the log.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        (directory / "hello.txt").write_text("hello from dir")
        log = directory / "app.log"
        log.write_text("previous line\n")
        port = _free_port()
        path = self.names_file(
            f"app {port} ^ {directory} app.log {sys.executable} -u -m http.server "
            f"{port} --bind 127.0.0.1\n"
        )
        gate_service, gate = self.gate(names_path=path, retire=None)
        results = await DeferredList(
            [Deferred.fromCoroutine(self.get(gate, b"/app/hello.txt")) for _ in range(3)]
        )
        self.assertEqual([r[1][0] for r in results], [200] * 3)
        self.assertEqual(results[0][1][2], b"hello from dir")
        started = [e for e in events if "started pid" in e.get("log_format", "")]
        self.assertEqual(len(started), 1)
        self.assertEqual((started[0]["app"], started[0]["port"]), ("app", port))
        app = gate_service.applications["app"]
        first_pid = app.process.pid

        os.kill(first_pid, signal.SIGKILL)
        while app.running:
            await deferLater(reactor, 0.02)
        crashed = [e for e in events if "exited unexpectedly" in e.get("log_format", "")]
        self.assertEqual(len(crashed), 1)
        status, _, _ = await self.get(gate, b"/app/hello.txt")
        self.assertEqual(status, 200)
        self.assertNotEqual(app.process.pid, first_pid)
        self.assertTrue(log.read_text().startswith("previous line\n"))
        self.assertIn("GET /hello.txt", log.read_text())

        second = app.process
        await gate_service.stopService()
        self.assertFalse(app.running)
        self.assertIsNotNone(second.status)
        # The readiness probe closes cleanly: no reset for the application
        # to log as a traceback.
        self.assertNotIn("Traceback", log.read_text())
        self.assertNotIn("ConnectionResetError", log.read_text())

    async def test_start_timeout(self) -> None:
        """
        An application whose port never opens is waited for only
        C{start_timeout} seconds, then answered 502.
        """
        port = _free_port()
        path = self.names_file(
            f"slow {port} ^ ^ ^ {sys.executable} -c __import__('time').sleep(30)\n"
        )
        gate_service, gate = self.gate(names_path=path, start_timeout=0.5)
        start = reactor.seconds()
        status, _, body = await self.get(gate, b"/slow/")
        self.assertEqual(status, 502)
        self.assertLess(reactor.seconds() - start, 5)
        self.assertTrue(gate_service.applications["slow"].running)

    async def test_runs_as_user(self) -> None:
        """
        The command runs as the entry's user, with its log owned by it.
        """
        if os.geteuid() != 0:
            raise SkipTest("switching users needs root")
        import pwd

        nobody = pwd.getpwnam("nobody")
        # sys.executable may live where nobody cannot reach (/root/...).
        python = "/usr/bin/python3"
        if not os.path.exists(python):
            raise SkipTest("needs a system /usr/bin/python3 that nobody can run")
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        directory.chmod(0o755)
        port = _free_port()
        path = self.names_file(
            f"app {port} nobody {directory} app.log {python} -m http.server "
            f"{port} --bind 127.0.0.1\n"
        )
        gate_service, gate = self.gate(names_path=path)
        _, headers, _ = await self.get(gate, b"/app/")
        self.assertTrue(headers[b"server"].startswith(b"SimpleHTTP"))
        pid = gate_service.applications["app"].process.pid
        uids = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("Uid:")][0].split()[1:]
        self.assertEqual(set(map(int, uids)), {nobody.pw_uid})
        self.assertEqual((directory / "app.log").stat().st_uid, nobody.pw_uid)

    async def test_reload_same_head(self) -> None:
        """
        The same request head again on a kept-alive connection goes where
        the names file in force says, after a reload too.
        """
        a, b = self.backend("a"), self.backend("b")
        path = self.names_file(f"app {a}\n")
        gate_service, gate = self.gate(names_path=path)
        client = await self.client(gate)
        tags = []
        for text in (None, f"app {b}\n", None):
            if text is not None:
                path.write_text(text)
                self.assertTrue(gate_service.reload())
            client.request(b"GET", b"/app/x")
            _, _, body = await client.response()
            tags.append(json.loads(body)["tag"])
        self.assertEqual(tags, ["a", "b", "b"])
        self.assertFalse(client.lost.called)

    async def test_sighup_reload(self) -> None:
        """
        SIGHUP reloads the names file; a bad new file keeps the old one and
        logs why; stopping the gate restores the previous handler.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        a, b = self.backend("a"), self.backend("b")
        path = self.names_file(f"app {a}\n")
        before = signal.getsignal(signal.SIGHUP)
        gate_service, gate = self.gate(names_path=path, install_sighup=True)
        _, _, body = await self.get(gate, b"/app/")
        self.assertEqual(json.loads(body)["tag"], "a")
        path.write_text(f"app {b}\n")
        os.kill(os.getpid(), signal.SIGHUP)
        while gate_service.names.get("app").port != b:
            await deferLater(reactor, 0.01)
        _, _, body = await self.get(gate, b"/app/")
        self.assertEqual(json.loads(body)["tag"], "b")
        path.write_text("app notaport\n")
        os.kill(os.getpid(), signal.SIGHUP)
        while not [e for e in events if "not reloaded" in e.get("log_format", "")]:
            await deferLater(reactor, 0.01)
        self.assertEqual(gate_service.names.get("app").port, b)
        failed = [e for e in events if "not reloaded" in e.get("log_format", "")]
        self.assertIn("line 1", failed[0]["reason"])
        await gate_service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)


class WiringTests(_Integration):
    """
    The gate is composed from the command line.
    """

    async def test_build_service(self) -> None:
        """
        C{--gate} listeners become a child named C{gate} that forwards.
        """
        backend = self.backend()
        config = Config(gates=("tcp:0:interface=127.0.0.1",), idle=60.0)
        top = build_service(reactor, config)
        gate = IServiceCollection(top).getServiceNamed("gate")
        self.assertEqual(gate.idle, 60.0)
        gate.install_sighup = False
        top.startService()
        self.addCleanup(top.stopService)
        listening = await list(gate)[0]._waitingForPort
        _, _, body = await self.get(listening.getHost().port, b"/%d/w" % backend)
        self.assertEqual(json.loads(body)["uri"], "/w")

    def test_bad_names_stops_startup(self) -> None:
        """
        A names file that does not parse stops start-up with one line naming
        C{--names} and the bad line.
        """
        path = Path(self.mktemp())
        path.write_text("# ok\napp 80 x\n")
        options = Options()
        with self.assertRaises(UsageError) as caught:
            options.parseOptions(["--names", str(path)])
        message = str(caught.exception)
        self.assertTrue(message.startswith("--names: "))
        self.assertIn("line 2", message)
        self.assertNotIn("\n", message)


# --- strict HTTP/1.1, client identity, TLS, loopback-only pages ---------------


class RecordingBackend(Protocol):
    """
    Records every byte it receives in C{factory.received} and never answers.
    """

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.factory.received.append(b"")
        self.index = len(self.factory.received) - 1

    def dataReceived(self, data: bytes) -> None:
        self.factory.received[self.index] += data

    def connectionLost(self, reason=None) -> None:
        self.factory.lost += 1


class _Recorder(Factory):
    protocol = RecordingBackend

    def __init__(self) -> None:
        self.connections = 0
        self.lost = 0
        self.received: list[bytes] = []


class _Collect(Protocol):
    """
    Writes C{data}, collects every byte until the connection closes.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.got = b""
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.got += data

    def connectionLost(self, reason=None) -> None:
        self.done.callback(self.got)


async def _exchange(port: int, data: bytes) -> bytes:
    """
    Send C{data} on a new connection and return all that comes back.
    """
    protocol = _Collect(data)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        Factory.forProtocol(lambda: protocol)
    )
    return await protocol.done


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


class StrictTests(_Integration):
    """
    What RFC 9112 does not allow is answered 400 and never forwarded.
    """

    def recorder(self) -> tuple[_Recorder, int]:
        factory = _Recorder()
        return factory, self.listen(factory)

    async def test_bad_heads(self) -> None:
        """
        Each malformed head (bare CR or LF, obs-fold, repeated or conflicting
        Content-Length, Transfer-Encoding with Content-Length, ...) is
        answered 400 (501 for an unknown coding) and the application gets
        no connection.
        """
        from haikutx.test.test_http1 import BAD_REQUESTS

        recorder, port = self.recorder()
        _, gate = self.gate()
        cases = dict(BAD_REQUESTS)
        cases["unknown coding"] = (
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n"
        )
        for name, raw in cases.items():
            raw = raw.replace(b" /", b" /%d/" % port, 1)
            answer = await _exchange(gate, raw)
            expected = 501 if name == "unknown coding" else 400
            self.assertEqual(_status(answer), expected, (name, answer[:200]))
        self.assertEqual((recorder.connections, recorder.received), (0, []))

    async def test_bad_chunks(self) -> None:
        """
        A malformed chunked body that comes with its head (C{0x5}, signs,
        spaces, overflow, bare LF, bad trailers) is answered 400 before the
        application is connected to.
        """
        from haikutx.test.test_http1 import BAD_CHUNKS

        recorder, port = self.recorder()
        _, gate = self.gate(methods=("POST",))
        head = b"POST /%d/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" % port
        for name, body in BAD_CHUNKS.items():
            answer = await _exchange(gate, head + body)
            self.assertEqual(_status(answer), 400, (name, answer[:200]))
        self.assertEqual((recorder.connections, recorder.received), (0, []))

    async def test_bad_chunk_later(self) -> None:
        """
        A malformed chunk that comes after the request was forwarded is not
        forwarded: the application's connection is aborted and the client
        gets 400.
        """
        recorder, port = self.recorder()
        _, gate = self.gate(methods=("POST",))
        protocol = _Collect(
            b"POST /%d/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n" % port
        )
        await TCP4ClientEndpoint(reactor, "127.0.0.1", gate).connect(
            Factory.forProtocol(lambda: protocol)
        )
        for _ in range(500):
            if recorder.received and recorder.received[0].endswith(b"hello\r\n"):
                break
            await deferLater(reactor, 0.01)
        protocol.transport.write(b"0x5\r\nworld\r\n0\r\n\r\n")
        answer = await protocol.done
        self.assertEqual(_status(answer), 400)
        for _ in range(500):
            if recorder.lost:
                break
            await deferLater(reactor, 0.01)
        self.assertEqual(recorder.lost, 1)
        self.assertTrue(recorder.received[0].endswith(b"\r\n\r\n5\r\nhello\r\n"))


class IdentityTests(_Integration):
    """
    The gate says who the client is; the client cannot.
    """

    async def test_client_claims_replaced(self) -> None:
        """
        A client's Forwarded and X-Real-IP are dropped and its
        X-Forwarded-For, -Proto and -Host replaced.
        """
        backend = self.backend()
        _, gate = self.gate()
        _, _, body = await self.get(gate, b"/%d/" % backend, headers=[
            (b"forwarded", b"for=6.6.6.6;proto=https"),
            (b"x-real-ip", b"6.6.6.6"),
            (b"x-forwarded-for", b"6.6.6.6"),
            (b"x-forwarded-proto", b"https"),
            (b"x-forwarded-host", b"evil.example"),
        ])
        headers = json.loads(body)["headers"]
        self.assertNotIn("forwarded", headers)
        self.assertNotIn("x-real-ip", headers)
        self.assertEqual(
            (headers["x-forwarded-for"], headers["x-forwarded-proto"],
             headers["x-forwarded-host"]),
            ("127.0.0.1", "http", "gate.example"),
        )

    async def test_http10_without_host(self) -> None:
        """
        An HTTP/1.0 request without Host still gets X-Forwarded-Host: the
        gate's own address.
        """
        backend = self.backend()
        _, gate = self.gate()
        answer = await _exchange(gate, b"GET /%d/ HTTP/1.0\r\n\r\n" % backend)
        headers = json.loads(answer.partition(b"\r\n\r\n")[2])["headers"]
        self.assertEqual(headers["x-forwarded-host"], f"127.0.0.1:{gate}")
        self.assertEqual(headers["x-forwarded-for"], "127.0.0.1")

    async def test_counted(self) -> None:
        """
        Forwarded and refused requests are counted in
        C{haiku_gate_requests_total} by application and status; a port
        counts as an application only once one answered on it.
        """
        from haikutx.metrics import REGISTRY

        def value(app: str, status: str) -> float:
            return REGISTRY.get_sample_value(
                "haiku_gate_requests_total", {"app": app, "status": status}) or 0.0

        backend = self.backend()
        _, gate = self.gate()
        closed = _free_port()
        before = value(str(backend), "200"), value("-", "404"), value("-", "502")
        await self.get(gate, b"/%d/" % backend)
        await self.get(gate, b"/nosuchapp/")
        await self.get(gate, b"/%d/" % closed)
        self.assertEqual(
            (value(str(backend), "200"), value("-", "404"), value("-", "502")),
            (before[0] + 1, before[1] + 1, before[2] + 1),
        )
        # A port nothing answered on gets no label of its own.
        self.assertEqual(value(str(closed), "502"), 0.0)


class LoopbackOnlyTests(_Integration):
    """
    Pages shown to loopback clients only are not shown through the gate.
    """

    async def test_status_and_metrics_refused(self) -> None:
        """
        C{/<runtime port>/_haiku/status} and a metrics page through the gate
        are refused with 403, though the gate connects from 127.0.0.1; the
        same pages asked directly answer 200.
        """
        from haikutx.metrics import MetricsResource
        from haikutx.runtime.site import RuntimeSite
        from haikutx.service import build_runtime

        pool, root, fetcher = build_runtime(
            reactor, Config(http=None, https=None, workers=1, handlers=Path(self.mktemp()))
        )
        self.addCleanup(fetcher.close)
        runtime = self.listen(RuntimeSite(root, reactor=reactor))
        metrics_root = Resource()
        metrics_root.putChild(b"metrics", MetricsResource())
        metrics = self.listen(Site(metrics_root))
        _, gate = self.gate()
        for port, path in ((runtime, b"/_haiku/status"), (metrics, b"/metrics")):
            direct, _, _ = await self.get(port, path)
            self.assertEqual(direct, 200)
            status, _, body = await self.get(gate, b"/%d%s" % (port, path))
            self.assertEqual(status, 403, body)


async def _curl(*args: str) -> tuple[bytes, int]:
    from twisted.internet.utils import getProcessOutputAndValue

    out, err, code = await getProcessOutputAndValue(
        "curl", ["-sSk", "--http1.1", "--max-time", "20", *args], env=os.environ
    )
    return out + err, code


class TLSTests(_Integration):
    """
    Every TLS listener of the plugin offers ALPN http/1.1, so clients that
    send ALPN (curl, browsers) connect.
    """

    def setUp(self) -> None:
        import shutil

        if shutil.which("curl") is None:
            raise SkipTest("needs curl")

    async def test_gate_alpn(self) -> None:
        """
        curl, which sends ALPN, gets an answer through a TLS gate, and
        negotiates http/1.1.
        """
        backend = self.backend()
        gate = GateService(
            reactor, listeners=(f"ssl:0:interface=127.0.0.1:privateKey={SERVER_PEM}",),
            install_sighup=False,
        )
        gate.startService()
        self.addCleanup(gate.stopService)
        port = (await list(gate)[0]._waitingForPort).getHost().port
        out, code = await _curl("-v", f"https://127.0.0.1:{port}/{backend}/alpn")
        self.assertEqual(code, 0, out)
        self.assertIn(b"ALPN: server accepted http/1.1", out)
        self.assertIn(b'"uri": "/alpn"', out)

    async def test_runtime_alpn(self) -> None:
        """
        The runtime's TLS listener (C{--sslport}) answers curl too.
        """
        from twisted.application import strports

        from haikutx.runtime.site import RuntimeSite
        from haikutx.service import build_runtime

        pool, root, fetcher = build_runtime(
            reactor, Config(http=None, https=None, workers=1, handlers=Path(self.mktemp()))
        )
        self.addCleanup(fetcher.close)
        service = strports.service(
            f"ssl:0:interface=127.0.0.1:privateKey={SERVER_PEM}",
            RuntimeSite(root, reactor=reactor), reactor=reactor,
        )
        service.startService()
        self.addCleanup(service.stopService)
        port = (await service._waitingForPort).getHost().port
        out, code = await _curl("-v", f"https://127.0.0.1:{port}/_haiku/status")
        self.assertEqual(code, 0, out)
        self.assertIn(b"ALPN: server accepted http/1.1", out)


class _CountingConnections(Factory):
    """
    A raw keep-alive backend: counts connections; the C{n}th request on a
    connection with C{n > answers} is answered by closing it unanswered (an
    application whose keep-alive timeout races the gate's next request).
    """

    def __init__(self, answers: int = 1000) -> None:
        self.connections = 0
        self.answers = answers

    def buildProtocol(self, addr):
        factory = self

        class One(Protocol):
            def connectionMade(self) -> None:
                factory.connections += 1
                self.seen = b""
                self.answered = 0

            def dataReceived(self, data: bytes) -> None:
                self.seen += data
                while b"\r\n\r\n" in self.seen:
                    _, _, self.seen = self.seen.partition(b"\r\n\r\n")
                    if self.answered >= factory.answers:
                        self.transport.loseConnection()
                        return
                    self.answered += 1
                    body = b"conn %d" % factory.connections
                    self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                         % (len(body), body))

        return One()


class PoolTests(_Integration):
    """
    Application connections are reused across client connections.
    """

    async def test_close_clients_share_a_connection(self) -> None:
        """
        Clients that each open a new connection per request
        (C{Connection: close}) are served over one application connection.
        """
        backend = _CountingConnections()
        port = self.listen(backend)
        _, gate = self.gate()
        for _ in range(5):
            answer = await _exchange(
                gate, b"GET /%d/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % port)
            self.assertEqual(_status(answer), 200)
            self.assertIn(b"connection: close", answer.lower())
        self.assertEqual(backend.connections, 1)

    async def test_retry_on_closed_connection(self) -> None:
        """
        A GET sent on a reused application connection that the application
        closes unanswered is sent again on a new connection.
        """
        backend = _CountingConnections(answers=1)
        port = self.listen(backend)
        _, gate = self.gate()
        for n in range(3):
            answer = await _exchange(
                gate, b"GET /%d/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % port)
            self.assertEqual(_status(answer), 200, answer)
            self.assertTrue(answer.endswith(b"conn %d" % (n + 1)), answer)

    async def test_no_retry_for_post(self) -> None:
        """
        A bodiless POST is not sent twice: when its reused connection closes
        unanswered, the client gets 502.
        """
        backend = _CountingConnections(answers=1)
        port = self.listen(backend)
        _, gate = self.gate(methods=("GET", "POST"))
        first = await _exchange(
            gate, b"GET /%d/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" % port)
        self.assertEqual(_status(first), 200)
        answer = await _exchange(
            gate, b"POST /%d/ HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n"
            b"Connection: close\r\n\r\n" % port)
        self.assertEqual(_status(answer), 502)
        self.assertEqual(backend.connections, 1)

    async def test_no_reuse_after_early_answer(self) -> None:
        """
        An application that answers before reading the whole request body
        does not get another request on that connection.
        """
        backend = _CountingConnections()
        port = self.listen(backend)
        gate_service, gate = self.gate(methods=("POST",))
        answer = await _exchange(
            gate, b"POST /%d/ HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\nabc" % port)
        self.assertEqual(_status(answer), 200)
        self.assertEqual(len(gate_service.factory.pool), 0)


class BackendPoolTests(SynchronousTestCase):
    """
    L{BackendPool} keeps a bounded number of idle connections.
    """

    def backend(self, port: int):
        from haikutx.gate.backends import BackendProtocol

        backend = BackendProtocol(None, port, lambda b: None)
        backend.makeConnection(StringTransport())
        return backend

    def test_bounds(self) -> None:
        """
        Beyond the bound per port and in all, connections are closed, not
        kept; what is kept is taken most recent first.
        """
        from haikutx.gate.backends import BackendPool

        pool = BackendPool(per_port=2, total=3)
        a, b, c = self.backend(1), self.backend(1), self.backend(1)
        for backend in (a, b, c):
            pool.give(backend)
        self.assertEqual(len(pool), 2)
        self.assertTrue(c.transport.disconnecting)
        d, e = self.backend(2), self.backend(2)
        pool.give(d)
        pool.give(e)
        self.assertTrue(e.transport.disconnecting)
        self.assertIs(pool.take(1), b)
        self.assertTrue(b.reused)
        self.assertIsNone(pool.take(3))

    def test_lost_and_unasked_bytes(self) -> None:
        """
        An idle connection that closes or sends unasked bytes leaves the pool.
        """
        from haikutx.gate.backends import BackendPool

        pool = BackendPool()
        a, b = self.backend(1), self.backend(1)
        pool.give(a)
        pool.give(b)
        a.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
        self.assertTrue(a.transport.disconnecting)
        b.connectionLost(None)
        self.assertEqual(len(pool), 0)
        self.assertIsNone(pool.take(1))


class QuietTests(_Integration):
    """
    The gate's outgoing connections log nothing per connection.
    """

    async def test_no_factory_lines(self) -> None:
        """
        Forwarding requests (new application connections included) logs no
        "Starting factory" lines.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        backend = self.backend()
        _, gate = self.gate()
        for _ in range(2):
            status, _, _ = await self.get(gate, b"/%d/" % backend,
                                          headers=[(b"connection", b"close")])
            self.assertEqual(status, 200)
        noisy = [e for e in events if "factory" in str(e.get("log_format", "")).lower()
                 and type(e.get("factory")).__module__.startswith("haikutx")]
        self.assertEqual(noisy, [])


class StateTests(SynchronousTestCase):
    """
    A gate connection moves only along L{TRANSITIONS}.
    """

    def test_table(self) -> None:
        """
        Every state can close; a closed connection goes nowhere else; an
        unlisted move raises.
        """
        from haikutx.gate.states import TRANSITIONS, State, check_transition

        for state in State:
            self.assertIn(State.CLOSED, TRANSITIONS[state])
        self.assertEqual(TRANSITIONS[State.CLOSED], frozenset({State.CLOSED}))
        self.assertRaises(AssertionError, check_transition, State.CLOSED, State.HEAD)
        self.assertRaises(AssertionError, check_transition, State.TUNNEL, State.HEAD)
        check_transition(State.WAITING, State.HEAD)

    def test_protocol_refuses(self) -> None:
        """
        L{GateProtocol.move} refuses a move the table does not list.
        """
        from haikutx.gate.states import State

        gate = GateService(Clock(), install_sighup=False)
        protocol = gate.factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.assertRaises(AssertionError, protocol.move, State.TUNNEL)
        self.assertIs(protocol.state, State.HEAD)


class StopTests(_Integration):
    """
    Stopping the gate closes every application connection.
    """

    async def test_kept_connection_closed(self) -> None:
        """
        An application connection kept by an open keep-alive client
        connection is closed when the gate stops, not put in the pool.
        """
        backend = _CountingConnections()
        port = self.listen(backend)
        gate_service, gate = self.gate()
        client = await self.client(gate)
        client.request(b"GET", b"/%d/" % port)
        status, _, _ = await client.response()
        self.assertEqual(status, 200)
        await gate_service.stopService()
        for _ in range(200):
            if not gate_service.factory.connections:
                break
            await deferLater(reactor, 0.01)
        self.assertEqual(len(gate_service.factory.pool), 0)
