# -*- test-case-name: haikutx.test.test_gate -*-
"""
The names-file applications the gate starts on demand, waits for, retires
when idle and stops.
"""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path
from typing import Any

from attrs import define, field
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from haikutx.gate.names import NamesEntry
from haikutx.processes import terminate

#: The address applications are reached at.
BACKEND_HOST = "127.0.0.1"
#: Seconds between two probes of a starting application's port.
PROBE_INTERVAL = 0.1


class _AppProcess(ProcessProtocol):
    """
    The process of one started application: reports its end, and logs its
    output line by line when it has no log file.
    """

    log = Logger()

    def __init__(self, app: Application) -> None:
        self._app = app
        self._partial = {1: b"", 2: b""}
        #: Fires with C{None} when the process has ended.
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            self.log.info(
                "{app}: {line}", app=self._app.entry.name, port=self._app.entry.port,
                line=line.decode("utf-8", "replace"), stream="stdout" if fd == 1 else "stderr",
            )

    def processEnded(self, reason: Failure) -> None:
        self._app._ended(self, reason)
        self.ended.callback(None)


@define
class Application:
    """
    An application of the names file the gate may start, stop and
    supervise.

    @ivar entry: its names-file entry (replaced on reload).
    @ivar reactor: provides time, process spawning and TCP.
    @ivar retire: seconds of idleness after which it is stopped (C{None}:
        never).
    @ivar start_timeout: seconds to wait for its port to accept.
    @ivar kill_time: seconds between TERM and KILL when stopping it.
    """

    log = Logger()

    entry: NamesEntry
    reactor: Any
    retire: float | None = None
    start_timeout: float = 30.0
    kill_time: float = 5.0
    active: int = 0
    process: Any = None
    _protocol: _AppProcess | None = None
    _waiters: list[Deferred] | None = None
    _ended_waiters: list[Deferred] = field(factory=list)
    _retire_call: Any = None
    _stopping: bool = False

    @property
    def running(self) -> bool:
        """
        Whether a process the gate started is alive.
        """
        return self._protocol is not None

    def start_and_wait(self) -> Deferred:
        """
        Start the application unless it is already starting or running, and
        wait until its port accepts. Concurrent callers share one start.

        @return: a Deferred firing with C{None} once the port accepts, or
            failing when it does not within C{start_timeout}.
        """
        d: Deferred = Deferred()
        if self._waiters is not None:
            self._waiters.append(d)
            return d
        self._waiters = [d]
        try:
            if not self.running:
                self._spawn()
        except Exception as e:
            self.log.error("{app}: cannot start: {reason}", app=self.entry.name,
                           port=self.entry.port, reason=str(e))
            self._fire(Failure(e))
            return d
        Deferred.fromCoroutine(self._poll()).addErrback(self._fire)
        return d

    def _spawn(self) -> None:
        entry = self.entry
        argv = list(entry.command)
        directory = entry.dir or None
        executable = argv[0]
        if "/" not in executable:
            found = shutil.which(executable)
            if found is None:
                raise FileNotFoundError(f"command {executable!r} not found")
            executable = found
        elif directory and not os.path.isabs(executable):
            executable = os.path.join(directory, executable)
        uid = gid = None
        env = dict(os.environ)
        if entry.user:
            record = pwd.getpwnam(entry.user)
            if record.pw_uid != os.geteuid():
                uid, gid = record.pw_uid, record.pw_gid
            env.update(HOME=record.pw_dir, USER=entry.user, LOGNAME=entry.user)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        logfd = None
        if entry.log:
            logpath = entry.log
            if directory and not os.path.isabs(logpath):
                logpath = os.path.join(directory, logpath)
            logfd = os.open(logpath, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            if uid is not None:
                os.fchown(logfd, uid, gid)
            child_fds.update({1: logfd, 2: logfd})
        protocol = _AppProcess(self)
        try:
            self.process = self.reactor.spawnProcess(
                protocol, executable, argv, env=env, path=directory,
                uid=uid, gid=gid, childFDs=child_fds,
            )
        finally:
            if logfd is not None:
                os.close(logfd)
        self._protocol = protocol
        self._stopping = False
        self.log.info(
            "{app}: started pid {pid} on port {port}", app=entry.name, port=entry.port,
            pid=self.process.pid, command=" ".join(argv),
        )

    async def _poll(self) -> None:
        deadline = self.reactor.seconds() + self.start_timeout
        endpoint = TCP4ClientEndpoint(self.reactor, BACKEND_HOST, self.entry.port,
                                      timeout=5)
        while True:
            try:
                probe_factory = Factory.forProtocol(Protocol)
                probe_factory.noisy = False
                probe = await endpoint.connect(probe_factory)
            except (ierror.ConnectError, ierror.ConnectionRefusedError):
                pass
            else:
                # A clean close (FIN), not an abort: an application that
                # reads the probe's connection sees an empty request, not a
                # reset it would log as a traceback.
                probe.transport.loseConnection()
                self._fire(None)
                return
            if self._waiters is None:
                return
            if not self.running:
                raise ierror.ConnectError(string="application exited while starting")
            if self.reactor.seconds() >= deadline:
                raise ierror.ConnectError(
                    string=f"port {self.entry.port} did not accept within "
                    f"{self.start_timeout}s"
                )
            d: Deferred = Deferred()
            self.reactor.callLater(PROBE_INTERVAL, d.callback, None)
            await d

    def _fire(self, result: Any) -> None:
        waiters, self._waiters = self._waiters or [], None
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def request_started(self) -> None:
        """
        Note a request forwarded to this application.
        """
        self.active += 1
        if self._retire_call is not None and self._retire_call.active():
            self._retire_call.cancel()
        self._retire_call = None

    def request_finished(self) -> None:
        """
        Note the end of a forwarded request; arms the retirement timer when
        the application is idle.
        """
        self.active = max(0, self.active - 1)
        self._arm_retire()

    def _arm_retire(self) -> None:
        if self.retire is None or self.active or not self.running:
            return
        if self._retire_call is not None and self._retire_call.active():
            self._retire_call.reset(self.retire)
        else:
            self._retire_call = self.reactor.callLater(self.retire, self._retired)

    def _retired(self) -> None:
        self._retire_call = None
        if self.active or not self.running:
            return
        self.log.info("{app}: idle for {idle}s, retiring", app=self.entry.name,
                      port=self.entry.port, idle=self.retire)
        self.stop()

    def stop(self) -> Deferred:
        """
        Stop the process the gate started: TERM, then KILL after
        C{kill_time}.

        @return: a Deferred firing once it has ended.
        """
        if self._retire_call is not None and self._retire_call.active():
            self._retire_call.cancel()
        self._retire_call = None
        if not self.running:
            return succeed(None)
        d: Deferred = Deferred()
        self._ended_waiters.append(d)
        if not self._stopping:
            self._stopping = True
            assert self._protocol is not None
            terminate(self.reactor, self.process, self._protocol.ended, self.kill_time)
        return d

    def _ended(self, protocol: _AppProcess, reason: Failure) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        if self._retire_call is not None and self._retire_call.active():
            self._retire_call.cancel()
        self._retire_call = None
        status = getattr(reason.value, "exitCode", None)
        if self._stopping:
            self.log.info("{app}: stopped", app=self.entry.name, port=self.entry.port,
                          reason=str(reason.value))
        else:
            self.log.error(
                "{app}: exited unexpectedly ({reason}); the next request starts it again",
                app=self.entry.name, port=self.entry.port, reason=str(reason.value),
                status=status,
            )
        self._stopping = False
        waiters, self._ended_waiters = self._ended_waiters, []
        for d in waiters:
            d.callback(None)




def void_page(entry: NamesEntry) -> bytes | None:
    """
    The C{void} file in an application's directory (at most 1 MiB): the
    answer when the application cannot be reached, or C{None}.
    """
    if not entry.dir:
        return None
    try:
        with (Path(entry.dir) / "void").open("rb") as f:
            return f.read(1 << 20)
    except OSError:
        return None
