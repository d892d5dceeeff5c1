# -*- test-case-name: haikutx.test.test_gate -*-
"""
The gate's connections to applications, and the pool of idle ones.

An application connection whose response was complete and correctly framed
goes back to the L{BackendPool} when its request is done, and the next
request for that port, from any client connection, reuses it. So a client
that opens a new connection per request (C{Connection: close}) does not
cost the gate a connection to the application too. The pool is bounded per
port and in all, so clients cannot make the gate hold descriptors.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

#: Idle connections kept per application port.
IDLE_PER_PORT = 32
#: Idle connections kept in all.
IDLE_TOTAL = 256


def no_delay(transport: Any) -> None:
    """
    Turn off Nagle's algorithm on a gate connection (TCP or TLS over TCP):
    the gate writes whole messages, or parts of a body as they come, and
    a part held back until the peer acknowledges the previous one would
    wait out the peer's delayed acknowledgement (about 40 ms a part for a
    streamed response).
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


@implementer(IPushProducer)
class Valve:
    """
    Pauses a transport's reading while any reason to pause holds.
    """

    __slots__ = ("transport", "reasons", "on_stop")

    def __init__(self, transport: Any, on_stop: Any = None) -> None:
        self.transport = transport
        self.reasons: set[str] = set()
        self.on_stop = on_stop

    def pause(self, why: str) -> None:
        """
        Pause reading for C{why} (reading was running if no reason held).
        """
        if not self.reasons:
            self.transport.pauseProducing()
        self.reasons.add(why)

    def resume(self, why: str) -> None:
        """
        C{why} no longer holds; reading resumes once no reason does.
        """
        if why in self.reasons:
            self.reasons.discard(why)
            if not self.reasons:
                self.transport.resumeProducing()

    def pauseProducing(self) -> None:
        self.pause("consumer")

    def resumeProducing(self) -> None:
        self.resume("consumer")

    def stopProducing(self) -> None:
        if self.on_stop is not None:
            self.on_stop()


class BackendProtocol(Protocol):
    """
    One connection from the gate to an application; hands its bytes to its
    L{Owner}.

    @ivar owner: what it reports to (C{backend_data}, C{backend_lost}): the
        client connection it serves, or the pool while it is idle.
    @ivar port: the application's port.
    @ivar reusable: whether another request may be sent on it.
    @ivar reused: whether it served a request before the current one.
    @ivar closed: fires when the connection is gone.
    """

    transport: Any

    def __init__(self, owner: Any, port: int, on_connect: Any) -> None:
        self.owner = owner
        self.port = port
        self._on_connect = on_connect
        self.valve: Valve | None = None
        self.connected_ = False
        self.reusable = True
        self.reused = False
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.connected_ = True
        no_delay(self.transport)
        self.valve = Valve(self.transport, self.transport.loseConnection)
        on_connect, self._on_connect = self._on_connect, None
        on_connect(self)

    def dataReceived(self, data: bytes) -> None:
        self.owner.backend_data(self, data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected_ = False
        self.owner.backend_lost(self)
        self.closed.callback(None)


class BackendFactory(ClientFactory):
    """
    Connects one L{BackendProtocol} (with C{reactor.connectTCP}: no endpoint
    wrapper on the data path) and reports either outcome.
    """

    noisy = False

    def __init__(self, owner: Any, port: int, on_connect: Any, on_failure: Any) -> None:
        self._owner, self._port = owner, port
        self._on_connect, self._on_failure = on_connect, on_failure

    def buildProtocol(self, addr: Any) -> BackendProtocol:
        return BackendProtocol(self._owner, self._port, self._on_connect)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self._on_failure(reason)


class BackendPool:
    """
    Idle application connections, by port, shared by every client
    connection of a gate.
    """

    def __init__(self, per_port: int = IDLE_PER_PORT, total: int = IDLE_TOTAL) -> None:
        self._per_port = per_port
        self._total = total
        self._idle: dict[int, list[BackendProtocol]] = {}
        self._count = 0
        self._closed = False

    def __len__(self) -> int:
        return self._count

    def take(self, port: int) -> BackendProtocol | None:
        """
        An idle connection to C{port} (the most recently used), or C{None}.
        """
        idle = self._idle.get(port)
        while idle:
            backend = idle.pop()
            self._count -= 1
            if backend.connected_:
                backend.reused = True
                return backend
        return None

    def give(self, backend: BackendProtocol) -> None:
        """
        Keep C{backend} for a later request, or close it when it cannot
        serve one or the pool is full.
        """
        idle = self._idle.setdefault(backend.port, [])
        if (
            self._closed
            or not backend.connected_
            or not backend.reusable
            or len(idle) >= self._per_port
            or self._count >= self._total
        ):
            if backend.transport is not None:
                backend.transport.loseConnection()
            return
        backend.owner = self
        assert backend.valve is not None
        backend.valve.reasons.clear()
        backend.transport.resumeProducing()
        idle.append(backend)
        self._count += 1

    def backend_data(self, backend: BackendProtocol, data: bytes) -> None:
        """
        An idle connection sent bytes nobody asked for: it cannot be reused.
        """
        self._forget(backend)
        backend.transport.loseConnection()

    def backend_lost(self, backend: BackendProtocol) -> None:
        """
        An idle connection closed.
        """
        self._forget(backend)

    def _forget(self, backend: BackendProtocol) -> None:
        idle = self._idle.get(backend.port, [])
        if backend in idle:
            idle.remove(backend)
            self._count -= 1

    def close(self) -> list[Deferred[None]]:
        """
        Close every idle connection, and those given back from now on.

        @return: Deferreds that fire once they are closed.
        """
        self._closed = True
        closing = []
        for idle in self._idle.values():
            for backend in list(idle):
                closing.append(backend.closed)
                backend.transport.loseConnection()
        return closing
