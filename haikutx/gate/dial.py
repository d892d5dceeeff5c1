# -*- test-case-name: haikutx.test.test_gate -*-
"""
Connecting to applications: the port, and, when it does not accept and the
names file says how to start the application, the application started once
and the port tried again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from haikutx.gate.apps import BACKEND_HOST, Application
from haikutx.gate.backends import BackendFactory, BackendProtocol
from haikutx.gate.names import NamesEntry
from haikutx.gate.routing import Route

#: Seconds the gate waits for an application's port to accept a connection.
CONNECT_TIMEOUT = 10


class Dialer:
    """
    Opens application connections for a gate.

    @param reactor: provides TCP (and time, for starting applications).
    @param application: the L{Application} of a names-file entry.
    """

    def __init__(self, reactor: Any, application: Callable[[NamesEntry], Application]) -> None:
        self._reactor = reactor
        self._application = application

    def dial(self, owner: Any, where: Route) -> Deferred[BackendProtocol]:
        """
        Connect to C{where.port} for C{owner}.

        @return: a Deferred firing with the connected L{BackendProtocol}, or
            failing with why it could not be; cancelling it stops trying.
        """
        return _Attempt(self._reactor, self._application, owner, where).result


class _Attempt:
    """
    One L{Dialer.dial}.
    """

    def __init__(self, reactor: Any, application: Any, owner: Any, where: Route) -> None:
        self._reactor = reactor
        self._application = application
        self._owner = owner
        self._where = where
        self._connector: Any = None
        self._cancelled = False
        self.result: Deferred[BackendProtocol] = Deferred(self._cancel)
        self._connect(retried=False)

    def _connect(self, retried: bool) -> None:
        if self._cancelled:
            return
        factory = BackendFactory(
            self._owner, self._where.port, self._connected,
            lambda why: self._failed(why, retried),
        )
        self._connector = self._reactor.connectTCP(
            BACKEND_HOST, self._where.port, factory, timeout=CONNECT_TIMEOUT
        )

    def _connected(self, backend: BackendProtocol) -> None:
        self._connector = None
        if self._cancelled:
            backend.transport.loseConnection()
            return
        self.result.callback(backend)

    def _failed(self, why: Failure, retried: bool) -> None:
        self._connector = None
        if self._cancelled:
            return
        entry = self._where.app
        if retried or entry is None or not entry.command:
            self.result.errback(why)
            return
        started = self._application(entry).start_and_wait()
        started.addCallbacks(lambda _: self._connect(retried=True), self._start_failed)

    def _start_failed(self, why: Failure) -> None:
        if not self._cancelled:
            self.result.errback(why)

    def _cancel(self, result: Deferred[BackendProtocol]) -> None:
        self._cancelled = True
        if self._connector is not None and self._connector.state == "connecting":
            self._connector.stopConnecting()
        self._connector = None
