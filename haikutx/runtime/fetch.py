# -*- test-case-name: haikutx.test.test_fetch -*-
"""
The handler fetcher: obtains handler code from http and https URLs through a
bounded, HTTP-aware cache (L{haikutx.runtime.handler_cache}), with
redirects, size and time limits, address checks on every hop, and an
optional HTTP proxy (absolute-form requests for http, a C{CONNECT} tunnel
with end-to-end TLS verification for https).  What a handler URL may be and
the errors a fetch answers with are L{haikutx.runtime.handler_urls}'; the
HTTP client's parts, L{haikutx.runtime.download}'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import DNSLookupError
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ProxyAgent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from haikutx.interfaces import IHandlerFetcher
from haikutx.net.addresses import AddressRules
from haikutx.net.outbound import (
    AddressRefused,
    CheckedEndpoint,
    TunnelEndpoint,
    resolve_checked,
)
from haikutx.net.urls import redact_url
from haikutx.runtime.download import (
    ClosingPool,
    abandon,
    bypasses_proxy,
    discard,
    read_body,
    trust_root,
)
from haikutx.runtime.handler_cache import CacheEntry, HandlerCache
from haikutx.runtime.handler_urls import (
    UNSUPPORTED_PROTOCOL,
    HandlerFetchError,
    Target,
    describe_failure,
    parse_handler_url,
    too_large,
    unable,
    with_allow_hint,
)
from haikutx.runtime.handler_urls import refused as refused_url

__all__ = [
    "UNSUPPORTED_PROTOCOL",
    "FetchedHandler",
    "HandlerFetchError",
    "HandlerFetcher",
]

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
        self._timeout = timeout
        self._resolver = resolver if resolver is not None else reactor.nameResolver
        self._trust = trust_root(cafile)
        self._cache = HandlerCache(reactor, cache_bytes, cache_ttl)
        self._hops: dict[str, str] = {}
        self._expired: set[str] = set()
        self._inflight: dict[str, list[Deferred[FetchedHandler]]] = {}
        self._counters = dict.fromkeys(
            ("hits", "misses", "revalidations", "coalesced", "bytes", "errors"), 0
        )
        self._pool = ClosingPool(reactor, persistent=True)
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
            cached_bytes=self._cache.size,
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
        entry, fresh = self._cache.lookup(url)
        if entry is not None and fresh:
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
                    result = Failure(unable(url, describe_failure(result.value)))
                else:
                    result = Failure(
                        unable(
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

    async def _load(self, url: str, entry: CacheEntry | None) -> FetchedHandler:
        current = url
        for hop in range(MAX_REDIRECTS + 1):
            self._hops[url] = current
            target = parse_handler_url(current)
            refused = self._rules.check_url(
                target.scheme, target.host, target.port, target.target
            )
            if refused is not None:
                raise refused_url(current, refused)
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
                raise refused_url(current, with_allow_hint(e.reason, target)) from None
            except (HandlerFetchError, CancelledError):
                raise
            except Exception as e:
                raise unable(current, describe_failure(e)) from e
            code = response.code
            if code in REDIRECTS and hop < MAX_REDIRECTS:
                location = response.headers.getRawHeaders(b"location")
                await discard(response, self._max_size)
                if location:
                    current = urljoin(current, location[-1].decode("latin-1"))
                    continue
            if code == 304 and conditional:
                assert entry is not None
                await discard(response, self._max_size)
                self._counters["revalidations"] += 1
                self._cache.revalidated(url, entry, response.headers)
                return FetchedHandler(entry.final_url, entry.source, "revalidated")
            if code != 200:
                await discard(response, self._max_size)
                raise HandlerFetchError(
                    502,
                    f"HTTP error when obtaining handler code from {redact_url(current)}: "
                    f"{code}",
                )
            length = response.length
            if isinstance(length, int) and length > self._max_size:
                abandon(response)
                raise too_large(self._max_size)
            try:
                source = await read_body(response, self._max_size)
            except (HandlerFetchError, CancelledError):
                raise
            except Exception as e:
                raise unable(current, describe_failure(e)) from e
            self._counters["bytes"] += len(source)
            self._counters["misses"] += 1
            stored = self._cache.store(url, current, source, response.headers)
            return FetchedHandler(current, source, "miss" if stored else "off")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _request(self, target: Target, headers: Headers) -> IResponse:
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
