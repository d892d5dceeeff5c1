"""
Tests for L{haikutx.runtime.egress}: the egress proxy on real sockets (the allowed
destinations are this test's own servers on 127.0.0.1, made reachable by
C{--egress-allow} entries; refusals use loopback forms only), the relay
channel with real C{SCM_RIGHTS}, and a child process in its own network
namespace that reaches the world only through the relay.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import sys
import textwrap
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IFileDescriptorReceiver, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactorClock,
    StringTransport,
)
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import FileBodyProducer, ProxyAgent, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from haikutx.net.addresses import EgressRules
from haikutx.net.outbound import ProxyRefused, TunnelEndpoint
from haikutx.runtime.egress import EgressProxyFactory
from haikutx.runtime.egress_channel import listen_channel, make_egress_channel
from haikutx.runtime.egress_request import BadRequest, parse_authority, parse_head
from haikutx.sandbox import probe
from haikutx.test.test_fetch import ScriptedResolver, _certificates

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYERS = probe()

#: The loopback forms a handler might try (SPEC 3.2), none of them allowed.
LOOPBACK_FORMS = ("localhost", "127.0.0.2", "[::1]", "0x7f000001")


class ParseTests(SynchronousTestCase):
    """
    L{parse_head} and L{parse_authority}: what a proxy request means.
    """

    def test_connect(self) -> None:
        """
        C{CONNECT host:port} names the destination and has no upstream head.
        """
        self.assertEqual(
            parse_head(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443"),
            ("CONNECT", "example.test", 443, None),
        )
        self.assertEqual(
            parse_head(b"CONNECT [::1]:8443 HTTP/1.1"), ("CONNECT", "[::1]", 8443, None)
        )

    def test_absolute_form(self) -> None:
        """
        An absolute-form request is rewritten to origin form, loses its
        proxy and hop-by-hop headers and asks the upstream to close.
        """
        method, host, port, head = parse_head(
            b"POST http://example.test:8080/a/b?c=d HTTP/1.1\r\n"
            b"Host: example.test:8080\r\nProxy-Connection: keep-alive\r\n"
            b"Proxy-Authorization: x\r\nConnection: keep-alive\r\nX-Kept: 1"
        )
        self.assertEqual((method, host, port), ("POST", "example.test", 8080))
        self.assertEqual(
            head,
            b"POST /a/b?c=d HTTP/1.1\r\nhost: example.test:8080\r\nx-kept: 1\r\n"
            b"connection: close\r\n\r\n",
        )

    def test_chunked_kept(self) -> None:
        """
        A chunked request body goes upstream chunked: the coding is said
        again although Transfer-Encoding is hop-by-hop.
        """
        _, _, _, head = parse_head(
            b"POST http://example.test/u HTTP/1.1\r\nHost: example.test\r\n"
            b"Transfer-Encoding: chunked\r\nTE: trailers"
        )
        self.assertEqual(
            head,
            b"POST /u HTTP/1.1\r\nhost: example.test\r\ntransfer-encoding: chunked\r\n"
            b"connection: close\r\n\r\n",
        )

    def test_default_port_and_host_header(self) -> None:
        """
        Port 80 is the default, and a missing C{Host} header is added.
        """
        self.assertEqual(
            parse_head(b"GET http://example.test HTTP/1.0"),
            (
                "GET",
                "example.test",
                80,
                b"GET / HTTP/1.0\r\nhost: example.test\r\nconnection: close\r\n\r\n",
            ),
        )

    def test_malformed(self) -> None:
        """
        Requests the proxy cannot serve raise L{BadRequest} with a reason.
        """
        for head, words in [
            (b"HELLO", "malformed request line"),
            (b"GET / HTTP/1.1", "not a proxy request"),
            (b"GET https://example.test/ HTTP/1.1", "CONNECT"),
            (b"CONNECT example.test HTTP/1.1", "bad host:port"),
            (b"CONNECT example.test:0 HTTP/1.1", "bad port"),
            (b"CONNECT example.test:99999 HTTP/1.1", "bad port"),
            (b"CONNECT a b:1:2 HTTP/1.1", "malformed request line"),
            (b"CONNECT [zz]:1 HTTP/1.1", "bad"),
            (b"GET http://u:p@example.test/ HTTP/1.1", "credentials"),
            (b"CONNECT example.test:1 HTTP/2.0", "malformed request line"),
            (b"CONNECT example.test:1 HTTP/1.1\r\nno colon", "malformed header"),
            (b"GET http://example.test/ HTTP/1.1\r\nX: a\nY: b", "bare CR or LF"),
            (b"GET http://example.test/ HTTP/1.1\r\nX: a\r\n folded", "obs-fold"),
            (b"POST http://example.test/ HTTP/1.1\r\nContent-Length: 1\r\n"
             b"Transfer-Encoding: chunked", "both Transfer-Encoding and Content-Length"),
            (b"POST http://example.test/ HTTP/1.1\r\nContent-Length: 1\r\n"
             b"Content-Length: 1", "more than one Content-Length"),
        ]:
            with self.subTest(head=head):
                error = self.assertRaises(BadRequest, parse_head, head)
                self.assertIn(words, error.reason)
                self.assertEqual(error.status, 400)

    @given(
        st.sampled_from(
            ["example.test", "127.0.0.2", "[::1]", "0x7f000001", "a_b.c-d"]
        ),
        st.integers(1, 65535),
    )
    def test_authority_round_trip(self, host: str, port: int) -> None:
        """
        L{parse_authority} returns the host and port a C{host:port} was
        made from.
        """
        self.assertEqual(parse_authority(f"{host}:{port}"), (host, port))

    @given(st.text(max_size=40))
    def test_authority_never_crashes(self, text: str) -> None:
        """
        L{parse_authority} either parses or raises L{BadRequest}.
        """
        try:
            host, port = parse_authority(text)
        except BadRequest:
            return
        self.assertTrue(0 < port < 65536)
        self.assertEqual(f"{host}:{port}", text)


class _Unresolved:
    """
    A resolver that never answers.
    """

    def resolveHostName(self, *args: Any, **kwargs: Any) -> None:
        return None


class ProxyUnitTests(SynchronousTestCase):
    """
    L{EgressProxy}'s limits, on a L{StringTransport} and a L{Clock}.
    """

    def proxy(self, **kwargs: Any) -> tuple[Clock, StringTransport]:
        clock = Clock()
        factory = EgressProxyFactory(
            clock, EgressRules(), resolver=_Unresolved(), **kwargs
        )
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.protocol = protocol
        return clock, transport

    def status(self, transport: StringTransport) -> bytes:
        return transport.value().split(b"\r\n", 1)[0]

    def test_head_timeout(self) -> None:
        """
        A head that does not arrive within C{head_timeout} gets 408 and the
        connection is closed.
        """
        clock, transport = self.proxy(head_timeout=5)
        self.protocol.dataReceived(b"CONNECT example.test:443 HTTP/1.1\r\n")
        clock.advance(4.9)
        self.assertEqual(transport.value(), b"")
        clock.advance(0.2)
        self.assertEqual(self.status(transport), b"HTTP/1.1 408 Request Timeout")
        self.assertTrue(transport.disconnecting)

    def test_head_too_large(self) -> None:
        """
        A head larger than C{max_head} gets 431 without waiting for its end.
        """
        clock, transport = self.proxy(max_head=100)
        self.protocol.dataReceived(b"GET http://example.test/ HTTP/1.1\r\n")
        self.protocol.dataReceived(b"X-Big: " + b"a" * 100)
        self.assertEqual(
            self.status(transport), b"HTTP/1.1 431 Request Header Fields Too Large"
        )
        self.assertTrue(transport.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_connect_timeout(self) -> None:
        """
        A destination that is not reached within C{timeout} gets 504, and
        the proxy stops reading from the client meanwhile.
        """
        clock, transport = self.proxy(timeout=3)
        self.protocol.dataReceived(b"CONNECT example.test:443 HTTP/1.1\r\n\r\n")
        self.assertEqual(transport.producerState, "paused")
        clock.advance(3)
        self.assertEqual(self.status(transport), b"HTTP/1.1 504 Gateway Timeout")
        self.assertIn(b"example.test:443 did not answer in time", transport.value())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_malformed(self) -> None:
        """
        A malformed request gets 400 with the reason as body.
        """
        clock, transport = self.proxy()
        self.protocol.dataReceived(b"HELLO\r\n\r\n")
        self.assertEqual(self.status(transport), b"HTTP/1.1 400 Bad Request")
        self.assertTrue(
            transport.value().endswith(b"\r\n\r\nmalformed request line b'HELLO'\n")
        )
        self.assertEqual(clock.getDelayedCalls(), [])


class SpliceUnitTests(SynchronousTestCase):
    """
    L{EgressProxy} once connected, on a L{MemoryReactorClock} with
    L{StringTransport}s on both sides.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        factory = EgressProxyFactory(
            self.reactor,
            EgressRules.from_pairs(["db.test:5432"]),
            resolver=ScriptedResolver([["127.0.0.1"]]),
            idle_timeout=60,
        )
        self.proxy = factory.buildProtocol(None)
        self.client = StringTransport()
        self.proxy.makeConnection(self.client)

    def connect_upstream(self) -> tuple[Protocol, StringTransport]:
        host, port, connecting, _, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 5432))
        upstream = connecting.buildProtocol(None)
        transport = StringTransport()
        upstream.makeConnection(transport)
        return upstream, transport

    def test_splice(self) -> None:
        """
        After C{200 Connection established}, bytes pass both ways, and each
        side is registered as the other's producer.
        """
        self.proxy.dataReceived(b"CONNECT db.test:5432 HTTP/1.1\r\n\r\nfirst")
        upstream, transport = self.connect_upstream()
        self.assertEqual(
            self.client.value(), b"HTTP/1.1 200 Connection established\r\n\r\n"
        )
        self.assertEqual(transport.value(), b"first")
        self.assertIs(transport.producer, self.client)
        self.assertIs(self.client.producer, transport)
        self.proxy.dataReceived(b"up")
        upstream.dataReceived(b"down")
        self.assertEqual(transport.value(), b"firstup")
        self.assertTrue(self.client.value().endswith(b"down"))
        upstream.connectionLost(None)
        self.assertTrue(self.client.disconnecting)

    def test_client_gone(self) -> None:
        """
        When the client leaves, the upstream connection is closed.
        """
        self.proxy.dataReceived(b"CONNECT db.test:5432 HTTP/1.1\r\n\r\n")
        _, transport = self.connect_upstream()
        self.proxy.connectionLost(None)
        self.assertTrue(transport.disconnecting)

    def test_client_gone_while_connecting(self) -> None:
        """
        When the client leaves before the destination answers, the
        connection attempt is stopped and no timer is left.
        """
        self.proxy.dataReceived(b"CONNECT db.test:5432 HTTP/1.1\r\n\r\n")
        self.proxy.connectionLost(None)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.client.value(), b"")

    def test_idle_timeout(self) -> None:
        """
        A spliced connection that carries nothing for C{idle_timeout}
        seconds is closed on both sides; traffic either way resets the
        timer.
        """
        self.proxy.dataReceived(b"CONNECT db.test:5432 HTTP/1.1\r\n\r\n")
        upstream, transport = self.connect_upstream()
        self.reactor.advance(50)
        upstream.dataReceived(b"x")
        self.reactor.advance(50)
        self.proxy.dataReceived(b"y")
        self.reactor.advance(59)
        self.assertFalse(self.client.disconnecting or transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(self.client.disconnected)
        self.assertTrue(transport.disconnected)


class _Client(Protocol):
    """
    Collects what it receives; tests wait for a marker or the close.
    """

    tracker: _Tracker | None = None

    def __init__(self) -> None:
        self.data = b""
        self._waiters: list[tuple[bytes, Deferred[bytes]]] = []
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        if self.tracker is not None:
            self.tracker.opened(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for marker, waiter in list(self._waiters):
            if marker in self.data:
                self._waiters.remove((marker, waiter))
                waiter.callback(self.data)

    def wait_for(self, marker: bytes) -> Deferred[bytes]:
        waiter: Deferred[bytes] = Deferred()
        if marker in self.data:
            waiter.callback(self.data)
        else:
            self._waiters.append((marker, waiter))
        return waiter

    def connectionLost(self, reason: Any = None) -> None:
        waiters, self._waiters = self._waiters, []
        for _, waiter in waiters:
            waiter.callback(self.data)
        self.closed.callback(self.data)
        if self.tracker is not None:
            self.tracker.closed(self)


class _Tracker:
    """
    Counts open connections, so that a test ends only once all are closed.
    """

    def __init__(self) -> None:
        self.open: set[Any] = set()
        self._waiters: list[Deferred[None]] = []

    def opened(self, connection: Any) -> None:
        self.open.add(connection)

    def closed(self, connection: Any) -> None:
        self.open.discard(connection)
        if not self.open:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def when_idle(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if self.open:
            self._waiters.append(waiter)
        else:
            waiter.callback(None)
        return waiter


class _TrackingFactory(Factory):
    """
    A server factory whose connections a L{_Tracker} counts (the protocols
    keep their interfaces, half-close included).
    """

    def __init__(self, wrapped: Any, tracker: _Tracker) -> None:
        self._wrapped = wrapped
        self._tracker = tracker

    def doStart(self) -> None:
        self._wrapped.doStart()

    def doStop(self) -> None:
        self._wrapped.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self._wrapped.buildProtocol(addr)
        tracker = self._tracker
        made, lost = protocol.connectionMade, protocol.connectionLost

        def connectionMade() -> None:
            tracker.opened(protocol)
            made()

        def connectionLost(reason: Any = None) -> None:
            tracker.closed(protocol)
            lost(reason)

        protocol.connectionMade = connectionMade
        protocol.connectionLost = connectionLost
        return protocol


class _Echo(Protocol):
    """
    Greets, then echoes; counts its connections.
    """

    def connectionMade(self) -> None:
        self.factory.connections += 1
        self.transport.write(b"hello\n")

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


@implementer(IHalfCloseableProtocol)
class _Count(Protocol):
    """
    Reads until the client shuts down its writing, then answers with the
    number of bytes read and shuts down its own.
    """

    def connectionMade(self) -> None:
        self.count = 0

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)

    def readConnectionLost(self) -> None:
        self.transport.write(b"%d" % self.count)
        self.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()


class _Page(Resource):
    """
    Answers every request with its method, path and body; records them.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, bytes, bytes | None, bytes]] = []

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        host = request.getHeader(b"host")
        self.requests.append((request.method, request.uri, host, body))
        return b"%s %s %s" % (request.method, request.uri, body)


class ServersMixin:
    """
    Real servers on 127.0.0.1 and a proxy in front of them.
    """

    timeout = 30
    _tracker: _Tracker | None = None

    @property
    def tracker(self) -> _Tracker:
        """
        The connections of this test's servers and clients; the test ends
        once all are closed (the last cleanup).
        """
        if self._tracker is None:
            self._tracker = _Tracker()
            self._proxies: list[EgressProxyFactory] = []

            async def idle() -> None:
                for proxy in self._proxies:
                    await proxy.when_idle()
                assert self._tracker is not None
                await self._tracker.when_idle()

            self.addCleanup(lambda: Deferred.fromCoroutine(idle()))  # type: ignore[attr-defined]
        return self._tracker

    def listen(self, factory: Any, tls: Any = None) -> int:
        if isinstance(factory, EgressProxyFactory):
            self.tracker  # noqa: B018
            self._proxies.append(factory)
        else:
            if tls is not None:
                factory = TLSMemoryBIOFactory(tls, False, factory)
            factory = _TrackingFactory(factory, self.tracker)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
        return port.getHost().port

    def write_file(self, data: bytes) -> str:
        path = os.path.abspath(self.mktemp())  # type: ignore[attr-defined]
        with open(path, "wb") as f:
            f.write(data)
        return path

    def echo(self) -> tuple[int, Factory]:
        factory = Factory.forProtocol(_Echo)
        factory.connections = 0  # type: ignore[attr-defined]
        return self.listen(factory), factory

    def site(self, tls: Any = None) -> tuple[int, _Page]:
        page = _Page()
        site = Site(page, reactor=reactor)
        site.log = lambda request: None  # type: ignore[method-assign]
        return self.listen(site, tls), page

    def tls_site(self) -> tuple[int, _Page, bytes]:
        ca, key, cert = _certificates(["localhost", "127.0.0.1"])
        port, page = self.site(CertificateOptions(privateKey=key, certificate=cert))
        return port, page, ca

    def proxy(self, allowed: list[str], **kwargs: Any) -> int:
        factory = EgressProxyFactory(reactor, EgressRules.from_pairs(allowed), **kwargs)
        return self.listen(factory)

    def client_factory(self) -> Factory:
        tracker = self.tracker

        def build() -> _Client:
            client = _Client()
            client.tracker = tracker
            return client

        return Factory.forProtocol(build)

    async def client(self, port: int) -> _Client:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client: _Client = await endpoint.connect(self.client_factory())
        self.addCleanup(client.transport.abortConnection)  # type: ignore[attr-defined]
        return client

    async def request(self, port: int, data: bytes) -> bytes:
        client = await self.client(port)
        client.transport.write(data)
        return await client.closed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProxyTests(ServersMixin, TestCase):
    """
    L{EgressProxyFactory} on real sockets.
    """

    async def test_connect_echo(self) -> None:
        """
        C{CONNECT} to an allowed server is answered 200 and carries bytes
        both ways (the server speaks first, then echoes).
        """
        port, _ = self.echo()
        proxy = self.proxy([f"127.0.0.1:{port}"])
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        client = await self.client(proxy)
        client.transport.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        await client.wait_for(b"hello\n")
        self.assertEqual(
            client.data, b"HTTP/1.1 200 Connection established\r\n\r\nhello\n"
        )
        client.transport.write(b"ping " * 20000)
        await client.wait_for(b"hello\n" + b"ping " * 20000)
        client.transport.loseConnection()
        await client.closed
        allowed = [e for e in events if e.get("log_format", "").endswith("allowed")]
        self.assertEqual(
            [(e["host"], e["port"]) for e in allowed], [("127.0.0.1", port)]
        )

    async def test_connect_early_data(self) -> None:
        """
        Bytes sent right behind the C{CONNECT} head, before the answer, are
        delivered once the tunnel is up.
        """
        port, _ = self.echo()
        proxy = self.proxy([f"127.0.0.1:{port}"])
        client = await self.client(proxy)
        client.transport.write(
            f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nearly".encode()
        )
        data = await client.wait_for(b"early")
        self.assertTrue(data.endswith(b"hello\nearly"), data)

    async def test_half_close(self) -> None:
        """
        A client that shuts down its writing still gets the answer the
        server sends after seeing the end of the request, and then the end
        of the connection.
        """
        port = self.listen(Factory.forProtocol(_Count))
        proxy = self.proxy([f"127.0.0.1:{port}"])
        client = await self.client(proxy)
        client.transport.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        await client.wait_for(b"\r\n\r\n")
        client.transport.write(b"z" * 100000)
        client.transport.loseWriteConnection()
        data = await client.closed
        self.assertEqual(data, b"HTTP/1.1 200 Connection established\r\n\r\n100000")

    async def test_connect_tls(self) -> None:
        """
        TLS runs end to end through C{CONNECT} to an allowed TLS server,
        the certificate verified by the client.
        """
        port, page, ca = self.tls_site()
        proxy = self.proxy([f"127.0.0.1:{port}"])

        async def target() -> str:
            return f"127.0.0.1:{port}"

        tunnel = TunnelEndpoint(
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxy),
            f"127.0.0.1:{proxy}",
            target,
        )
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(ca)), tunnel
        )
        client: _Client = await endpoint.connect(self.client_factory())
        client.transport.write(b"GET /secret HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = await client.closed
        self.assertTrue(data.startswith(b"HTTP/1.0 200"), data)
        self.assertTrue(data.endswith(b"GET /secret "), data)
        self.assertEqual(page.requests, [(b"GET", b"/secret", b"localhost", b"")])

    async def test_plain_http(self) -> None:
        """
        An absolute-form request to an allowed server is forwarded in
        origin form, its body included, with Twisted's L{ProxyAgent}.
        """
        port, page = self.site()
        proxy = self.proxy([f"127.0.0.1:{port}"])
        agent = ProxyAgent(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy), reactor)
        url = f"http://127.0.0.1:{port}/path?q=1"
        response = await agent.request(b"GET", url.encode())
        self.assertEqual(response.code, 200)
        self.assertEqual(await readBody(response), b"GET /path?q=1 ")
        response = await agent.request(
            b"POST",
            url.encode(),
            bodyProducer=FileBodyProducer(io.BytesIO(b"x" * 70000)),
        )
        self.assertEqual(await readBody(response), b"POST /path?q=1 " + b"x" * 70000)
        self.assertEqual(
            [(m, u, h) for m, u, h, _ in page.requests],
            [
                (b"GET", b"/path?q=1", f"127.0.0.1:{port}".encode()),
                (b"POST", b"/path?q=1", f"127.0.0.1:{port}".encode()),
            ],
        )

    async def test_curl(self) -> None:
        """
        curl fetches an allowed http URL (absolute form) and an allowed
        https URL (CONNECT, certificate verified) through the proxy, and
        reports the 403 for a refused one.
        """
        curl = shutil.which("curl")
        if curl is None:
            raise self.skipTest("curl is not installed (apt-get install curl)")
        port, _ = self.site()
        tls_port, _, ca = self.tls_site()
        cafile = self.write_file(ca)
        proxy = self.proxy([f"127.0.0.1:{port}", f"localhost:{tls_port}"])
        common = ["-sS", "--max-time", "20", "-x", f"http://127.0.0.1:{proxy}"]

        async def run(*args: str) -> tuple[bytes, bytes, int]:
            result: tuple[bytes, bytes, int] = await getProcessOutputAndValue(
                curl, [*common, *args], env={}, reactor=reactor
            )
            return result

        out, err, code = await run(f"http://127.0.0.1:{port}/plain")
        self.assertEqual((out, code), (b"GET /plain ", 0), err)
        out, err, code = await run(
            "--cacert", cafile, f"https://localhost:{tls_port}/tls"
        )
        self.assertEqual((out, code), (b"GET /tls ", 0), err)
        out, err, code = await run(
            "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.2:{port}/"
        )
        self.assertEqual(out, b"403")
        out, err, code = await run(f"https://127.0.0.2:{tls_port}/")
        self.assertNotEqual(code, 0)
        self.assertIn(b"403", err)

    async def test_name_resolved_by_proxy(self) -> None:
        """
        A name is resolved by the proxy's resolver, and allowed when its
        C{host:port} is listed.
        """
        port, page = self.site()
        resolver = ScriptedResolver([["127.0.0.1"]])
        proxy = self.proxy([f"db.test:{port}"], resolver=resolver)
        data = await self.request(
            proxy,
            f"GET http://db.test:{port}/x HTTP/1.1\r\nHost: db.test\r\n\r\n".encode(),
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 200"), data)
        self.assertEqual(resolver.calls, ["db.test"])
        self.assertEqual(page.requests, [(b"GET", b"/x", b"db.test", b"")])

    async def test_loopback_refused(self) -> None:
        """
        C{CONNECT} and plain requests to loopback forms that are not listed
        get 403 with the reason, and the server there sees no connection.
        """
        allowed, _ = self.echo()
        port, target = self.echo()
        proxy = self.proxy([f"127.0.0.1:{allowed}"])
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for host in LOOPBACK_FORMS + ("127.0.0.1",):
            for head in [
                f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n",
                f"GET http://{host}:{port}/ HTTP/1.1\r\nHost: x\r\n\r\n",
            ]:
                data = await self.request(proxy, head.encode())
                self.assertTrue(data.startswith(b"HTTP/1.1 403 Forbidden\r\n"), data)
                body = data.split(b"\r\n\r\n", 1)[1].decode()
                self.assertIn(f"{host}:{port} resolves to a loopback address", body)
                self.assertEqual(body.count("\n"), 1)
        self.assertEqual(target.connections, 0)  # type: ignore[attr-defined]
        refused = [e for e in events if e.get("status") == 403]
        self.assertEqual(len(refused), 2 * (len(LOOPBACK_FORMS) + 1))
        self.assertEqual(
            {(e["host"], e["port"]) for e in refused},
            {(h, port) for h in LOOPBACK_FORMS + ("127.0.0.1",)},
        )
        self.assertIn("loopback", refused[0]["reason"])

    async def test_private_name_refused(self) -> None:
        """
        A name resolving to a loopback address is refused too, although
        the same address is listed for another port.
        """
        port, target = self.echo()
        resolver = ScriptedResolver([["127.0.0.1"]])
        proxy = self.proxy([f"127.0.0.1:{port + 1}"], resolver=resolver)
        data = await self.request(
            proxy, f"CONNECT db.test:{port} HTTP/1.1\r\n\r\n".encode()
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 403"), data)
        self.assertEqual(target.connections, 0)  # type: ignore[attr-defined]

    async def test_malformed(self) -> None:
        """
        A malformed request gets 400 and the connection is closed.
        """
        proxy = self.proxy([])
        for head in [
            b"HELLO\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"CONNECT x HTTP/1.1\r\n\r\n",
        ]:
            data = await self.request(proxy, head)
            self.assertTrue(data.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data)

    async def test_unreachable(self) -> None:
        """
        An allowed destination where nothing listens gets 502.
        """
        port = _free_port()
        proxy = self.proxy([f"127.0.0.1:{port}"])
        data = await self.request(
            proxy, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode()
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), data)
        self.assertIn(f"cannot connect to 127.0.0.1:{port}".encode(), data)

    async def test_unresolvable(self) -> None:
        """
        A name with no address gets 502.
        """
        proxy = self.proxy([], resolver=ScriptedResolver([[]]))
        data = await self.request(proxy, b"CONNECT nowhere.test:80 HTTP/1.1\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), data)
        self.assertIn(b"cannot resolve nowhere.test", data)

    async def test_tunnel_endpoint_refused(self) -> None:
        """
        haikutx's own CONNECT client sees the refusal as L{ProxyRefused}.
        """
        port, _ = self.echo()
        proxy = self.proxy([])

        async def target() -> str:
            return f"127.0.0.2:{port}"

        tunnel = TunnelEndpoint(
            TCP4ClientEndpoint(reactor, "127.0.0.1", proxy), "egress", target
        )
        with self.assertRaises(ProxyRefused) as caught:
            await tunnel.connect(Factory.forProtocol(_Client))
        self.assertEqual(caught.exception.status, "403 Forbidden")


class ChannelTests(ServersMixin, TestCase):
    """
    Connections passed over the channel with C{SCM_RIGHTS} are served by
    the proxy.
    """

    async def passed_client(self, zygote: socket.socket) -> _Client:
        """
        Connect a client to a plain listener and pass the accepted end over
        the channel, as L{EgressRelay} does.
        """
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self.addCleanup(listener.close)
        client = await self.client(listener.getsockname()[1])
        listener.setblocking(False)
        accepted, _ = listener.accept()
        with accepted:
            socket.send_fds(zygote, [b"C"], [accepted.fileno()])
        return client

    async def test_passed_connection(self) -> None:
        """
        A connection passed over the channel made by
        L{make_egress_channel} is served by the proxy with its rules.
        """
        port, _ = self.echo()
        zygote, stop = make_egress_channel(
            reactor, EgressRules.from_pairs([f"127.0.0.1:{port}"])
        )
        self.addCleanup(zygote.close)
        self.addCleanup(stop)
        self.assertTrue(zygote.get_inheritable())
        for _ in range(2):
            client = await self.passed_client(zygote)
            client.transport.write(
                f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\nping".encode()
            )
            data = await client.wait_for(b"ping")
            self.assertEqual(
                data, b"HTTP/1.1 200 Connection established\r\n\r\nhello\nping"
            )
            client.transport.loseConnection()
        refused = await self.passed_client(zygote)
        refused.transport.write(f"CONNECT 127.0.0.2:{port} HTTP/1.1\r\n\r\n".encode())
        self.assertTrue((await refused.closed).startswith(b"HTTP/1.1 403"))

    async def test_not_a_socket(self) -> None:
        """
        A descriptor that is not a TCP socket is closed and logged, and the
        channel goes on serving.
        """
        port, _ = self.echo()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        zygote, stop = make_egress_channel(
            reactor, EgressRules.from_pairs([f"127.0.0.1:{port}"])
        )
        self.addCleanup(zygote.close)
        self.addCleanup(stop)
        read, write = os.pipe()
        self.addCleanup(os.close, write)
        socket.send_fds(zygote, [b"C"], [read])
        os.close(read)
        client = await self.passed_client(zygote)
        client.transport.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        await client.wait_for(b"hello\n")
        warnings = [e for e in events if "refused" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1, warnings)
        # The pipe's read end is closed in this process: writing to a pipe
        # with no reader fails.
        self.assertRaises(BrokenPipeError, os.write, write, b"x")

    async def test_stop(self) -> None:
        """
        The stop callable closes the server's end, so the zygote sees the
        end of the channel, and aborts the tunnels passed over it.
        """
        port, _ = self.echo()
        zygote, stop = make_egress_channel(
            reactor, EgressRules.from_pairs([f"127.0.0.1:{port}"])
        )
        self.addCleanup(zygote.close)
        client = await self.passed_client(zygote)
        client.transport.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        await client.wait_for(b"hello\n")
        await stop()
        self.assertTrue((await client.closed).endswith(b"hello\n"))
        zygote.settimeout(5)
        self.assertEqual(zygote.recv(1), b"")

    async def test_listen_channel(self) -> None:
        """
        L{listen_channel} serves a socketpair end with any factory and
        counts the descriptors it received.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        port, _ = self.echo()
        factory = EgressProxyFactory(
            reactor, EgressRules.from_pairs([f"127.0.0.1:{port}"])
        )
        self._proxies.append(factory)
        channel = listen_channel(reactor, ours, factory)
        ours.close()
        self.addCleanup(channel.when_closed)
        self.addCleanup(channel.transport.loseConnection)
        self.assertTrue(verifyObject(IFileDescriptorReceiver, channel))
        client = await self.passed_client(theirs)
        client.transport.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        await client.wait_for(b"hello\n")
        self.assertEqual(channel.received, 1)


_CHILD = textwrap.dedent(
    """
    import json, os, socket, ssl, sys, threading, urllib.error, urllib.request
    from haikutx.sandbox.netns import EgressRelay, enter_network_namespace

    allowed, refused, tls_url, cafile, direct_port = sys.argv[1:6]
    channel = socket.socket(fileno=3)
    out = {"kind": enter_network_namespace()}
    relay = EgressRelay(channel)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    os.environ.update(relay.proxy_environ())
    out["allowed"] = urllib.request.urlopen(allowed, timeout=20).read().decode()
    try:
        urllib.request.urlopen(refused, timeout=20)
        out["refused"] = "no error"
    except urllib.error.HTTPError as e:
        out["refused"] = [e.code, e.read().decode()]
    context = ssl.create_default_context(cafile=cafile)
    out["tls"] = urllib.request.urlopen(tls_url, timeout=20, context=context).read()
    out["tls"] = out["tls"].decode()
    try:
        urllib.request.urlopen(tls_url.replace("localhost", "127.0.0.2"), timeout=20)
        out["tls_refused"] = "no error"
    except OSError as e:
        out["tls_refused"] = str(e)
    try:
        socket.create_connection(("127.0.0.1", int(direct_port)), timeout=5).close()
        out["direct"] = "connected"
    except OSError as e:
        out["direct"] = e.errno
    print(json.dumps(out))
    """
)


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.output = {1: b"", 2: b""}
        self.ended: Deferred[Any] = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output[fd] = self.output.get(fd, b"") + data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)


class NamespaceTests(ServersMixin, TestCase):
    """
    A child in its own network namespace reaches allowed servers on this
    machine only through the relay and the proxy.
    """

    timeout = 90

    def setUp(self) -> None:
        if not LAYERS.network_namespaces:
            raise self.skipTest(LAYERS.reasons.get("network_namespaces", "no netns"))

    async def test_urllib_through_relay(self) -> None:
        """
        C{urllib.request} with the relay's proxy environment fetches an
        allowed http URL and an allowed https URL (by name, resolved by the
        server: the namespace has its own empty loopback), gets 403 for a
        loopback address that is not listed, and cannot connect directly.
        """
        port, page = self.site()
        tls_port, tls_page, ca = self.tls_site()
        cafile = self.write_file(ca)
        zygote, stop = make_egress_channel(
            reactor,
            EgressRules.from_pairs([f"127.0.0.1:{port}", f"localhost:{tls_port}"]),
        )
        self.addCleanup(stop)
        protocol = _Collect()
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ROOT_DIR}
        args = [
            f"http://127.0.0.1:{port}/allowed",
            f"http://127.0.0.2:{port}/refused",
            f"https://localhost:{tls_port}/tls",
            cafile,
            str(port),
        ]
        process = reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, "-c", _CHILD, *args],
            env=env,
            path=ROOT_DIR,
            childFDs={0: "w", 1: "r", 2: "r", 3: zygote.fileno()},
        )
        zygote.close()
        killer = reactor.callLater(60, process.signalProcess, "KILL")
        self.addCleanup(lambda: killer.active() and killer.cancel())
        await protocol.ended
        self.assertEqual(protocol.output[2].decode(), "")
        report = json.loads(protocol.output[1])
        self.assertEqual(report["allowed"], "GET /allowed ")
        self.assertEqual(report["refused"][0], 403)
        self.assertIn(
            f"127.0.0.2:{port} resolves to a loopback address", report["refused"][1]
        )
        self.assertEqual(report["tls"], "GET /tls ")
        self.assertIn("403", report["tls_refused"])
        self.assertEqual(report["direct"], errno.ECONNREFUSED)
        self.assertEqual([r[1] for r in page.requests], [b"/allowed"])
        self.assertEqual([r[1] for r in tls_page.requests], [b"/tls"])
