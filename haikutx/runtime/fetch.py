# -*- test-case-name: haikutx.test.test_fetch -*-
"""
The handler fetcher: obtains handler code from http and https URLs through a
bounded, HTTP-aware cache, with redirects, size and time limits, address
checks on every hop, and an optional HTTP proxy (absolute-form requests for
http, a C{CONNECT} tunnel with end-to-end TLS verification for https).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from attrs import define, frozen
from OpenSSL import SSL

# IOpenSSLTrustRoot is how Twisted lets a trust root add CAs to a context;
# it has no public import path, and platformTrust() can only replace.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import (
    ConnectError,
    ConnectionClosed,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ProxyAgent,
    ResponseDone,
    ResponseFailed,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from haikutx.interfaces import IHandlerFetcher
from haikutx.net.addresses import AddressRules
from haikutx.net.outbound import (
    AddressRefused,
    CheckedEndpoint,
    ProxyRefused,
    TunnelEndpoint,
    resolve_checked,
)
from haikutx.net.urls import redact_url

UNSUPPORTED_PROTOCOL = (
    "The x-haiku-handler parameter specifies unsupported protocol. "
    "Only http and https are supported."
)
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 3
_USER_AGENT = b"haikutx"


@frozen
class FetchedHandler:
    """
    Handler code obtained from a URL.

    @ivar url: the final URL, after redirects.
    @ivar source: the code.
    @ivar cache: C{hit} (fresh in the cache), C{miss} (downloaded),
        C{revalidated} (the origin answered 304 to a conditional request) or
        C{off} (the cache is disabled).
    """

    url: str
    source: bytes
    cache: str


class HandlerFetchError(Exception):
    """
    The handler could not be fetched: the runtime answers C{status} with the
    one-line C{message}.
    """

    def __init__(self, status: int, message: str) -> None:
        message = " ".join(message.split())
        super().__init__(status, message)
        self.status = status
        self.message = message


def _refused(url: str, reason: str) -> HandlerFetchError:
    return HandlerFetchError(
        403, f"The handler URL {redact_url(url)} is not allowed: {reason}"
    )


def _unable(url: str, error: str) -> HandlerFetchError:
    return HandlerFetchError(
        502, f"Unable to obtain HTTP handler code from {redact_url(url)}: {error}"
    )


def _with_allow_hint(reason: str, target: _Target) -> str:
    """
    The reason a handler URL's address was refused, with the C{--allow}
    prefix that would allow it (the operator's choice, for handlers served
    from this machine or a private network).
    """
    host = f"[{target.host}]" if ":" in target.host else target.host
    return (
        f"{reason}; the server allows it when started with "
        f"--allow {target.scheme}://{host}:{target.port}/"
    )


def _too_large(max_size: int) -> HandlerFetchError:
    return HandlerFetchError(
        400, f"The size of the handler exceeded the quota of {max_size} bytes."
    )


@frozen
class _Target:
    url: str
    scheme: str
    host: str
    port: int
    target: str


def _parse(url: str) -> _Target:
    """
    Split a handler URL, refusing what the HTTP client would read otherwise
    than these rules (credentials, bad ports).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise HandlerFetchError(
            400, f"The handler URL {redact_url(url)} is not a valid URL."
        ) from None
    if parts.scheme not in ("http", "https"):
        raise HandlerFetchError(400, UNSUPPORTED_PROTOCOL)
    if (
        not parts.hostname
        or "@" in parts.netloc
        or any(c.isspace() or c == "\\" for c in url)
        or not url.isascii()
    ):
        raise HandlerFetchError(400, f"The handler URL {redact_url(url)} is not a valid URL.")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return _Target(
        url=url,
        scheme=parts.scheme,
        host=parts.hostname.lower(),
        port=port or (443 if parts.scheme == "https" else 80),
        target=target,
    )


def _describe(error: BaseException) -> str:
    """
    One line naming why a fetch failed.
    """
    if isinstance(error, ResponseFailed) or hasattr(error, "reasons"):
        reasons = [_describe(r.value) for r in getattr(error, "reasons", [])]
        return "; ".join(dict.fromkeys(reasons)) or type(error).__name__
    if isinstance(error, ProxyRefused):
        return str(error)
    if isinstance(error, SSL.Error):
        details = []
        for item in error.args[0] if error.args else []:
            details.append(item[-1] if isinstance(item, tuple) else str(item))
        return "TLS failure: " + (", ".join(details) or "handshake failed")
    name = type(error).__name__
    if name in ("VerificationError", "CertificateError"):
        return "TLS failure: the certificate does not name this host"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, DNSLookupError):
        return "DNS lookup failed"
    if isinstance(error, TimeoutError):
        return "connection timed out"
    if isinstance(error, ConnectionClosed):
        return "connection closed by the origin"
    if isinstance(error, ConnectError):
        return f"cannot connect: {error}"
    return f"{name}: {error}"


def bypasses_proxy(host: str, no_proxy: tuple[str, ...]) -> bool:
    """
    Whether C{host} is reached directly although a proxy is set, by the
    usual C{NO_PROXY} rules: C{*} matches every host, C{example.com} and
    C{.example.com} match it and its subdomains, an IP address matches
    itself; a C{:port} suffix is ignored.

    @param host: a URL host, lower case, without brackets.
    @param no_proxy: the C{NO_PROXY} entries.
    """
    host = host.strip("[]").lower().rstrip(".")
    for entry in no_proxy:
        entry = entry.strip().lower()
        if entry == "*":
            return True
        if entry.startswith("["):
            entry = entry[1:].split("]", 1)[0]
        elif entry.count(":") == 1:
            entry = entry.split(":", 1)[0]
        entry = entry.lstrip(".").rstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """
    The endpoint for each origin: checked direct connections, or CONNECT
    tunnels through the proxy, wrapped in verified TLS for https.
    """

    def __init__(self, fetcher: HandlerFetcher) -> None:
        self._fetcher = fetcher

    def endpointForURI(self, uri: Any) -> Any:
        f = self._fetcher
        scheme = uri.scheme.decode("ascii")
        host = uri.host.decode("ascii").strip("[]").lower()
        port = uri.port

        def check(address: Any) -> str | None:
            return f._rules.check_address(scheme, host, port, address)

        if f._proxy_endpoint is not None and not bypasses_proxy(host, f._no_proxy):

            async def target() -> str:
                return await f._tunnel_target(host, port, check)

            endpoint: Any = TunnelEndpoint(f._proxy_endpoint, f._proxy or "", target)
        else:
            endpoint = CheckedEndpoint(
                f._reactor, f._resolver, host, port, check, f._timeout
            )
        if scheme == "https":
            return wrapClientTLS(
                optionsForClientTLS(host, trustRoot=f._trust), endpoint
            )
        return endpoint


@define
class _Entry:
    final_url: str
    source: bytes
    etag: bytes | None
    last_modified: bytes | None
    expires: float

    def size(self, url: str) -> int:
        return len(self.source) + len(url) + len(self.final_url) + 256


def _directives(headers: Headers) -> dict[str, str]:
    result: dict[str, str] = {}
    for value in headers.getRawHeaders(b"cache-control", []):
        for item in value.decode("latin-1").split(","):
            name, _, argument = item.strip().partition("=")
            if name:
                result[name.lower()] = argument.strip().strip('"')
    return result


def freshness(headers: Headers, default_ttl: float) -> float | None:
    """
    How long a response stays fresh, from its C{Cache-Control} (C{s-maxage},
    C{max-age}, C{no-cache}, C{no-store}) and C{Age}.

    @param headers: the response headers.
    @param default_ttl: the freshness when the origin says nothing.
    @return: seconds, or C{None} when the response must not be stored.
    """
    directives = _directives(headers)
    if "no-store" in directives:
        return None
    if "no-cache" in directives:
        return 0.0
    for name in ("s-maxage", "max-age"):
        if name in directives:
            try:
                lifetime = float(int(directives[name]))
            except ValueError:
                return 0.0
            try:
                age = float(int(headers.getRawHeaders(b"age", [b"0"])[-1]))
            except ValueError:
                age = 0.0
            return max(0.0, lifetime - age)
    return default_ttl


class _Body(Protocol):
    """
    Collects a response body of at most C{max_size} bytes; aborts the
    download at the first byte over it.
    """

    transport: Any

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[bytes]) -> None:
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._max_size:
            self.done.errback(_too_large(self._max_size))
            self._abort()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


async def _read(response: IResponse, max_size: int) -> bytes:
    body = _Body(max_size)
    response.deliverBody(body)
    return await body.done


def _abandon(response: IResponse) -> None:
    body = _Body(0)
    response.deliverBody(body)
    body.done.addErrback(lambda f: None)
    body.done.cancel()


async def _discard(response: IResponse, max_size: int) -> None:
    try:
        await _read(response, max_size)
    except CancelledError:
        raise
    except Exception:
        pass


class _QuietClientFactory(_HTTP11ClientFactory):
    """
    The pool's connection factory, without a log line per connection.
    """

    noisy = False


class _Pool(HTTPConnectionPool):
    """
    A connection pool that takes no connection back once closed: a response
    that completes after L{HandlerFetcher.close} (or after its download was
    abandoned mid-packet) is closed instead of waiting in the pool.
    """

    _factory = _QuietClientFactory
    closed = False

    def _putConnection(self, key: Any, connection: Any) -> None:
        if self.closed or getattr(connection.transport, "disconnecting", False):
            connection.transport.loseConnection()
            return
        super()._putConnection(key, connection)


@implementer(IHandlerFetcher)
class HandlerFetcher:
    """
    Fetches handler code by URL through a bounded in-memory cache.

    @param reactor: the reactor (TCP, time, name resolution).
    @param max_size: largest handler accepted, in bytes (C{--maxsize}).
    @param allow: C{--allow} URL prefixes.
    @param proxy: C{host:port} of an HTTP proxy, or C{None}.
    @param no_proxy: hosts reached directly although C{proxy} is set
        (C{NO_PROXY} entries, see L{bypasses_proxy}).
    @param cafile: PEM file of extra CA certificates trusted for https, on
        top of the system's.
    @param cache_ttl: freshness in seconds of a handler whose origin gives
        no caching headers (C{--cache-ttl}).
    @param cache_bytes: bound of the cache in bytes; 0 turns it off.
    @param timeout: seconds one fetch (all hops, connect and download
        included) may take.
    @param resolver: an L{IHostnameResolver} (default: the reactor's).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        max_size: int,
        allow: tuple[str, ...] | list[str] = (),
        proxy: str | None = None,
        no_proxy: tuple[str, ...] = (),
        cafile: Path | str | None = None,
        cache_ttl: float = 5.0,
        cache_bytes: int = 32 * 1024 * 1024,
        timeout: float = 10.0,
        resolver: Any = None,
    ) -> None:
        self._reactor = reactor
        self._max_size = max_size
        self._rules = AddressRules.from_prefixes(tuple(allow))
        self._proxy = proxy
        self._no_proxy = tuple(no_proxy)
        self._cache_ttl = cache_ttl
        self._cache_bytes = cache_bytes
        self._timeout = timeout
        self._resolver = resolver if resolver is not None else reactor.nameResolver
        self._trust = _trust(cafile)
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._cached_bytes = 0
        self._hops: dict[str, str] = {}
        self._expired: set[str] = set()
        self._inflight: dict[str, list[Deferred[FetchedHandler]]] = {}
        self._counters = dict.fromkeys(
            ("hits", "misses", "revalidations", "coalesced", "bytes", "errors"), 0
        )
        self._pool = _Pool(reactor, persistent=True)
        self._pool.cachedConnectionTimeout = 30
        self._proxy_endpoint: Any = None
        self._proxy_agent: Any = None
        if proxy is not None:
            host, _, port = proxy.rpartition(":")
            self._proxy_endpoint = HostnameEndpoint(
                reactor, host.strip("[]"), int(port), timeout=timeout
            )
            self._proxy_agent = ProxyAgent(self._proxy_endpoint, reactor, self._pool)
        self._agent = Agent.usingEndpointFactory(reactor, _Endpoints(self), self._pool)

    @classmethod
    def from_config(cls, reactor: Any, config: Any, **kwargs: Any) -> HandlerFetcher:
        """
        The fetcher C{twistd haiku} asks for.

        @param reactor: the reactor.
        @param config: a L{haikutx.config.Config} (C{--maxsize}, C{--allow},
            C{--proxy} and C{NO_PROXY}, C{--cafile}, C{--cache-ttl}).
        @param kwargs: further keyword arguments (C{cache_bytes},
            C{timeout}, C{resolver}).
        """
        return cls(
            reactor,
            max_size=config.limits.max_size,
            allow=config.allow,
            proxy=config.proxy,
            no_proxy=config.no_proxy,
            cafile=config.cafile,
            cache_ttl=config.cache_ttl,
            **kwargs,
        )

    def counters(self) -> dict[str, int]:
        """
        The counters: C{hits}, C{misses}, C{revalidations}, C{coalesced}
        (fetches that shared another's download), C{bytes} (downloaded
        from origins), C{errors} (failed origin fetches), and C{cached_bytes}
        and C{cached_handlers} (the cache's current size).
        """
        return dict(
            self._counters,
            cached_bytes=self._cached_bytes,
            cached_handlers=len(self._cache),
        )

    def close(self) -> Deferred[None]:
        """
        Close the pooled connections; none is pooled afterwards.
        """
        self._pool.closed = True
        return self._pool.closeCachedConnections()

    def fetch(self, url: str) -> Deferred[FetchedHandler]:
        """
        Fetch the handler at C{url}: fresh from the cache, or from its
        origin (one download shared by concurrent fetches of C{url}).

        @return: a L{Deferred} firing with a L{FetchedHandler} or failing
            with L{HandlerFetchError}.
        """
        return Deferred.fromCoroutine(self._fetch(url))

    async def _fetch(self, url: str) -> FetchedHandler:
        entry = self._cache.get(url)
        if entry is not None and self._reactor.seconds() < entry.expires:
            self._cache.move_to_end(url)
            self._counters["hits"] += 1
            return FetchedHandler(entry.final_url, entry.source, "hit")
        waiter: Deferred[FetchedHandler] = Deferred()
        if url in self._inflight:
            self._counters["coalesced"] += 1
            self._inflight[url].append(waiter)
        else:
            self._inflight[url] = [waiter]
            loading = Deferred.fromCoroutine(self._load(url, entry))
            timer = self._reactor.callLater(self._timeout, self._expire, url, loading)
            loading.addBoth(self._settle, url, timer)
        return await waiter

    def _expire(self, url: str, loading: Deferred[FetchedHandler]) -> None:
        self._expired.add(url)
        loading.cancel()

    def _settle(self, result: FetchedHandler | Failure, url: str, timer: Any) -> None:
        if timer.active():
            timer.cancel()
        expired = url in self._expired
        self._expired.discard(url)
        if isinstance(result, Failure):
            self._counters["errors"] += 1
            if expired or not result.check(HandlerFetchError):
                if not expired:
                    self.log.failure(
                        "fetching {handler_url}", result, handler_url=redact_url(url)
                    )
                    result = Failure(_unable(url, _describe(result.value)))
                else:
                    result = Failure(
                        _unable(
                            self._hops.get(url, url),
                            f"timed out after {self._timeout:g} s",
                        )
                    )
            error = result.value
            self.log.info(
                "fetching {handler_url} failed: {status} {reason}",
                handler_url=redact_url(url),
                status=error.status,
                reason=error.message,
            )
        else:
            self.log.info(
                "fetched {handler_url} ({cache}, {size} bytes from {final_url})",
                handler_url=redact_url(url),
                cache=result.cache,
                size=len(result.source),
                final_url=result.url,
            )
        self._hops.pop(url, None)
        for waiter in self._inflight.pop(url, []):
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _tunnel_target(self, host: str, port: int, check: Any) -> str:
        """
        What to ask the proxy to CONNECT to: the checked address of
        C{host}, so that the proxy connects where the rules allow; the
        name itself when this machine cannot resolve it (the proxy then
        resolves it).
        """
        try:
            addresses = await resolve_checked(self._resolver, host, port, check)
        except DNSLookupError:
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        first = addresses[0]
        return f"[{first}]:{port}" if first.version == 6 else f"{first}:{port}"

    async def _load(self, url: str, entry: _Entry | None) -> FetchedHandler:
        current = url
        for hop in range(MAX_REDIRECTS + 1):
            self._hops[url] = current
            target = _parse(current)
            refused = self._rules.check_url(
                target.scheme, target.host, target.port, target.target
            )
            if refused is not None:
                raise _refused(current, refused)
            headers = Headers({b"user-agent": [_USER_AGENT]})
            conditional = entry is not None and entry.final_url == current
            if conditional:
                assert entry is not None
                if entry.etag is not None:
                    headers.setRawHeaders(b"if-none-match", [entry.etag])
                if entry.last_modified is not None:
                    headers.setRawHeaders(b"if-modified-since", [entry.last_modified])
            try:
                response = await self._request(target, headers)
            except AddressRefused as e:
                raise _refused(current, _with_allow_hint(e.reason, target)) from None
            except (HandlerFetchError, CancelledError):
                raise
            except Exception as e:
                raise _unable(current, _describe(e)) from e
            code = response.code
            if code in REDIRECTS and hop < MAX_REDIRECTS:
                location = response.headers.getRawHeaders(b"location")
                await _discard(response, self._max_size)
                if location:
                    current = urljoin(current, location[-1].decode("latin-1"))
                    continue
            if code == 304 and conditional:
                assert entry is not None
                await _discard(response, self._max_size)
                self._counters["revalidations"] += 1
                self._revalidated(url, entry, response.headers)
                return FetchedHandler(entry.final_url, entry.source, "revalidated")
            if code != 200:
                await _discard(response, self._max_size)
                raise HandlerFetchError(
                    502,
                    f"HTTP error when obtaining handler code from {redact_url(current)}: "
                    f"{code}",
                )
            length = response.length
            if isinstance(length, int) and length > self._max_size:
                _abandon(response)
                raise _too_large(self._max_size)
            try:
                source = await _read(response, self._max_size)
            except (HandlerFetchError, CancelledError):
                raise
            except Exception as e:
                raise _unable(current, _describe(e)) from e
            self._counters["bytes"] += len(source)
            self._counters["misses"] += 1
            stored = self._store(url, current, source, response.headers)
            return FetchedHandler(current, source, "miss" if stored else "off")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _request(self, target: _Target, headers: Headers) -> IResponse:
        uri = target.url.encode("ascii")
        if (
            self._proxy_agent is not None
            and target.scheme == "http"
            and not bypasses_proxy(target.host, self._no_proxy)
        ):
            # The proxy resolves the name itself; check what this machine
            # sees first (best effort, see doc/loader.md).
            await self._tunnel_target(
                target.host,
                target.port,
                lambda a: self._rules.check_address(
                    target.scheme, target.host, target.port, a
                ),
            )
            return await self._proxy_agent.request(b"GET", uri, headers)
        return await self._agent.request(b"GET", uri, headers)

    def _store(self, url: str, final_url: str, source: bytes, headers: Headers) -> bool:
        """
        Keep a downloaded handler if the cache is on and the origin allows.

        @return: whether the cache is on.
        """
        if self._cache_bytes <= 0:
            return False
        self._forget(url)
        lifetime = freshness(headers, self._cache_ttl)
        if lifetime is None:
            return True
        entry = _Entry(
            final_url=final_url,
            source=source,
            etag=_last(headers, b"etag"),
            last_modified=_last(headers, b"last-modified"),
            expires=self._reactor.seconds() + lifetime,
        )
        size = entry.size(url)
        if size > self._cache_bytes:
            return True
        self._cache[url] = entry
        self._cached_bytes += size
        while self._cached_bytes > self._cache_bytes:
            old_url, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.size(old_url)
        return True

    def _forget(self, url: str) -> None:
        old = self._cache.pop(url, None)
        if old is not None:
            self._cached_bytes -= old.size(url)

    def _revalidated(self, url: str, entry: _Entry, headers: Headers) -> None:
        lifetime = freshness(headers, self._cache_ttl)
        if lifetime is None:
            self._forget(url)
            return
        entry.expires = self._reactor.seconds() + lifetime
        etag = headers.getRawHeaders(b"etag")
        if etag:
            entry.etag = etag[-1]
        modified = headers.getRawHeaders(b"last-modified")
        if modified:
            entry.last_modified = modified[-1]
        if url in self._cache:
            self._cache.move_to_end(url)


def _last(headers: Headers, name: bytes) -> bytes | None:
    values = headers.getRawHeaders(name)
    return values[-1] if values else None


def _trust(cafile: Path | str | None) -> Any:
    """
    The trust root for https origins: the system's CAs, plus those in
    C{cafile}.
    """
    if cafile is None:
        return platformTrust()
    from cryptography import x509
    from OpenSSL import crypto

    certificates = [
        crypto.X509.from_cryptography(c)
        for c in x509.load_pem_x509_certificates(Path(cafile).read_bytes())
    ]
    return _SystemAndExtraTrust(certificates)


@implementer(IOpenSSLTrustRoot)
class _SystemAndExtraTrust:
    """
    Trust the system's CAs and these extra certificates.
    """

    def __init__(self, certificates: list[Any]) -> None:
        self._certificates = certificates

    def _addCACertsToContext(self, context: Any) -> None:
        context.set_default_verify_paths()
        store = context.get_cert_store()
        for certificate in self._certificates:
            store.add_cert(certificate)
