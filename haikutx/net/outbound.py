# -*- test-case-name: haikutx.test.test_fetch -*-
"""
Outgoing connections that check where they go: L{CheckedEndpoint} resolves a
name once, checks every address and connects only to checked addresses;
L{TunnelEndpoint} opens a C{CONNECT} tunnel through an HTTP proxy (wrap it
with L{twisted.internet.endpoints.wrapClientTLS} for https).
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import (
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from haikutx.net import http1
from haikutx.net.addresses import ip_from_host, parse_ip

Check = Callable[[IPv4Address | IPv6Address], "str | None"]

_MAX_PROXY_HEAD = 16384


class AddressRefused(Exception):
    """
    A name resolved to an address the rules refuse.

    @ivar reason: why, one line.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProxyRefused(Exception):
    """
    The proxy answered C{CONNECT} with something other than 2xx.

    @ivar proxy: the proxy's C{host:port}.
    @ivar status: the proxy's status line, e.g. C{403 Forbidden}.
    """

    def __init__(self, proxy: str, status: str) -> None:
        super().__init__(proxy, status)
        self.proxy = proxy
        self.status = status

    def __str__(self) -> str:
        return f"the proxy {self.proxy} refused CONNECT: {self.status}"


@implementer(IResolutionReceiver)
class _Collector:
    def __init__(self) -> None:
        self.addresses: list[IPv4Address | IPv6Address] = []
        self.done: Deferred[list[IPv4Address | IPv6Address]] = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(parse_ip(address.host))

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


async def resolve_checked(
    resolver: Any, host: str, port: int, check: Check
) -> list[IPv4Address | IPv6Address]:
    """
    Resolve C{host} once and check every address.

    @param resolver: an L{IHostnameResolver}.
    @param check: returns the reason an address is refused, or C{None}.
    @return: the addresses, all allowed, in the resolver's order.
    @raise AddressRefused: if any address is refused (a name that answers
        with both public and private addresses is refused).
    @raise DNSLookupError: if the name has no address.
    """
    literal = ip_from_host(host)
    if literal is not None:
        addresses = [literal]
    else:
        collector = _Collector()
        resolver.resolveHostName(collector, host, portNumber=port)
        addresses = list(dict.fromkeys(await collector.done))
    if not addresses:
        raise DNSLookupError(f"no address for {host}")
    for address in addresses:
        reason = check(address)
        if reason is not None:
            raise AddressRefused(reason)
    return addresses


@implementer(IStreamClientEndpoint)
class CheckedEndpoint:
    """
    Connects to C{host:port} after resolving C{host} once and checking each
    address, trying the checked addresses in turn.

    @param reactor: an L{IReactorTCP} and L{IReactorTime}.
    @param resolver: an L{IHostnameResolver}.
    @param host: a name or an IP address (numeric forms included).
    @param port: the port.
    @param check: returns the reason an address is refused, or C{None}.
    @param timeout: seconds allowed for each connection attempt.
    """

    def __init__(
        self,
        reactor: Any,
        resolver: Any,
        host: str,
        port: int,
        check: Check,
        timeout: float,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._host = host
        self._port = port
        self._check = check
        self._timeout = timeout

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        """
        Resolve, check and connect.

        @return: a L{Deferred} firing with the connected protocol, failing
            with L{AddressRefused} for a refused address.
        """
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: Any) -> Any:
        addresses = await resolve_checked(
            self._resolver, self._host, self._port, self._check
        )
        failure: Failure | None = None
        for address in addresses:
            kind = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
            endpoint = kind(self._reactor, str(address), self._port, self._timeout)
            try:
                return await endpoint.connect(factory)
            except ConnectError:
                failure = Failure()
        assert failure is not None
        failure.raiseException()


class _TunnelProtocol(Protocol):
    """
    Sends C{CONNECT}, reads the proxy's answer, then hands the connection to
    the protocol the tunnel was opened for.
    """

    transport: Any

    def __init__(self, target: str, proxy: str, factory: Any) -> None:
        self._target = target.encode("ascii")
        self._proxy = proxy
        self._factory = factory
        self._buffer = b""
        self._inner: Any = None
        self.established: Deferred[Any] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[Any]) -> None:
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionMade(self) -> None:
        self.transport.write(
            b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (self._target, self._target)
        )

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._buffer += data
        try:
            end = http1.head_end(self._buffer)
            if end < 0:
                if len(self._buffer) > _MAX_PROXY_HEAD:
                    raise http1.BadMessage("oversized response to CONNECT")
                return
            head = http1.parse_response_head(self._buffer[:end])
        except http1.BadMessage as e:
            self._fail(ProxyRefused(self._proxy, f"malformed answer to CONNECT: {e.reason}"))
            return
        rest = self._buffer[end:]
        self._buffer = b""
        if not 200 <= head.status < 300:
            status = f"{head.status} {head.reason.decode('latin-1')}".strip()
            self._fail(ProxyRefused(self._proxy, status[:120]))
            return
        self._inner = self._factory.buildProtocol(self.transport.getPeer())
        self._inner.makeConnection(self.transport)
        self.established.callback(self._inner)
        if rest:
            self._inner.dataReceived(rest)

    def _fail(self, error: Exception) -> None:
        if not self.established.called:
            self.established.errback(error)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._inner is not None:
            self._inner.connectionLost(reason)
        elif not self.established.called:
            self.established.errback(
                ProxyRefused(self._proxy, "connection closed before answering CONNECT")
            )


class _TunnelFactory(Factory):
    def __init__(self, target: str, proxy: str, factory: Any) -> None:
        self._target = target
        self._proxy = proxy
        self._factory = factory

    def buildProtocol(self, addr: Any) -> _TunnelProtocol:
        return _TunnelProtocol(self._target, self._proxy, self._factory)


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """
    A stream to C{target} through an HTTP proxy's C{CONNECT}.

    @param proxy_endpoint: connects to the proxy.
    @param proxy: the proxy's C{host:port}, for messages.
    @param target: a coroutine function returning the C{host:port} to ask
        the proxy for (it resolves and checks the origin's address first).
    """

    def __init__(
        self, proxy_endpoint: Any, proxy: str, target: Callable[[], Any]
    ) -> None:
        self._proxy_endpoint = proxy_endpoint
        self._proxy = proxy
        self._target = target

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        """
        Open the tunnel.

        @return: a L{Deferred} firing with C{protocolFactory}'s protocol once
            the proxy has answered 2xx, failing with L{ProxyRefused}
            otherwise.
        """
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: Any) -> Any:
        target = await self._target()
        tunnel = await self._proxy_endpoint.connect(
            _TunnelFactory(target, self._proxy, factory)
        )
        return await tunnel.established
