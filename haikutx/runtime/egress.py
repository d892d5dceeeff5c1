# -*- test-case-name: haikutx.test.test_egress -*-
"""
The egress proxy (SPEC 3.2): the only way out of a zygote's network
namespace.

A handler's connection to the relay inside the namespace
(L{haikutx.sandbox.netns.EgressRelay}) arrives as a descriptor passed over
a unix socketpair (L{haikutx.runtime.egress_channel}); it is adopted and
served by L{EgressProxy}, an HTTP proxy that understands (requests read by
L{haikutx.runtime.egress_request}):

  - C{CONNECT host:port HTTP/1.1}: answered C{200 Connection established},
    then bytes are spliced both ways (TLS and raw TCP alike);
  - absolute-form plain HTTP (C{GET http://host:port/path HTTP/1.1}): the
    request is sent upstream with an origin-form target and
    C{Connection: close}, then bytes are spliced both ways until either side
    closes. There is one upstream per client connection: the connection
    ends when the upstream closes after its response, so a keep-alive
    client opens a new connection for its next request. Anything a client
    pipelines after the first request goes to the same, already checked,
    upstream.

Every destination is resolved I{here} (the namespace has no DNS), each
address is checked with L{EgressRules} and only checked addresses are
connected to (L{CheckedEndpoint}): loopback, private, link-local and
metadata addresses are refused with C{403 Forbidden} and a one-line reason
unless C{--egress-allow} names the C{host:port}. A name that does not
resolve or a destination that does not answer gets C{502 Bad Gateway}; a
destination that takes longer than the timeout, C{504 Gateway Timeout}; a
malformed request, C{400 Bad Request}; a request head larger than the
bound, C{431}; a head that does not arrive in time, C{408}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from haikutx.net.addresses import EgressRules
from haikutx.net.http1 import (
    BadMessage,
    head_end,
    simple_response,
)
from haikutx.net.outbound import AddressRefused, CheckedEndpoint
from haikutx.runtime.egress_request import BadRequest, parse_head

#: The largest request head (request line and headers) accepted, in bytes.
MAX_HEAD = 16384

#: Connections a zygote's handlers may have open through its relay at once.
MAX_CONNECTIONS = 64



class _Upstream(Protocol):
    """
    The connection to the destination: hands what it receives to the
    client side.
    """

    transport: Any

    def __init__(self, proxy: EgressProxy) -> None:
        self._proxy = proxy

    def dataReceived(self, data: bytes) -> None:
        self._proxy._from_upstream(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._proxy._upstream_lost()


@implementer(IHalfCloseableProtocol)
class EgressProxy(Protocol):
    """
    One handler connection: read the request head, check and connect to the
    destination, then splice.

    A client that shuts down its writing (a half-close) has the upstream's
    writing shut down too, once what it sent is delivered, and still gets
    the answer; when the upstream closes, the client's connection is closed
    once what the upstream sent is delivered.
    """

    log = Logger()
    transport: Any

    def __init__(self, factory: EgressProxyFactory) -> None:
        self._factory = factory
        self._reactor = factory.reactor
        self._buffer = b""
        self._state = "head"
        self._timer: Any = None
        self._connecting: Deferred[Any] | None = None
        self._timed_out = False
        self._upstream: _Upstream | None = None
        self._target: tuple[str, int] | None = None
        self._client_eof = False
        self._client_gone = False
        self._upstream_gone = False

    # client side

    def connectionMade(self) -> None:
        self._factory._opened(self)
        self._timer = self._reactor.callLater(
            self._factory.head_timeout, self._head_timed_out
        )

    def dataReceived(self, data: bytes) -> None:
        if self._state == "splice":
            assert self._upstream is not None
            self._touch()
            self._upstream.transport.write(data)
            return
        if self._state == "closed":
            return
        self._buffer += data
        if self._state != "head":
            return
        try:
            end = head_end(self._buffer)
        except BadMessage as e:
            self._refuse(e.status, e.reason, None)
            return
        if end < 0:
            if len(self._buffer) > self._factory.max_head:
                self._refuse(431, "the request head is too large", None)
            return
        if end - 4 > self._factory.max_head:
            self._refuse(431, "the request head is too large", None)
            return
        head, self._buffer = self._buffer[: end - 4], self._buffer[end:]
        try:
            _, host, port, upstream_head = parse_head(head)
        except BadRequest as e:
            self._refuse(e.status, e.reason, None)
            return
        self._target = (host, port)
        self._state = "connecting"
        self._cancel_timer()
        self.transport.pauseProducing()
        self._timer = self._reactor.callLater(
            self._factory.timeout, self._connect_timed_out
        )
        self._connecting = Deferred.fromCoroutine(self._connect(host, port))
        self._connecting.addCallbacks(
            lambda upstream: self._splice(upstream, upstream_head),
            self._connect_failed,
        )
        self._connecting.addErrback(
            lambda f: self.log.failure("egress proxy bug", f, host=host, port=port)
        )

    def readConnectionLost(self) -> None:
        """
        The client shut down its writing: pass it on once spliced; before
        that, the request is abandoned.
        """
        if self._client_eof:
            return
        self._client_eof = True
        if self._state == "splice":
            assert self._upstream is not None
            self._upstream.transport.loseWriteConnection()
        elif self._state == "head":
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        state, self._state = self._state, "closed"
        self._cancel_timer()
        if state == "connecting" and self._connecting is not None:
            self._connecting.cancel()
        if self._upstream is not None:
            self._upstream.transport.loseConnection()
        self._client_gone = True
        self._maybe_done()

    # connecting

    async def _connect(self, host: str, port: int) -> _Upstream:
        rules = self._factory.rules
        endpoint = CheckedEndpoint(
            self._reactor,
            self._factory.resolver,
            host.strip("[]"),
            port,
            lambda address: rules.check(host, port, address),
            self._factory.timeout,
        )
        factory = Factory.forProtocol(lambda: _Upstream(self))
        factory.noisy = False
        upstream: _Upstream = await endpoint.connect(factory)
        return upstream

    def _splice(self, upstream: _Upstream, upstream_head: bytes | None) -> None:
        assert self._target is not None
        host, port = self._target
        if self._state != "connecting":
            self._factory._opened(self)
            self._upstream = upstream
            upstream.transport.abortConnection()
            return
        self._cancel_timer()
        self._state = "splice"
        self._upstream = upstream
        self.log.info(
            "egress to {host}:{port} allowed",
            host=host,
            port=port,
            method="CONNECT" if upstream_head is None else "HTTP",
        )
        upstream.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(upstream.transport, True)
        if upstream_head is None:
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            upstream.transport.write(upstream_head)
        pending, self._buffer = self._buffer, b""
        if pending:
            upstream.transport.write(pending)
        self._timer = self._reactor.callLater(
            self._factory.idle_timeout, self._idle_timed_out
        )
        if self._client_eof:
            upstream.transport.loseWriteConnection()
        else:
            self.transport.resumeProducing()

    def _connect_failed(self, failure: Failure) -> None:
        assert self._target is not None
        host, port = self._target
        if self._state == "closed":
            return
        if self._timed_out:
            self._refuse(504, f"{host}:{port} did not answer in time", failure)
        elif failure.check(AddressRefused):
            self._refuse(403, failure.value.reason, failure)
        elif failure.check(DNSLookupError):
            self._refuse(502, f"cannot resolve {host}", failure)
        elif failure.check(ConnectError):
            self._refuse(
                502,
                f"cannot connect to {host}:{port}: {failure.getErrorMessage()}",
                failure,
            )
        else:
            self.log.failure(
                "egress to {host}:{port} failed", failure, host=host, port=port
            )
            self._refuse(502, f"cannot connect to {host}:{port}", None)

    # splicing

    def _from_upstream(self, data: bytes) -> None:
        self._touch()
        self.transport.write(data)

    def _upstream_lost(self) -> None:
        self._upstream_gone = True
        self._cancel_timer()
        self.transport.loseConnection()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._client_gone and (self._upstream is None or self._upstream_gone):
            self._factory._closed(self)

    def abort(self) -> None:
        """
        Abort the client's connection and the upstream one.
        """
        self._cancel_timer()
        self.transport.abortConnection()
        if self._upstream is not None:
            self._upstream.transport.abortConnection()

    def _touch(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._factory.idle_timeout)

    # timeouts and answers

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        self._refuse(408, "the request head did not arrive in time", None)

    def _connect_timed_out(self) -> None:
        self._timer = None
        self._timed_out = True
        if self._connecting is not None:
            self._connecting.cancel()

    def _idle_timed_out(self) -> None:
        self._timer = None
        host, port = self._target or ("", 0)
        self.log.info(
            "egress to {host}:{port} closed after {idle_timeout}s idle",
            host=host,
            port=port,
            idle_timeout=self._factory.idle_timeout,
        )
        self.transport.abortConnection()
        if self._upstream is not None:
            self._upstream.transport.abortConnection()

    def _refuse(self, status: int, reason: str, failure: Failure | None) -> None:
        host, port = self._target or ("", 0)
        self.log.warn(
            "egress to {host}:{port} refused with {status}: {reason}",
            host=host,
            port=port,
            status=status,
            reason=reason,
        )
        self._cancel_timer()
        self._state = "closed"
        self._buffer = b""
        body = (reason.replace("\r", " ").replace("\n", " ") + "\n").encode("utf-8")
        self.transport.write(simple_response(status, body))
        self.transport.loseConnection()


class EgressProxyFactory(Factory):
    """
    Builds an L{EgressProxy} for each handler connection.

    @ivar reactor: an L{IReactorTCP} and L{IReactorTime}.
    @ivar rules: which non-public C{host:port} pairs may be reached.
    @ivar resolver: an L{IHostnameResolver}; the reactor's by default.
    @ivar timeout: seconds allowed to resolve and connect to a destination.
    @ivar head_timeout: seconds allowed for the request head to arrive.
    @ivar idle_timeout: seconds a spliced connection may carry nothing
        either way before both sides are closed.
    @ivar max_head: the largest request head accepted, in bytes.
    @ivar max_connections: the most connections open at once; one more
        passed over a relay channel is closed at once (each holds a
        descriptor of the server: a stdio handler's processes could
        otherwise hold a thousand).
    """

    def __init__(
        self,
        reactor: Any,
        rules: EgressRules,
        resolver: Any = None,
        timeout: float = 10.0,
        head_timeout: float = 10.0,
        idle_timeout: float = 600.0,
        max_head: int = MAX_HEAD,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.reactor = reactor
        self.max_connections = max_connections
        self.rules = rules
        self.resolver = resolver if resolver is not None else reactor.nameResolver
        self.timeout = timeout
        self.head_timeout = head_timeout
        self.idle_timeout = idle_timeout
        self.max_head = max_head
        self._live: set[EgressProxy] = set()
        self._idle_waiters: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> EgressProxy:
        proxy = EgressProxy(self)
        proxy.factory = self
        return proxy

    @property
    def connections(self) -> int:
        """
        How many client connections are open (with their upstreams).
        """
        return len(self._live)

    def _opened(self, proxy: EgressProxy) -> None:
        self._live.add(proxy)

    def _closed(self, proxy: EgressProxy) -> None:
        self._live.discard(proxy)
        if not self._live:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def when_idle(self) -> Deferred[None]:
        """
        @return: a L{Deferred} firing once no connection is open (at once
            if none is).
        """
        if not self._live:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def abort_all(self) -> None:
        """
        Abort every open connection and its upstream.
        """
        for proxy in list(self._live):
            proxy.abort()
