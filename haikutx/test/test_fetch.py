# -*- test-case-name: haikutx.test.test_fetch -*-
"""
Tests for L{haikutx.runtime.fetch} and L{haikutx.net.outbound}: real origin servers on
127.0.0.1 (plain and TLS with a CA generated here), a real tinyproxy, and
L{MemoryReactorClock} for the endpoint's single look at DNS.
"""

from __future__ import annotations

import datetime
import os
import shutil
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, ip_address
from typing import Any

from twisted.internet import reactor as _global_reactor
from twisted.internet.address import IPv4Address as TwistedIPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from haikutx.interfaces import IHandlerFetcher
from haikutx.net.outbound import (
    AddressRefused,
    CheckedEndpoint,
    ProxyRefused,
    TunnelEndpoint,
)
from haikutx.runtime.download import bypasses_proxy
from haikutx.runtime.fetch import (
    UNSUPPORTED_PROTOCOL,
    FetchedHandler,
    HandlerFetcher,
    HandlerFetchError,
)
from haikutx.runtime.handler_cache import freshness

reactor: Any = _global_reactor
SOURCE = b"def handle(req, res):\n    res.end('hello')\n"

Route = Callable[[Any], bytes | int]


class Origin(Resource):
    """
    A handler origin that counts its requests per path and keeps the
    headers of the last one.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, Route] = {}
        self.counts: dict[str, int] = {}
        self.last_headers: dict[str, Headers] = {}
        self.lost: list[str] = []

    def render_GET(self, request: Any) -> bytes | int:
        path = request.uri.decode("ascii")
        self.counts[path] = self.counts.get(path, 0) + 1
        self.last_headers[path] = request.requestHeaders.copy()
        request.notifyFinish().addErrback(lambda f: self.lost.append(path))
        route = self.routes.get(path)
        if route is None:
            request.setResponseCode(404)
            return b"not found"
        return route(request)

    def serve(self, path: str, body: bytes = SOURCE, **headers: str) -> None:
        """
        Serve C{body} at C{path} with these headers (underscores become
        dashes).
        """

        def route(request: Any) -> bytes:
            for name, value in headers.items():
                request.setHeader(name.replace("_", "-"), value)
            return body

        self.routes[path] = route

    def redirect(self, path: str, location: str, code: int = 302) -> None:
        def route(request: Any) -> bytes:
            request.setResponseCode(code)
            request.setHeader("location", location)
            return b"moved"

        self.routes[path] = route


def _certificates(names: list[str]) -> tuple[bytes, Any, Any]:
    """
    A CA and a server certificate for C{names} signed by it.

    @return: the CA's PEM, and the server's pyOpenSSL key and certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from OpenSSL import crypto

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "haikutx test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    return (
        ca_pem,
        crypto.PKey.from_cryptography_key(key),
        crypto.X509.from_cryptography(cert),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Silent(Protocol):
    """
    Accepts a connection and never answers.
    """

    def connectionMade(self) -> None:
        self.factory.connections.append(self.transport)


class _Tinyproxy(Protocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.output = b""

    def dataReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    # ProcessProtocol methods used by spawnProcess
    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data

    def childConnectionLost(self, fd: int) -> None:
        pass

    def processExited(self, reason: Any) -> None:
        pass


class FetcherTestsMixin:
    """
    Helpers to start origins and fetchers that are cleaned up.
    """

    def origin(self, tls_names: list[str] | None = None) -> tuple[Origin, int, bytes]:
        """
        Start an origin on 127.0.0.1.

        @return: the origin, its port and (for TLS) the CA's PEM.
        """
        origin = Origin()
        site = Site(origin, reactor=reactor)
        ca = b""
        if tls_names is None:
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
        else:
            ca, key, cert = _certificates(tls_names)
            options = CertificateOptions(privateKey=key, certificate=cert)
            port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
        return origin, port.getHost().port, ca

    def fetcher(self, **kwargs: Any) -> HandlerFetcher:
        kwargs.setdefault("max_size", 16384)
        kwargs.setdefault("timeout", 5.0)
        fetcher = HandlerFetcher(reactor, **kwargs)
        self.addCleanup(fetcher.close)  # type: ignore[attr-defined]
        return fetcher

    async def fails(
        self, fetcher: HandlerFetcher, url: str, status: int, message: str | None = None
    ) -> HandlerFetchError:
        try:
            result = await fetcher.fetch(url)
        except HandlerFetchError as e:
            self.assertEqual(e.status, status, e.message)  # type: ignore[attr-defined]
            if message is not None:
                self.assertEqual(e.message, message)  # type: ignore[attr-defined]
            self.assertNotIn("\n", e.message)  # type: ignore[attr-defined]
            return e
        self.fail(f"fetched {result!r}")  # type: ignore[attr-defined]
        raise AssertionError


class HandlerFetcherConformanceMixin:
    """
    What every L{IHandlerFetcher} does, fakes included: subclasses define
    C{make_fetcher(url, source)} returning a fetcher that serves C{source}
    at C{url} (and nothing else).
    """

    async def make_fetcher(self, source: bytes) -> tuple[Any, str]:
        raise NotImplementedError

    async def test_conforms(self) -> None:
        """
        The fetcher provides L{IHandlerFetcher}, fetches the code with its
        final URL and a cache status, refuses another scheme with a 400, and
        counts hits, misses, revalidations, bytes and errors.
        """
        fetcher, url = await self.make_fetcher(SOURCE)
        self.assertTrue(verifyObject(IHandlerFetcher, fetcher))
        fetched = await fetcher.fetch(url)
        self.assertEqual((fetched.url, fetched.source), (url, SOURCE))
        self.assertIn(fetched.cache, ("hit", "miss", "revalidated", "off"))
        try:
            await fetcher.fetch("gopher://127.0.0.1/h.py")
        except HandlerFetchError as e:
            self.assertEqual((e.status, e.message), (400, UNSUPPORTED_PROTOCOL))
        else:
            self.fail("gopher fetched")
        counters = fetcher.counters()
        for name in ("hits", "misses", "revalidations", "bytes", "errors"):
            self.assertIsInstance(counters[name], int)


class HandlerFetcherConformanceTests(
    HandlerFetcherConformanceMixin, FetcherTestsMixin, TestCase
):
    """
    L{HandlerFetcher} conforms to L{IHandlerFetcher}.
    """

    async def make_fetcher(self, source: bytes) -> tuple[Any, str]:
        origin, port, _ = self.origin()
        origin.serve("/h.py", source)
        url = f"http://127.0.0.1:{port}/h.py"
        return self.fetcher(allow=(url,)), url


class FetchTests(FetcherTestsMixin, TestCase):
    """
    L{HandlerFetcher} against real origins on loopback.
    """

    async def test_interface(self) -> None:
        """
        L{HandlerFetcher} provides L{IHandlerFetcher}.
        """
        self.assertTrue(verifyObject(IHandlerFetcher, self.fetcher()))

    async def test_from_config(self) -> None:
        """
        L{HandlerFetcher.from_config} applies C{--maxsize} and C{--allow}.
        """
        from haikutx.config import Config, Limits

        origin, port, _ = self.origin()
        origin.serve("/h.py", b"x" * 11)
        base = f"http://127.0.0.1:{port}"
        config = Config(limits=Limits(max_size=10), allow=(base + "/ok/",))
        fetcher = HandlerFetcher.from_config(reactor, config)
        self.addCleanup(fetcher.close)
        await self.fails(fetcher, base + "/h.py", 403)
        config = Config(limits=Limits(max_size=10), allow=(base + "/",))
        fetcher = HandlerFetcher.from_config(reactor, config)
        self.addCleanup(fetcher.close)
        await self.fails(fetcher, base + "/h.py", 400)

    async def test_fresh_handler_fetched_once(self) -> None:
        """
        1000 fetches of a fresh handler (500 at once, coalesced, then 500
        from the cache) make one origin request.
        """
        origin, port, _ = self.origin()
        origin.serve("/h.py")
        fetcher = self.fetcher(allow=(f"http://127.0.0.1:{port}/",))
        url = f"http://127.0.0.1:{port}/h.py"
        results = await gatherResults([fetcher.fetch(url) for _ in range(500)])
        for _ in range(500):
            results.append(await fetcher.fetch(url))
        self.assertEqual(origin.counts, {"/h.py": 1})
        self.assertEqual(set(results[:500]), {FetchedHandler(url, SOURCE, "miss")})
        self.assertEqual(set(results[500:]), {FetchedHandler(url, SOURCE, "hit")})
        counters = fetcher.counters()
        self.assertEqual(
            (counters["misses"], counters["coalesced"], counters["hits"]), (1, 499, 500)
        )
        self.assertEqual(counters["bytes"], len(SOURCE))

    async def test_stale_revalidated_with_etag(self) -> None:
        """
        A stale handler is revalidated with If-None-Match; a 304 reuses the
        cached code.
        """
        origin, port, _ = self.origin()
        body = {"v": SOURCE}

        def route(request: Any) -> bytes:
            request.setHeader("cache-control", "max-age=0")
            request.setHeader("etag", '"v1"')
            if request.getHeader("if-none-match") == '"v1"':
                request.setResponseCode(304)
                return b""
            return body["v"]

        origin.routes["/h.py"] = route
        fetcher = self.fetcher(allow=(f"http://127.0.0.1:{port}/",))
        url = f"http://127.0.0.1:{port}/h.py"
        first = await fetcher.fetch(url)
        second = await fetcher.fetch(url)
        self.assertEqual((first.cache, second.cache), ("miss", "revalidated"))
        self.assertEqual(second.source, SOURCE)
        self.assertEqual(origin.counts["/h.py"], 2)
        self.assertEqual(
            origin.last_headers["/h.py"].getRawHeaders("if-none-match"), ['"v1"']
        )
        self.assertEqual(fetcher.counters()["revalidations"], 1)

    async def test_stale_revalidated_with_last_modified(self) -> None:
        """
        Without caching headers a handler is fresh for C{cache_ttl}; then it
        is revalidated with If-Modified-Since.
        """
        origin, port, _ = self.origin()
        stamp = "Mon, 02 Nov 2026 10:00:00 GMT"

        def route(request: Any) -> bytes:
            request.setHeader("last-modified", stamp)
            if request.getHeader("if-modified-since") == stamp:
                request.setResponseCode(304)
                return b""
            return SOURCE

        origin.routes["/h.py"] = route
        fetcher = self.fetcher(allow=(f"http://127.0.0.1:{port}/",), cache_ttl=0.2)
        url = f"http://127.0.0.1:{port}/h.py"
        self.assertEqual((await fetcher.fetch(url)).cache, "miss")
        self.assertEqual((await fetcher.fetch(url)).cache, "hit")
        await deferLater(reactor, 0.3)
        again = await fetcher.fetch(url)
        self.assertEqual((again.cache, again.source), ("revalidated", SOURCE))
        self.assertEqual(origin.counts["/h.py"], 2)

    async def test_changed_handler_replaced(self) -> None:
        """
        A stale handler whose origin answers 200 to the conditional request
        is replaced by the new code.
        """
        origin, port, _ = self.origin()
        origin.serve("/h.py", b"old", cache_control="no-cache", etag='"1"')
        fetcher = self.fetcher(allow=(f"http://127.0.0.1:{port}/",))
        url = f"http://127.0.0.1:{port}/h.py"
        self.assertEqual((await fetcher.fetch(url)).source, b"old")
        origin.serve("/h.py", b"new", cache_control="no-cache", etag='"2"')
        self.assertEqual((await fetcher.fetch(url)).source, b"new")
        self.assertEqual(
            origin.last_headers["/h.py"].getRawHeaders("if-none-match"), ['"1"']
        )

    async def test_max_age_and_no_store(self) -> None:
        """
        max-age keeps a handler fresh past C{cache_ttl}; no-store is never
        kept; with the cache off every fetch goes to the origin.
        """
        origin, port, _ = self.origin()
        origin.serve("/long.py", cache_control="max-age=3600")
        origin.serve("/never.py", cache_control="no-store", etag='"x"')
        allow = (f"http://127.0.0.1:{port}/",)
        fetcher = self.fetcher(allow=allow, cache_ttl=0)
        base = f"http://127.0.0.1:{port}"
        for _ in range(3):
            await fetcher.fetch(base + "/long.py")
            self.assertEqual((await fetcher.fetch(base + "/never.py")).cache, "miss")
        self.assertEqual(origin.counts, {"/long.py": 1, "/never.py": 3})
        self.assertIsNone(
            origin.last_headers["/never.py"].getRawHeaders("if-none-match")
        )
        off = self.fetcher(allow=allow, cache_bytes=0)
        for _ in range(3):
            self.assertEqual((await off.fetch(base + "/long.py")).cache, "off")
        self.assertEqual(origin.counts["/long.py"], 4)

    async def test_cache_bounded_in_bytes(self) -> None:
        """
        The cache holds at most C{cache_bytes}; the least recently used
        handler is evicted first.
        """
        origin, port, _ = self.origin()
        for name in "abc":
            origin.serve(f"/{name}.py", name.encode() * 1000)
        fetcher = self.fetcher(allow=(f"http://127.0.0.1:{port}/",), cache_bytes=2700)
        base = f"http://127.0.0.1:{port}"
        for name in "abca":
            await fetcher.fetch(f"{base}/{name}.py")
            self.assertLessEqual(fetcher.counters()["cached_bytes"], 2700)
        self.assertEqual(origin.counts, {"/a.py": 2, "/b.py": 1, "/c.py": 1})
        self.assertEqual(fetcher.counters()["cached_handlers"], 2)

    async def test_redirects(self) -> None:
        """
        301, 302, 303, 307 and 308 are followed, up to 3, relative
        Locations resolved; the final URL is reported.
        """
        origin, port, _ = self.origin()
        base = f"http://127.0.0.1:{port}"
        origin.redirect("/1", f"{base}/2", 301)
        origin.redirect("/2", "/3", 307)
        origin.redirect("/3", "final.py", 308)
        origin.redirect("/4", "/final.py", 303)
        origin.serve("/final.py")
        fetcher = self.fetcher(allow=(base + "/",))
        result = await fetcher.fetch(base + "/1")
        self.assertEqual(result, FetchedHandler(base + "/final.py", SOURCE, "miss"))
        self.assertEqual((await fetcher.fetch(base + "/4")).url, base + "/final.py")

    async def test_too_many_redirects(self) -> None:
        """
        A fourth redirect is an HTTP error naming the URL that sent it.
        """
        origin, port, _ = self.origin()
        base = f"http://127.0.0.1:{port}"
        for n in range(1, 5):
            origin.redirect(f"/{n}", f"/{n + 1}")
        origin.serve("/5")
        fetcher = self.fetcher(allow=(base + "/",))
        await self.fails(
            fetcher,
            base + "/1",
            502,
            f"HTTP error when obtaining handler code from {base}/4: 302",
        )
        self.assertNotIn("/5", origin.counts)

    async def test_http_error(self) -> None:
        """
        A non-200 answer is a 502 naming the URL and the status.
        """
        origin, port, _ = self.origin()
        base = f"http://127.0.0.1:{port}"
        fetcher = self.fetcher(allow=(base + "/",))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        await self.fails(
            fetcher,
            base + "/missing.py",
            502,
            f"HTTP error when obtaining handler code from {base}/missing.py: 404",
        )
        self.assertEqual(fetcher.counters()["errors"], 1)
        failed = [e for e in events if e.get("status") == 502]
        self.assertEqual(len(failed), 1)
        self.assertEqual(failed[0]["handler_url"], base + "/missing.py")

    async def test_unsupported_scheme(self) -> None:
        """
        Another scheme is refused, also when a redirect points to it.
        """
        origin, port, _ = self.origin()
        base = f"http://127.0.0.1:{port}"
        origin.redirect("/r", "file:///etc/passwd")
        fetcher = self.fetcher(allow=(base + "/",))
        await self.fails(fetcher, "ftp://127.0.0.1/x", 400, UNSUPPORTED_PROTOCOL)
        await self.fails(fetcher, base + "/r", 400, UNSUPPORTED_PROTOCOL)

    async def test_size_limit(self) -> None:
        """
        Exactly C{max_size} bytes is accepted; one more is refused, with or
        without Content-Length, and a download without one is aborted.
        """
        origin, port, _ = self.origin()
        base = f"http://127.0.0.1:{port}"
        origin.serve("/exact.py", b"x" * 100)
        origin.serve("/over.py", b"x" * 101)

        calls: list[Any] = []
        self.addCleanup(lambda: [c.cancel() for c in calls if c.active()])

        def streaming(request: Any) -> int:
            def more() -> None:
                if not request.finished and not request._disconnected:
                    request.write(b"y" * 40)
                    calls.append(reactor.callLater(0.01, more))

            more()
            return NOT_DONE_YET

        origin.routes["/stream.py"] = streaming

        def announced(request: Any) -> int:
            request.setHeader("content-length", "100000")
            request.write(b"z")
            return NOT_DONE_YET

        origin.routes["/announced.py"] = announced
        fetcher = self.fetcher(allow=(base + "/",), max_size=100)
        self.assertEqual(len((await fetcher.fetch(base + "/exact.py")).source), 100)
        message = "The size of the handler exceeded the quota of 100 bytes."
        await self.fails(fetcher, base + "/over.py", 400, message)
        await self.fails(fetcher, base + "/stream.py", 400, message)
        # The body never comes: only the early Content-Length check answers
        # before the time limit.
        await self.fails(fetcher, base + "/announced.py", 400, message)
        for _ in range(50):
            if "/stream.py" in origin.lost:
                break
            await deferLater(reactor, 0.02)
        self.assertIn("/stream.py", origin.lost)

    async def test_timeout(self) -> None:
        """
        An origin that accepts and never answers, or trickles its body,
        fails after C{timeout} with a 502.
        """
        factory = Factory.forProtocol(_Silent)
        factory.connections = []  # type: ignore[attr-defined]
        silent = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(silent.stopListening)
        self.addCleanup(
            lambda: [t.abortConnection() for t in factory.connections]  # type: ignore
        )
        url = f"http://127.0.0.1:{silent.getHost().port}/h.py"
        fetcher = self.fetcher(allow=(url,), timeout=0.3)
        started = reactor.seconds()
        await self.fails(
            fetcher,
            url,
            502,
            f"Unable to obtain HTTP handler code from {url}: timed out after 0.3 s",
        )
        self.assertLess(reactor.seconds() - started, 2)

        origin, port, _ = self.origin()

        calls: list[Any] = []
        self.addCleanup(lambda: [c.cancel() for c in calls if c.active()])

        def trickle(request: Any) -> int:
            request.setHeader("content-length", "1000")

            def more() -> None:
                if not request._disconnected:
                    request.write(b"#")
                    calls.append(reactor.callLater(0.05, more))

            more()
            return NOT_DONE_YET

        origin.routes["/slow.py"] = trickle
        slow = f"http://127.0.0.1:{port}/slow.py"
        fetcher = self.fetcher(allow=(slow,), timeout=0.3, max_size=2000)
        await self.fails(fetcher, slow, 502)
        for _ in range(50):
            if origin.lost:
                break
            await deferLater(reactor, 0.02)
        self.assertEqual(origin.lost, ["/slow.py"])

    async def test_unreachable(self) -> None:
        """
        A refused connection is a 502 naming it.
        """
        port = _free_port()
        url = f"http://127.0.0.1:{port}/h.py"
        await self.fails(
            self.fetcher(allow=(url,)),
            url,
            502,
            f"Unable to obtain HTTP handler code from {url}: connection refused",
        )


class SafetyTests(FetcherTestsMixin, TestCase):
    """
    Loopback and private addresses are refused unless a prefix allows them.
    """

    async def test_loopback_forms_refused(self) -> None:
        """
        Without prefixes every loopback form is refused with a 403 and the
        origin sees no request.
        """
        origin, port, _ = self.origin()
        origin.serve("/h.py")
        fetcher = self.fetcher()
        for host in ("localhost", "127.0.0.1", "127.0.0.2", "[::1]", "0x7f000001"):
            url = f"http://{host}:{port}/h.py"
            error = await self.fails(fetcher, url, 403)
            self.assertTrue(
                error.message.startswith(f"The handler URL {url} is not allowed: "),
                error.message,
            )
            self.assertIn("loopback", error.message)
        self.assertEqual(origin.counts, {})

    async def test_prefix_limits_urls(self) -> None:
        """
        With prefixes a URL outside them is refused, and a prefix naming
        127.0.0.1 does not allow other loopback names.
        """
        origin, port, _ = self.origin()
        origin.serve("/ok/h.py")
        origin.serve("/secret")
        base = f"http://127.0.0.1:{port}"
        fetcher = self.fetcher(allow=(base + "/ok/",))
        self.assertEqual((await fetcher.fetch(base + "/ok/h.py")).source, SOURCE)
        await self.fails(
            fetcher,
            base + "/secret",
            403,
            f"The handler URL {base}/secret is not allowed: "
            "it matches no --allow prefix",
        )
        await self.fails(fetcher, base + "/ok/../secret", 403)
        await self.fails(fetcher, f"http://localhost:{port}/ok/h.py", 403)
        self.assertEqual(origin.counts, {"/ok/h.py": 1})

    async def test_redirect_checked(self) -> None:
        """
        A redirect to a loopback name or another port is refused and never
        requested.
        """
        origin, port, _ = self.origin()
        other, other_port, _ = self.origin()
        other.serve("/secret")
        origin.serve("/secret")
        base = f"http://127.0.0.1:{port}"
        origin.redirect("/a", f"http://localhost:{port}/secret")
        origin.redirect("/b", f"http://127.0.0.1:{other_port}/secret")
        origin.redirect("/c", f"http://[::1]:{port}/secret")
        fetcher = self.fetcher(allow=("http://",))
        await self.fails(fetcher, base + "/a", 403)
        fetcher = self.fetcher(allow=(base + "/",))
        for path in ("/a", "/b", "/c"):
            error = await self.fails(fetcher, base + path, 403)
            self.assertNotIn(base + path, error.message)
        self.assertNotIn("/secret", origin.counts)
        self.assertEqual(other.counts, {})

    async def test_resolved_once(self) -> None:
        """
        A name is resolved once per connection and the address it answers
        is the one checked: a name answering loopback is refused without
        a second look.
        """
        origin, port, _ = self.origin()
        origin.serve("/h.py")
        resolver = ScriptedResolver([["127.0.0.1"]])
        fetcher = self.fetcher(resolver=resolver)
        await self.fails(
            fetcher,
            f"http://rebind.test:{port}/h.py",
            403,
            f"The handler URL http://rebind.test:{port}/h.py is not allowed: "
            "rebind.test resolves to a loopback address (127.0.0.1); the server "
            f"allows it when started with --allow http://rebind.test:{port}/",
        )
        self.assertEqual(resolver.calls, ["rebind.test"])
        self.assertEqual(origin.counts, {})


@implementer(IHostnameResolver)
class ScriptedResolver:
    """
    An L{IHostnameResolver} answering each lookup with the next list of
    addresses (the last one repeats).
    """

    def __init__(self, answers: list[list[str]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def resolveHostName(
        self, receiver: Any, hostName: str, portNumber: int = 0, *a: Any, **k: Any
    ) -> Any:
        answer = self.answers[min(len(self.calls), len(self.answers) - 1)]
        self.calls.append(hostName)
        receiver.resolutionBegan(None)
        for host in answer:
            receiver.addressResolved(TwistedIPv4Address("TCP", host, portNumber))
        receiver.resolutionComplete()
        return None


class CheckedEndpointTests(SynchronousTestCase):
    """
    L{CheckedEndpoint} connects only to the addresses it checked.
    """

    def test_connects_to_checked_address(self) -> None:
        """
        The endpoint looks the name up once and connects to exactly the
        address it checked, although later lookups answer otherwise.
        """
        memory = MemoryReactorClock()
        resolver = ScriptedResolver([["127.0.0.2"], ["127.0.0.3"]])
        checked: list[Any] = []

        def check(address: Any) -> str | None:
            checked.append(address)
            return None if address == IPv4Address("127.0.0.2") else "not that one"

        endpoint = CheckedEndpoint(memory, resolver, "rebind.test", 80, check, 5.0)
        endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(resolver.calls, ["rebind.test"])
        self.assertEqual(checked, [IPv4Address("127.0.0.2")])
        self.assertEqual([c[:2] for c in memory.tcpClients], [("127.0.0.2", 80)])

    def test_refused_never_connects(self) -> None:
        """
        A refused address fails the connection attempt without connecting.
        """
        memory = MemoryReactorClock()
        resolver = ScriptedResolver([["127.0.0.3"]])
        endpoint = CheckedEndpoint(
            memory, resolver, "rebind.test", 80, lambda a: "refused", 5.0
        )
        failure = self.failureResultOf(endpoint.connect(Factory.forProtocol(Protocol)))
        failure.trap(AddressRefused)
        self.assertEqual(memory.tcpClients, [])

    def test_numeric_host_not_resolved(self) -> None:
        """
        A numeric host (C{0x7f000001}) is checked as the address it denotes.
        """
        memory = MemoryReactorClock()
        resolver = ScriptedResolver([["127.0.0.9"]])
        seen: list[Any] = []
        endpoint = CheckedEndpoint(
            memory, resolver, "0x7f000001", 80, lambda a: seen.append(a) or "no", 5.0
        )
        self.failureResultOf(endpoint.connect(Factory.forProtocol(Protocol)))
        self.assertEqual((seen, resolver.calls), ([IPv4Address("127.0.0.1")], []))


class FreshnessTests(SynchronousTestCase):
    """
    L{freshness} reads Cache-Control.
    """

    def test_directives(self) -> None:
        """
        max-age (less Age), s-maxage, no-cache, no-store and the default.
        """

        def f(**headers: str) -> float | None:
            return freshness(
                Headers({k.replace("_", "-"): [v] for k, v in headers.items()}), 5.0
            )

        self.assertEqual(f(), 5.0)
        self.assertEqual(f(cache_control="max-age=60"), 60.0)
        self.assertEqual(f(cache_control="public, max-age=60", age="10"), 50.0)
        self.assertEqual(f(cache_control="max-age=60, s-maxage=7"), 7.0)
        self.assertEqual(f(cache_control="no-cache, max-age=60"), 0.0)
        self.assertIsNone(f(cache_control="max-age=60, no-store"))
        self.assertEqual(f(cache_control="max-age=bogus"), 0.0)


class BypassTests(SynchronousTestCase):
    """
    L{bypasses_proxy} applies C{NO_PROXY}.
    """

    def test_entries(self) -> None:
        """
        Domains match themselves and subdomains, addresses match
        themselves, C{*} matches all, ports are ignored.
        """
        rules = ("localhost", ".internal.test", "127.0.0.1:8080", "[::1]")
        self.assertTrue(bypasses_proxy("localhost", rules))
        self.assertTrue(bypasses_proxy("a.internal.test", rules))
        self.assertTrue(bypasses_proxy("internal.test", rules))
        self.assertTrue(bypasses_proxy("127.0.0.1", rules))
        self.assertTrue(bypasses_proxy("::1", rules))
        self.assertFalse(bypasses_proxy("notlocalhost", rules))
        self.assertFalse(bypasses_proxy("127.0.0.2", rules))
        self.assertTrue(bypasses_proxy("anything", ("*",)))
        self.assertFalse(bypasses_proxy("anything", ()))


class TLSTests(FetcherTestsMixin, TestCase):
    """
    https origins are verified; C{cafile} adds a CA.
    """

    async def test_cafile(self) -> None:
        """
        An origin signed by a private CA is refused without C{cafile} and
        fetched with it.
        """
        origin, port, ca = self.origin(tls_names=["localhost", "127.0.0.1"])
        origin.serve("/h.py")
        cafile = self.mktemp()
        with open(cafile, "wb") as f:
            f.write(ca)
        url = f"https://127.0.0.1:{port}/h.py"
        await self.fails(
            self.fetcher(allow=(url,)),
            url,
            502,
            f"Unable to obtain HTTP handler code from {url}: "
            "TLS failure: certificate verify failed",
        )
        fetcher = self.fetcher(allow=(url, f"https://localhost:{port}/"), cafile=cafile)
        self.assertEqual((await fetcher.fetch(url)).source, SOURCE)
        localhost = f"https://localhost:{port}/h.py"
        self.assertEqual((await fetcher.fetch(localhost)).source, SOURCE)

    async def test_wrong_name(self) -> None:
        """
        A certificate for another name is refused.
        """
        origin, port, ca = self.origin(tls_names=["other.test"])
        origin.serve("/h.py")
        cafile = self.mktemp()
        with open(cafile, "wb") as f:
            f.write(ca)
        url = f"https://127.0.0.1:{port}/h.py"
        await self.fails(
            self.fetcher(allow=(url,), cafile=cafile),
            url,
            502,
            f"Unable to obtain HTTP handler code from {url}: "
            "TLS failure: the certificate does not name this host",
        )
        self.assertEqual(origin.counts, {})


class ProxyTests(FetcherTestsMixin, TestCase):
    """
    Fetching through a real tinyproxy on loopback.
    """

    def setUp(self) -> None:
        if shutil.which("tinyproxy") is None:
            raise self.skipTest(
                "tinyproxy is not installed (apt-get install tinyproxy)"
            )

    async def tinyproxy(self, extra: str = "") -> tuple[str, _Tinyproxy]:
        """
        Start tinyproxy on a free port.

        @return: its C{host:port} and its process protocol (with its log).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        os.chmod(directory, 0o777)
        port = _free_port()
        user = "User nobody\nGroup nogroup\n" if os.geteuid() == 0 else ""
        config = os.path.join(directory, "tinyproxy.conf")
        with open(config, "w") as f:
            f.write(
                f"{user}Port {port}\nListen 127.0.0.1\nTimeout 10\nMaxClients 20\n"
                f"Allow 127.0.0.1\nLogLevel Connect\n"
                f'ViaProxyName "haikutx-test"\n{extra}'
            )
        protocol = _Tinyproxy()
        process = reactor.spawnProcess(
            protocol,
            shutil.which("tinyproxy"),
            ["tinyproxy", "-d", "-c", config],
            env={"PATH": os.environ.get("PATH", "")},
        )

        async def stop() -> None:
            if not protocol.ended.called:
                process.signalProcess("TERM")
            await protocol.ended

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        for _ in range(100):
            if protocol.ended.called:
                self.fail(f"tinyproxy exited: {protocol.output!r}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await deferLater(reactor, 0.05)
        return f"127.0.0.1:{port}", protocol

    async def test_http_through_proxy(self) -> None:
        """
        http handlers are requested from the proxy in absolute form.
        """
        proxy, _ = await self.tinyproxy()
        origin, port, _ = self.origin()
        origin.serve("/h.py")
        url = f"http://127.0.0.1:{port}/h.py"
        fetcher = self.fetcher(allow=(url,), proxy=proxy)
        self.assertEqual(await fetcher.fetch(url), FetchedHandler(url, SOURCE, "miss"))
        via = origin.last_headers["/h.py"].getRawHeaders("via")
        self.assertIsNotNone(via)
        self.assertIn("haikutx-test", via[0])

    async def test_https_through_connect(self) -> None:
        """
        https handlers go through a CONNECT tunnel with TLS verified end to
        end.
        """
        proxy, log = await self.tinyproxy()
        origin, port, ca = self.origin(tls_names=["127.0.0.1"])
        origin.serve("/h.py")
        cafile = self.mktemp()
        with open(cafile, "wb") as f:
            f.write(ca)
        url = f"https://127.0.0.1:{port}/h.py"
        fetcher = self.fetcher(allow=(url,), proxy=proxy, cafile=cafile)
        self.assertEqual((await fetcher.fetch(url)).source, SOURCE)
        self.assertIsNone(origin.last_headers["/h.py"].getRawHeaders("via"))
        for _ in range(50):
            if f"CONNECT 127.0.0.1:{port}".encode() in log.output:
                break
            await deferLater(reactor, 0.02)
        self.assertIn(f"CONNECT 127.0.0.1:{port}".encode(), log.output)
        untrusted = self.fetcher(allow=(url,), proxy=proxy)
        error = await self.fails(untrusted, url, 502)
        self.assertIn("TLS failure", error.message)

    async def test_proxy_refuses_connect(self) -> None:
        """
        A proxy refusing CONNECT is a 502 naming the proxy's status.
        """
        proxy, _ = await self.tinyproxy("ConnectPort 1\n")
        origin, port, _ = self.origin(tls_names=["127.0.0.1"])
        origin.serve("/h.py")
        url = f"https://127.0.0.1:{port}/h.py"
        fetcher = self.fetcher(allow=(url,), proxy=proxy)
        await self.fails(
            fetcher,
            url,
            502,
            f"Unable to obtain HTTP handler code from {url}: "
            f"the proxy {proxy} refused CONNECT: 403 Access violation",
        )
        self.assertEqual(origin.counts, {})

    async def test_no_proxy(self) -> None:
        """
        Hosts in C{no_proxy} are fetched directly; others go to the proxy
        (here a closed port, so they fail).
        """
        origin, port, _ = self.origin()
        origin.serve("/h.py")
        proxy = f"127.0.0.1:{_free_port()}"
        url = f"http://127.0.0.1:{port}/h.py"
        direct = self.fetcher(allow=(url,), proxy=proxy, no_proxy=("127.0.0.1",))
        self.assertEqual((await direct.fetch(url)).source, SOURCE)
        proxied = self.fetcher(allow=(url,), proxy=proxy)
        await self.fails(
            proxied,
            url,
            502,
            f"Unable to obtain HTTP handler code from {url}: connection refused",
        )

    async def test_proxy_still_checks_addresses(self) -> None:
        """
        Through the proxy a loopback origin is still refused without a
        prefix naming it.
        """
        proxy, _ = await self.tinyproxy()
        origin, port, _ = self.origin()
        origin.serve("/h.py")
        fetcher = self.fetcher(proxy=proxy)
        await self.fails(fetcher, f"http://localhost:{port}/h.py", 403)
        await self.fails(fetcher, f"https://127.0.0.1:{port}/h.py", 403)
        self.assertEqual(origin.counts, {})


class _CannedProxy(Protocol):
    """
    A fake HTTP proxy: records what it is sent and, once a whole request
    head has arrived, writes its factory's canned answer.
    """

    def connectionMade(self) -> None:
        self.received = b""
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received and not getattr(self, "answered", False):
            self.answered = True
            self.transport.write(self.factory.answer)


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class TunnelAnswerTests(FetcherTestsMixin, TestCase):
    """
    The proxy's answer to C{CONNECT} is read by the strict HTTP/1.1 parser:
    a malformed head, a bare-LF head or a status other than 2xx is
    L{ProxyRefused} (a fake proxy on 127.0.0.1 gives each answer).
    """

    def proxy(self, answer: bytes) -> tuple[int, Factory]:
        factory = Factory.forProtocol(_CannedProxy)
        factory.answer = answer  # type: ignore[attr-defined]
        factory.connections = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, factory

    async def tunnel(self, answer: bytes) -> Any:
        port, factory = self.proxy(answer)

        async def target() -> str:
            return "127.0.0.1:9"

        endpoint = TunnelEndpoint(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port, 5),
            f"127.0.0.1:{port}",
            target,
        )
        inner = Factory.forProtocol(_Recorder)
        try:
            return await endpoint.connect(inner)
        finally:
            for connection in factory.connections:  # type: ignore[attr-defined]
                self.assertEqual(
                    connection.received,
                    b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n",
                )

    async def refused(self, answer: bytes) -> ProxyRefused:
        try:
            protocol = await self.tunnel(answer)
        except ProxyRefused as e:
            return e
        protocol.transport.abortConnection()
        self.fail(f"tunnel opened on {answer!r}")

    async def test_established(self) -> None:
        """
        A 200 opens the tunnel; bytes sent after the head reach the inner
        protocol.
        """
        protocol = await self.tunnel(b"HTTP/1.1 200 Connection established\r\n\r\nhello")
        for _ in range(100):
            if protocol.received:
                break
            await deferLater(reactor, 0.01)
        self.assertEqual(protocol.received, b"hello")
        protocol.transport.loseConnection()

    async def test_407(self) -> None:
        """
        A 407 is refused with the proxy's status line.
        """
        error = await self.refused(
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b"Proxy-Authenticate: Basic realm=x\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(error.status, "407 Proxy Authentication Required")

    async def test_malformed_head(self) -> None:
        """
        A status line that is not C{HTTP/1.x SP 3DIGIT SP reason}, obs-fold,
        or two C{Content-Length} fields are refused, not read leniently.
        """
        for answer in [
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"ICY 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        ]:
            error = await self.refused(answer)
            self.assertTrue(
                error.status.startswith("malformed answer to CONNECT: "), error.status
            )

    async def test_bare_lf(self) -> None:
        """
        A head whose lines end with LF alone is refused at once (without
        waiting for a CRLF CRLF that never comes).
        """
        error = await self.refused(b"HTTP/1.1 200 OK\n\n")
        self.assertEqual(error.status, "malformed answer to CONNECT: bare LF in the head")

    async def test_oversized(self) -> None:
        """
        A head that never ends is refused once it passes 16 KiB.
        """
        error = await self.refused(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20000)
        self.assertIn("oversized", error.status)

    async def test_fetch_through_407(self) -> None:
        """
        Through the fetcher, a 407 is a 502 naming the proxy and its status.
        """
        port, _ = self.proxy(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        url = "https://127.0.0.1:9/h.py"
        fetcher = self.fetcher(allow=(url,), proxy=f"127.0.0.1:{port}")
        await self.fails(
            fetcher,
            url,
            502,
            f"Unable to obtain HTTP handler code from {url}: the proxy "
            f"127.0.0.1:{port} refused CONNECT: 407 Proxy Authentication Required",
        )
