# -*- test-case-name: haikutx.test.test_gate -*-
"""
The forwarding decisions of one gate connection: where a parsed request
goes (a refusal, a redirect, or an application), which application
connection carries it (the one kept from the last request, an idle one of
the pool, or a new one), and what happens when that connection cannot be
opened or closes unanswered.

L{haikutx.gate.forward.GateProtocol} reads the client's bytes and hands
each request head to L{Dispatch.dispatch}; the connection's state changes
only through the protocol's C{_move}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from haikutx.gate.apps import Application, void_page
from haikutx.gate.backends import BackendProtocol
from haikutx.gate.request import NO_BODY, RequestBody, forwarded_head
from haikutx.gate.routing import Route, count_request, route_request
from haikutx.gate.states import State
from haikutx.net.http1 import REMEMBERED_HEAD, BodyFramer, Head

#: Methods whose request (without a body) may be sent twice (RFC 9110 9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})


class Dispatch:
    """
    Routes the requests of one client connection and finds each one an
    application connection.

    @param client: the L{haikutx.gate.forward.GateProtocol} it decides for.
    @ivar where: the L{Route} of the current request, or C{None}.
    """

    __slots__ = ("_client", "_factory", "_dialing", "_app", "_method", "_last", "where")

    log = Logger()

    def __init__(self, client: Any) -> None:
        self._client = client
        self._factory = client.factory
        self._dialing: Deferred[BackendProtocol] | None = None
        self._app: Application | None = None
        self._method = b""
        #: The last forwarded request's head, the names file it was routed
        #: by, its route and the head sent on: the same L{Head} (see
        #: L{haikutx.net.http1.LastHead}) by the same names goes the same
        #: way with the same head (this connection's client, address and
        #: scheme do not change).
        self._last: tuple[Head, Any, Route, bytes] | None = None
        self.where: Route | None = None

    def dispatch(self, head: Head) -> bool:
        """
        Route the request C{head} and start forwarding it (or answer it).

        @return: whether the client's next bytes are to be read now (the
            request went to a connected application).
        """
        client = self._client
        self._method = method = head.method
        http10 = head.version == b"HTTP/1.0"
        gate = self._factory.gate
        names = gate.names
        last = self._last
        if last is not None and last[0] is head and last[1] is names:
            _, _, where, out = last
            self.where = where
        else:
            self.where = where = route_request(head, gate.methods, names, gate.target)
            out = b""
        if where.status:
            if where.status >= 400:
                self.log.warn("{method} {target} refused: {status} {reason}",
                              method=method.decode("ascii"),
                              target=head.target.decode("ascii"),
                              status=where.status, reason=where.message)
            client.refuse(where.status, where.message, list(where.headers))
            return False
        upgrade = b"upgrade" in head.connection and head.get(b"upgrade") is not None
        # Most requests have no body: they share L{NO_BODY}, which holds no
        # state, and skip its checks.
        if head.chunked or head.content_length:
            client.body = body = RequestBody(BodyFramer.for_request(head))
        else:
            client.body = body = NO_BODY
        side = client.side
        side.response.start(method, http10, head.keep_alive, upgrade)
        if not out:
            out = forwarded_head(
                head, where.target, where.port, client.peer, client.https, client.address,
                upgrade,
            )
            # Kept only while small: an idle connection holds little.
            self._last = (head, names, where, out) if len(out) <= REMEMBERED_HEAD else None
        # The body bytes that came with the head are checked now, so they go
        # out with it (one write), and a malformed chunk is refused before
        # anything is forwarded.
        if body is not NO_BODY and not client.check_body():
            return False
        backend = side.kept(where.port) or self._factory.pool.take(where.port)
        if backend is not None:
            self._start_request(backend, where, out)
            return True
        client.move(State.ROUTING)
        client.valve.pause("routing")
        self._connect(where, out)
        return True

    def retry(self, head: bytes) -> None:
        """
        A reused application connection closed before answering a request
        without a body: send it again on a new connection.
        """
        self.finish_app()
        assert self.where is not None
        client = self._client
        client.move(State.ROUTING)
        client.valve.pause("routing")
        self._connect(self.where, head)

    def count(self, status: int, answered_by_application: bool = True) -> None:
        """
        Count the current request, answered with C{status}.
        """
        count_request(self.where, status, answered_by_application)

    def finish_app(self) -> None:
        """
        The current request of a names-file application is over (its idle
        time, for C{--retire}, starts again).
        """
        if self._app is not None:
            app, self._app = self._app, None
            app.request_finished()

    def cancel(self) -> None:
        """
        The client connection is gone: stop connecting for it.
        """
        if self._dialing is not None:
            dialing, self._dialing = self._dialing, None
            dialing.cancel()
        self.finish_app()

    def _connect(self, where: Route, head: bytes) -> None:
        client = self._client
        self._dialing = dialing = self._factory.dialer.dial(client, where)
        dialing.addCallbacks(self._connected, self._connect_failed,
                             callbackArgs=(where, head), errbackArgs=(where,))
        dialing.addErrback(lambda f: self.log.failure("gate bug", f))

    def _connected(self, backend: BackendProtocol, where: Route, head: bytes) -> None:
        self._dialing = None
        client = self._client
        client.valve.resume("routing")
        self._start_request(backend, where, head)
        client.process()

    def _connect_failed(self, failure: Failure, where: Route) -> None:
        self._dialing = None
        client = self._client
        if client.state is State.CLOSED:
            return
        client.valve.resume("routing")
        app = where.app.name if where.app else None
        self.log.error("{app} port {port} unreachable: {reason}", app=app,
                       port=where.port, reason=failure.getErrorMessage())
        body = void_page(where.app) if where.app is not None else None
        if body is not None:
            client.respond(503, body, b"text/html")
            return
        client.refuse(502, f"port {where.port} is unreachable")

    def _start_request(self, backend: BackendProtocol, where: Route, head: bytes) -> None:
        if where.app is not None:
            self._app = self._factory.gate.application(where.app)
            self._app.request_started()
        client = self._client
        body = client.body
        if body is NO_BODY:
            done = True
        else:
            head += body.take_checked(client.buffer)
            done = body.done
        # Sent again on a new connection if a reused one closes unanswered:
        # only a request without a body whose method is idempotent.
        client.side.attach(backend, head, retry=done and self._method in IDEMPOTENT)
        client.move(State.WAITING if done else State.BODY)
