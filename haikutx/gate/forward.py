# -*- test-case-name: haikutx.test.test_gate -*-
"""
The gate's HTTP/1.1 forwarding: one L{GateProtocol} per client connection.

Each request head is parsed strictly (L{haikutx.net.http1}) and routed by
its own path, so every request of a kept-alive connection may go to another
application. Bodies pass through as bytes, framed by their
C{Content-Length} or checked chunked encoding, with two-way flow control:
the side that reads is paused while the side that writes has more than one
transport buffer queued. Nothing holds a whole body. After a C{101}
response the connection becomes a raw tunnel (WebSocket).

The connection's states are L{State}; L{GateProtocol._move} is the one
place they change, and it refuses a transition L{TRANSITIONS} does not list.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from haikutx.gate.apps import Application, void_page
from haikutx.gate.backends import BackendPool, BackendProtocol, Valve
from haikutx.gate.dial import Dialer
from haikutx.gate.request import RequestBody, forwarded_head
from haikutx.gate.response import ApplicationSide
from haikutx.gate.routing import Route, count_request, route_request
from haikutx.gate.states import TRANSITIONS, State, check_transition
from haikutx.net.http1 import (
    BadMessage,
    BodyFramer,
    head_end,
    parse_request_head,
    reason,
    simple_response,
)
from haikutx.tls import OffersHTTP11

#: Largest request head accepted, in bytes (larger: 431).
MAX_HEAD = 16384
#: Methods whose request (without a body) may be sent twice (RFC 9110 9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
#: Client bytes buffered while a request waits for its response (pipelining)
#: before reading from the client pauses.
MAX_PENDING = 65536
class GateProtocol(Protocol):
    """
    One client connection of the gate: parses each request head, routes it,
    and streams its body and its response between client and application.

    @ivar state: the L{State} of the current request.
    """

    log = Logger()

    def __init__(self, factory: GateFactory) -> None:
        self.factory = factory
        self._reactor = factory.reactor
        self._buffer = bytearray()
        self.state = State.HEAD
        self._pool: BackendPool = factory.pool
        self._dialing: Deferred[BackendProtocol] | None = None
        self._body = RequestBody(BodyFramer("none"))
        self._side = ApplicationSide(self, factory.pool)
        self._keep_alive = True
        self._method = b""
        self._http10 = False
        self._upgrade = False
        self._where: Route | None = None
        self._app: Application | None = None
        self._last_activity = 0.0
        self._idle_call: Any = None
        self.valve: Valve | None = None
        #: Largest number of bytes this connection held at once (tests).
        self.max_buffered = 0
        #: Fires when the client connection is gone.
        self.closed: Deferred[None] = Deferred()

    def _move(self, to: State) -> None:
        """
        Change state: the one place it changes.

        @raise AssertionError: for a transition L{TRANSITIONS} does not list.
        """
        if to not in TRANSITIONS[self.state]:
            check_transition(self.state, to)
        self.state = to

    # connection

    def connectionMade(self) -> None:
        transport = self.transport
        self.valve = Valve(transport)
        self._https = ISSLTransport.providedBy(transport)
        self._peer = getattr(transport.getPeer(), "host", "").encode("ascii", "replace")
        gate = transport.getHost()
        self._address = b"%s:%d" % (
            getattr(gate, "host", "").encode("ascii", "replace"), getattr(gate, "port", 0)
        )
        self._last_activity = self._reactor.seconds()
        self._idle_call = self._reactor.callLater(self.factory.idle, self._idle_check)
        self.factory.connections.add(self)

    def _idle_check(self) -> None:
        left = self._last_activity + self.factory.idle - self._reactor.seconds()
        if left > 0:
            self._idle_call = self._reactor.callLater(left, self._idle_check)
            return
        self._idle_call = None
        self.log.info("connection from {peer} idle for {idle}s, closed",
                      peer=self._peer.decode(), idle=self.factory.idle)
        self.transport.loseConnection()
        self._side.close()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.state = State.CLOSED
        self.factory.connections.discard(self)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        if self._dialing is not None:
            dialing, self._dialing = self._dialing, None
            dialing.cancel()
        self._side.client_gone()
        self._finish_app()
        self.closed.callback(None)

    def all_closed(self) -> list[Deferred[None]]:
        """
        Deferreds that fire once this connection and its application
        connections are gone.
        """
        found = [self.closed]
        backend = self._side.backend
        if backend is not None and backend.connected_:
            found.append(backend.closed)
        return found

    # client side

    def dataReceived(self, data: bytes) -> None:
        self._last_activity = self._reactor.seconds()
        if self.state is State.TUNNEL:
            self._side.write(data)
            return
        buffer = self._buffer
        buffer += data
        if len(buffer) > self.max_buffered:
            self.max_buffered = len(buffer)
        self._process()

    def _process(self) -> None:
        while self._buffer and self.state is not State.CLOSED:
            state = self.state
            if state is State.HEAD:
                if not self._read_head():
                    return
            elif state is State.BODY:
                self._forward_body()
                if self.state is State.BODY:
                    return
            elif state is State.TUNNEL:
                data, self._buffer = bytes(self._buffer), bytearray()
                self._side.write(data)
            else:
                if state is State.ROUTING and not self._check_body():
                    return
                # Keep what came next (pipelining), bounded.
                if len(self._buffer) > MAX_PENDING:
                    self.valve.pause("pending")
                return

    def _check_body(self) -> bool:
        """
        While connecting: check the body bytes that came with the head, so a
        malformed chunk is refused before anything is forwarded.
        """
        try:
            self._body.check(self._buffer)
        except BadMessage as e:
            self._bad_request(e)
            return False
        return True

    def _bad_request(self, error: BadMessage) -> None:
        self.log.warn("bad request from {peer}: {reason}", peer=self._peer.decode(),
                      reason=error.reason, status=error.status)
        self._refuse(error.status, error.reason)

    def _read_head(self) -> bool:
        self._where = None
        buffer = self._buffer
        while buffer[:2] == b"\r\n":
            del buffer[:2]
        try:
            end = head_end(buffer)
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    self._refuse(431, f"request head larger than {MAX_HEAD} bytes")
                return False
            if end > MAX_HEAD:
                self._refuse(431, f"request head larger than {MAX_HEAD} bytes")
                return False
            head = parse_request_head(buffer[:end])
        except BadMessage as e:
            self._bad_request(e)
            return False
        del buffer[:end]
        self._method = method = head.method
        self._http10 = head.version == b"HTTP/1.0"
        self._keep_alive = head.keep_alive
        gate = self.factory.gate
        self._where = where = route_request(head, gate.methods, gate.names, gate.target)
        if where.status:
            if where.status >= 400:
                self.log.warn("{method} {target} refused: {status} {reason}",
                              method=method.decode("ascii"),
                              target=head.target.decode("ascii"),
                              status=where.status, reason=where.message)
            self._refuse(where.status, where.message, list(where.headers))
            return False
        self._upgrade = b"upgrade" in head.connection and head.get(b"upgrade") is not None
        self._body = RequestBody(BodyFramer.for_request(head))
        self._side.response.start(method, self._http10, self._keep_alive, self._upgrade)
        out = forwarded_head(
            head, where.target, where.port, self._peer, self._https, self._address,
            self._upgrade,
        )
        backend = self._side.kept(where.port) or self._pool.take(where.port)
        if backend is not None:
            self._start_request(backend, where, out)
            return True
        self._move(State.ROUTING)
        if not self._check_body():
            return False
        self.valve.pause("routing")
        self._connect(where, out)
        return True

    def _connect(self, where: Route, head: bytes) -> None:
        self._dialing = dialing = self.factory.dialer.dial(self, where)
        dialing.addCallbacks(self._connected, self._connect_failed,
                             callbackArgs=(where, head), errbackArgs=(where,))
        dialing.addErrback(lambda f: self.log.failure("gate bug", f))

    def _connected(self, backend: BackendProtocol, where: Route, head: bytes) -> None:
        self._dialing = None
        self.valve.resume("routing")
        self._start_request(backend, where, head)
        self._process()

    def _connect_failed(self, failure: Failure, where: Route) -> None:
        self._dialing = None
        if self.state is State.CLOSED:
            return
        self.valve.resume("routing")
        app = where.app.name if where.app else None
        self.log.error("{app} port {port} unreachable: {reason}", app=app,
                       port=where.port, reason=failure.getErrorMessage())
        body = void_page(where.app) if where.app is not None else None
        if body is not None:
            self._respond(503, body, b"text/html")
            return
        self._refuse(502, f"port {where.port} is unreachable")

    def _start_request(self, backend: BackendProtocol, where: Route, head: bytes) -> None:
        if where.app is not None:
            self._app = self.factory.gate.application(where.app)
            self._app.request_started()
        head += self._body.take_checked(self._buffer)
        done = self._body.done
        # Sent again on a new connection if a reused one closes unanswered:
        # only a request without a body whose method is idempotent.
        self._side.attach(backend, head, retry=done and self._method in IDEMPOTENT)
        self._move(State.WAITING if done else State.BODY)

    def _forward_body(self) -> None:
        try:
            chunk = self._body.take(self._buffer)
        except BadMessage as e:
            # What came before was forwarded; the bad line is not.
            self.log.warn("bad request body from {peer}: {reason}",
                          peer=self._peer.decode(), reason=e.reason, status=e.status)
            self._side.abort()
            if self._side.response.head_pending:
                self._refuse(e.status, e.reason)
            else:
                self.transport.abortConnection()
            return
        if chunk:
            self._side.write(chunk)
        if self._body.done:
            self._move(State.WAITING)

    # application side (L{ApplicationSide} reports here)

    def touch(self) -> None:
        """
        Note traffic (the idle timeout).
        """
        self._last_activity = self._reactor.seconds()

    def enter_tunnel(self) -> None:
        """
        The application switched protocols (C{101}).
        """
        self._move(State.TUNNEL)

    def tunnel_started(self) -> None:
        """
        The C{101} is passed on: pass on what the client sent meanwhile.
        """
        self._process()

    def count(self, status: int, answered_by_application: bool = True) -> None:
        """
        Count the current request, answered with C{status}.
        """
        count_request(self._where, status, answered_by_application)

    def retry(self, head: bytes) -> None:
        """
        A reused application connection closed before answering a request
        without a body: send it again on a new connection.
        """
        self._finish_app()
        assert self._where is not None
        self._move(State.ROUTING)
        self.valve.pause("routing")
        self._connect(self._where, head)

    def cut(self) -> None:
        """
        The application closed in the middle of a response.
        """
        self._finish_app()
        self.transport.loseConnection()

    def response_done(self) -> None:
        """
        The response is complete: release the application connection (to
        the pool when it can serve another request) and read the next
        request, or close.
        """
        self._finish_app()
        # An application that answered before reading the whole request
        # leaves the rest of it unread: neither connection can go on.
        complete = self.state is State.WAITING
        if not (self._side.response.keep_alive and complete):
            self._side.release(complete)
            self._move(State.CLOSED)
            self.transport.loseConnection()
            return
        # The application connection stays with this client connection for
        # its next request (L{ApplicationSide.kept}).
        self._side.keep()
        self._move(State.HEAD)
        self.valve.resume("pending")
        if self._buffer:
            self._process()

    def _finish_app(self) -> None:
        if self._app is not None:
            app, self._app = self._app, None
            app.request_finished()

    def backend_failed(self, why: str) -> None:
        """
        The application's response is unusable: 502 if nothing of it was
        passed on, else the client connection is closed.
        """
        side = self._side
        backend = side.backend
        self.log.error("port {port}: {reason}", port=backend.port if backend else None,
                       reason=why)
        side.abort()
        if side.response.head_pending:
            self._refuse(502, why)
        else:
            self.transport.loseConnection()

    # answers of the gate itself

    def _refuse(self, status: int, message: str,
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
        body = b"%d %s: %s\n" % (status, reason(status), message.encode())
        self._respond(status, body, b"text/plain; charset=utf-8", headers)

    def _respond(self, status: int, body: bytes, content_type: bytes,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self._finish_app()
        self.count(status, answered_by_application=False)
        self._move(State.CLOSED)
        self.transport.write(simple_response(status, body, content_type, headers or ()))
        self.transport.loseConnection()


class GateFactory(OffersHTTP11, Factory):
    """
    Builds L{GateProtocol}s for the listeners of a L{GateService}; offers
    ALPN C{http/1.1} on TLS listeners.

    @ivar connections: the open client connections.
    """

    noisy = False

    def __init__(self, reactor: Any, gate: Any) -> None:
        self.reactor = reactor
        self.gate = gate
        self.idle = gate.idle
        self.methods = gate.methods
        self.connections: set[GateProtocol] = set()
        #: Idle application connections, shared by all client connections.
        self.pool = BackendPool()
        self.dialer = Dialer(reactor, gate.application)

    def buildProtocol(self, addr: Any) -> GateProtocol:
        return GateProtocol(self)
