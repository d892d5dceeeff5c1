# -*- test-case-name: haikutx.test.test_egress -*-
"""
The server's end of a zygote's egress relay channel: each connection a
handler makes to the relay inside the zygote's network namespace arrives
as a descriptor passed over a unix socketpair (L{EgressChannel}), and is
adopted and served by an L{haikutx.runtime.egress.EgressProxyFactory}
(L{make_egress_channel} makes both for one zygote).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from haikutx.net.addresses import EgressRules
from haikutx.runtime.egress import EgressProxyFactory


@implementer(IFileDescriptorReceiver)
class EgressChannel(Protocol):
    """
    The server's end of a zygote's relay channel: each descriptor passed
    over it (a connection a handler made to the relay) is adopted and
    served by C{factory}.

    @ivar received: how many descriptors arrived.
    """

    log = Logger()
    transport: Any

    def __init__(self, reactor: Any, factory: Factory) -> None:
        """
        @param reactor: an L{IReactorSocket}.
        @param factory: builds the protocol serving each connection (an
            L{EgressProxyFactory}).
        """
        self._reactor = reactor
        self._factory = factory
        self.received = 0
        self._gone = False
        self._waiters: list[Deferred[None]] = []

    def fileDescriptorReceived(self, descriptor: int) -> None:
        """
        Adopt a passed TCP connection; the received descriptor is closed
        once adopted (the reactor keeps its own duplicate).
        """
        self.received += 1
        limit = getattr(self._factory, "max_connections", None)
        if limit is not None and self._factory.connections >= limit:
            os.close(descriptor)
            self.log.warn(
                "egress channel: passed descriptor refused: {reason}",
                reason=f"{limit} connections are open already",
            )
            return
        try:
            sock = socket.socket(fileno=descriptor)
        except OSError as e:
            os.close(descriptor)
            self.log.warn(
                "egress channel: passed descriptor refused: {reason}", reason=str(e)
            )
            return
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                self.log.warn(
                    "egress channel: passed descriptor refused: {reason}",
                    reason=f"not a TCP socket ({sock.family!r}, {sock.type!r})",
                )
                return
            sock.setblocking(False)
            self._reactor.adoptStreamConnection(
                sock.fileno(), sock.family, self._factory
            )
        except OSError as e:
            self.log.warn(
                "egress channel: cannot adopt connection: {reason}", reason=str(e)
            )
        finally:
            sock.close()

    def dataReceived(self, data: bytes) -> None:
        """
        Ignore the data bytes that carry the descriptors.
        """

    def when_closed(self) -> Deferred[None]:
        """
        @return: a L{Deferred} firing once the channel is closed.
        """
        if self._gone:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._gone = True
        self.log.info(
            "egress channel closed after {received} connections", received=self.received
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)


class _OneProtocol(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


def listen_channel(
    reactor: Any, sock: socket.socket, factory: Factory
) -> EgressChannel:
    """
    Serve the connections passed over a relay channel.

    @param reactor: an L{IReactorSocket}.
    @param sock: the server's end of the channel (a connected C{AF_UNIX}
        stream socket); it is made non-blocking and adopted (the reactor
        works on a duplicate, so the caller may close C{sock}).
    @param factory: serves each passed connection (an
        L{EgressProxyFactory}).
    @return: the channel protocol; C{channel.transport.loseConnection()}
        stops it and C{channel.when_closed()} fires once it is gone.
    """
    channel = EgressChannel(reactor, factory)
    sock.setblocking(False)
    reactor.adoptStreamConnection(sock.fileno(), socket.AF_UNIX, _OneProtocol(channel))
    return channel


def make_egress_channel(
    reactor: Any,
    rules: EgressRules,
    resolver: Any = None,
    timeout: float = 10.0,
) -> tuple[socket.socket, Callable[[], Deferred[None]]]:
    """
    Make the channel for one zygote: a unix socketpair whose server end is
    served here by an L{EgressProxyFactory} applying C{rules}.

    @param reactor: an L{IReactorSocket}, L{IReactorTCP}, L{IReactorTime}.
    @param rules: the C{--egress-allow} rules.
    @param resolver: an L{IHostnameResolver}; the reactor's by default.
    @param timeout: seconds allowed to resolve and connect a destination.
    @return: the zygote's end (inheritable: pass it to the zygote as a
        child descriptor and close it here once the zygote is started),
        and a callable that closes the server's end, aborts the
        connections passed over it and returns a L{Deferred} firing once
        all are closed.
    """
    server, zygote = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    factory = EgressProxyFactory(reactor, rules, resolver, timeout)
    try:
        channel = listen_channel(reactor, server, factory)
    finally:
        server.close()
    zygote.set_inheritable(True)

    def stop() -> Deferred[None]:
        channel.transport.loseConnection()
        factory.abort_all()
        done = gatherResults([channel.when_closed(), factory.when_idle()])
        return done.addCallback(lambda _: None)

    return zygote, stop
