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

L{GateProtocol} is the client side: it reads the client's bytes (request
heads, bodies, pipelined requests) and answers for the gate itself;
L{haikutx.gate.dispatch.Dispatch} decides where each request goes and which
application connection carries it; L{haikutx.gate.response.ApplicationSide}
reads the application's answer. The connection's states are L{State};
L{GateProtocol.move} is the one place they change, and it refuses a
transition L{TRANSITIONS} does not list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from haikutx.gate.backends import BackendPool, Valve, no_delay
from haikutx.gate.dial import Dialer
from haikutx.gate.dispatch import Dispatch
from haikutx.gate.request import RequestBody, take_request_head
from haikutx.gate.response import ApplicationSide
from haikutx.gate.states import TRANSITIONS, State, check_transition
from haikutx.net.http1 import (
    BadMessage,
    BodyFramer,
    LastHead,
    parse_request_head,
    reason,
    simple_response,
)
from haikutx.tls import OffersHTTP11

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
        self.buffer = bytearray()
        self.state = State.HEAD
        self._parse_head = LastHead(parse_request_head)
        #: The body of the request being read.
        self.body = RequestBody(BodyFramer("none"))
        #: The application connection of the current request.
        self.side = ApplicationSide(self, factory.pool)
        #: Where each request goes (L{Dispatch}).
        self.dispatch = Dispatch(self)
        self._idle = IdleTimer(self._reactor, factory.idle, self._idle_timeout)
        self.valve: Valve | None = None
        #: Largest number of bytes this connection held at once (tests).
        self.max_buffered = 0
        #: Fires when the client connection is gone.
        self.closed: Deferred[None] = Deferred()

    def move(self, to: State) -> None:
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
        no_delay(transport)
        self.valve = Valve(transport)
        self.https = ISSLTransport.providedBy(transport)
        self.peer = getattr(transport.getPeer(), "host", "").encode("ascii", "replace")
        gate = transport.getHost()
        self.address = b"%s:%d" % (
            getattr(gate, "host", "").encode("ascii", "replace"), getattr(gate, "port", 0)
        )
        self._idle.start()
        self.factory.connections.add(self)

    def _idle_timeout(self) -> None:
        self.log.info("connection from {peer} idle for {idle}s, closed",
                      peer=self.peer.decode(), idle=self.factory.idle)
        self.transport.loseConnection()
        self.side.close()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.state = State.CLOSED
        self.factory.connections.discard(self)
        self._idle.stop()
        self.dispatch.cancel()
        self.side.client_gone()
        self.closed.callback(None)

    def all_closed(self) -> list[Deferred[None]]:
        """
        Deferreds that fire once this connection and its application
        connections are gone.
        """
        found = [self.closed]
        backend = self.side.backend
        if backend is not None and backend.connected_:
            found.append(backend.closed)
        return found

    # client side

    def dataReceived(self, data: bytes) -> None:
        self._idle.last = self._reactor.seconds()
        if self.state is State.TUNNEL:
            self.side.write(data)
            return
        buffer = self.buffer
        buffer += data
        if len(buffer) > self.max_buffered:
            self.max_buffered = len(buffer)
        self.process()

    def process(self) -> None:
        """
        Act on the buffered client bytes as the state allows.
        """
        while self.buffer and self.state is not State.CLOSED:
            state = self.state
            if state is State.HEAD:
                if not self._read_head():
                    return
            elif state is State.BODY:
                self._forward_body()
                if self.state is State.BODY:
                    return
            elif state is State.TUNNEL:
                data, self.buffer = bytes(self.buffer), bytearray()
                self.side.write(data)
            else:
                if state is State.ROUTING and not self.check_body():
                    return
                # Keep what came next (pipelining), bounded.
                if len(self.buffer) > MAX_PENDING:
                    self.valve.pause("pending")
                return

    def check_body(self) -> bool:
        """
        Check the body bytes that came with the head (and, while connecting,
        those that follow), so a malformed chunk is refused before anything
        is forwarded and the checked bytes go out with the head.
        """
        try:
            self.body.check(self.buffer)
        except BadMessage as e:
            self._bad_request(e)
            return False
        return True

    def _bad_request(self, error: BadMessage) -> None:
        self.log.warn("bad request from {peer}: {reason}", peer=self.peer.decode(),
                      reason=error.reason, status=error.status)
        self.refuse(error.status, error.reason)

    def _read_head(self) -> bool:
        try:
            head = take_request_head(self.buffer, self._parse_head)
        except BadMessage as e:
            self._bad_request(e)
            return False
        return head is not None and self.dispatch.dispatch(head)

    def _forward_body(self) -> None:
        try:
            chunk = self.body.take(self.buffer)
        except BadMessage as e:
            # What came before was forwarded; the bad line is not.
            self.log.warn("bad request body from {peer}: {reason}",
                          peer=self.peer.decode(), reason=e.reason, status=e.status)
            self.side.abort()
            if self.side.response.head_pending:
                self.refuse(e.status, e.reason)
            else:
                self.transport.abortConnection()
            return
        if chunk:
            self.side.write(chunk)
        if self.body.done:
            self.move(State.WAITING)

    # application side (L{ApplicationSide} reports here)

    def touch(self) -> None:
        """
        Note traffic (the idle timeout).
        """
        self._idle.last = self._reactor.seconds()

    def enter_tunnel(self) -> None:
        """
        The application switched protocols (C{101}).
        """
        self.move(State.TUNNEL)

    def tunnel_started(self) -> None:
        """
        The C{101} is passed on: pass on what the client sent meanwhile.
        """
        self.process()

    def cut(self) -> None:
        """
        The application closed in the middle of a response.
        """
        self.dispatch.finish_app()
        self.transport.loseConnection()

    def response_done(self) -> None:
        """
        The response is complete: release the application connection (to
        the pool when it can serve another request) and read the next
        request, or close.
        """
        self.dispatch.finish_app()
        # An application that answered before reading the whole request
        # leaves the rest of it unread: neither connection can go on.
        complete = self.state is State.WAITING
        if not (self.side.response.keep_alive and complete):
            self.side.release(complete)
            self.move(State.CLOSED)
            self.transport.loseConnection()
            return
        # The application connection stays with this client connection for
        # its next request (L{ApplicationSide.kept}).
        self.side.keep()
        self.move(State.HEAD)
        self.valve.resume("pending")
        if self.buffer:
            self.process()

    def backend_failed(self, why: str) -> None:
        """
        The application's response is unusable: 502 if nothing of it was
        passed on, else the client connection is closed.
        """
        side = self.side
        backend = side.backend
        self.log.error("port {port}: {reason}", port=backend.port if backend else None,
                       reason=why)
        side.abort()
        if side.response.head_pending:
            self.refuse(502, why)
        else:
            self.transport.loseConnection()

    # answers of the gate itself

    def refuse(self, status: int, message: str,
               headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """
        Answer C{status} with C{message} as a text body, and close.
        """
        body = b"%d %s: %s\n" % (status, reason(status), message.encode())
        self.respond(status, body, b"text/plain; charset=utf-8", headers)

    def respond(self, status: int, body: bytes, content_type: bytes,
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """
        Answer with the gate's own response (counted as not answered by an
        application), and close.
        """
        self.dispatch.finish_app()
        self.dispatch.count(status, answered_by_application=False)
        self.move(State.CLOSED)
        self.transport.write(simple_response(status, body, content_type, headers or ()))
        self.transport.loseConnection()


class IdleTimer:
    """
    Calls C{expired} once nothing has set L{last} for C{idle} seconds: one
    timer per connection, re-armed only when it fires (traffic costs an
    assignment, not a timer reset).

    @ivar last: the reactor time of the latest traffic.
    """

    __slots__ = ("_reactor", "_idle", "_expired", "_call", "last")

    def __init__(self, reactor: Any, idle: float, expired: Callable[[], None]) -> None:
        self._reactor = reactor
        self._idle = idle
        self._expired = expired
        self._call: Any = None
        self.last = 0.0

    def start(self) -> None:
        """
        Start timing (the connection is made).
        """
        self.last = self._reactor.seconds()
        self._call = self._reactor.callLater(self._idle, self._check)

    def stop(self) -> None:
        """
        Stop timing (the connection is gone).
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        left = self.last + self._idle - self._reactor.seconds()
        if left > 0:
            self._call = self._reactor.callLater(left, self._check)
            return
        self._call = None
        self._expired()


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
