# -*- test-case-name: haikutx.test.test_gate -*-
"""
The gate: PicoLisp httpGate's front door as a Twisted service.

C{GET /<port>/<rest>} is forwarded to C{127.0.0.1:<port>/<rest>} and
C{/<name>/<rest>} to the port of a names-file application, started on demand
(L{haikutx.gate.routing}, L{haikutx.gate.apps}); the forwarding itself is
L{haikutx.gate.forward}. The service holds the listeners, the names file in
force (reloaded on C{SIGHUP}) and the applications it started.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from haikutx.gate.apps import Application
from haikutx.gate.forward import GateFactory
from haikutx.gate.names import NamesEntry, NamesFile, NamesFileError


class GateService(MultiService):
    """
    The gate: its listeners as children, the names file in force, and the
    applications it started.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        listeners: tuple[str, ...] = (),
        names_path: Path | None = None,
        target: int | None = None,
        methods: tuple[str, ...] = ("GET", "POST"),
        retire: float | None = None,
        idle: float = 420.0,
        start_timeout: float = 30.0,
        install_sighup: bool = True,
    ) -> None:
        super().__init__()
        self.setName("gate")
        self.reactor = reactor
        self.names_path = names_path
        self.target = target
        self.methods = tuple(methods)
        self.retire = retire
        self.idle = idle
        self.start_timeout = start_timeout
        self.install_sighup = install_sighup
        self.names = NamesFile()
        if names_path is not None:
            self.names = NamesFile.parse(names_path.read_text())
        self.applications: dict[str, Application] = {}
        self.factory = GateFactory(reactor, self)
        self.listeners = tuple(listeners)
        for description in listeners:
            strports.service(description, self.factory, reactor=reactor).setServiceParent(
                self
            )
        self._previous_handler: Any = None

    @classmethod
    def from_config(cls, reactor: Any, config: Any) -> GateService:
        """
        Build the gate from a L{haikutx.config.Config}.
        """
        return cls(
            reactor,
            listeners=config.gates,
            names_path=config.names,
            target=config.gate_target,
            methods=config.gate_methods,
            retire=config.retire,
            idle=config.idle,
        )

    def application(self, entry: NamesEntry) -> Application:
        """
        The L{Application} of a names-file entry (created on first use).
        """
        app = self.applications.get(entry.name)
        if app is None:
            app = self.applications[entry.name] = Application(
                entry, self.reactor, retire=self.retire,
                start_timeout=self.start_timeout,
            )
        elif app.entry != entry and not app.running:
            app.entry = entry
        return app

    def reload(self) -> bool:
        """
        Read the names file again; a file that does not parse leaves the old
        one in force.

        @return: whether the new file is in force.
        """
        if self.names_path is None:
            return False
        try:
            names = NamesFile.parse(self.names_path.read_text())
        except (OSError, UnicodeDecodeError, NamesFileError) as e:
            self.log.error("names file {path} not reloaded, keeping the old one: "
                           "{reason}", path=str(self.names_path), reason=str(e))
            return False
        self.names = names
        self.log.info("names file {path} reloaded: {count} entries",
                      path=str(self.names_path), count=len(names.entries))
        return True

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def startService(self) -> None:
        if self.install_sighup:
            self._previous_handler = signal.signal(signal.SIGHUP, self._sighup)
        super().startService()
        self.log.info("gate started on {listeners}", listeners=list(self.listeners))

    def stopService(self) -> Deferred:
        if self.install_sighup and self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        stopped = super().stopService()
        closing = []
        for connection in list(self.factory.connections):
            closing.extend(connection.all_closed())
            connection.transport.loseConnection()
        closing.extend(self.factory.pool.close())
        apps = [app.stop() for app in self.applications.values()]
        d = DeferredList([stopped, *closing, *apps], consumeErrors=True)
        d.addCallback(lambda _: self.log.info("gate stopped"))
        return d

