# -*- test-case-name: haikutx.test.test_jobs -*-
"""
Starting job processes without stalling the reactor.

L{LauncherSpawner} hands the jobs to the launcher (L{haikutx.jobs.launcher}),
a small process of the runner's own: it starts each job with C{posix_spawn}
(waiting for the C{exec} on its own, not on the reactor), reads its output,
reaps it and reports all of it over one pipe. The runner has no pipes,
C{SIGCHLD} or reap per job, and a runner that dies takes its jobs with it:
the launcher kills them when its pipe from the runner closes.
L{ReactorSpawner} calls C{spawnProcess} (for reactors without real
processes, such as test clocks).

Jobs that run as another user (C{--user}) get a launcher that is that user:
it starts each command with one C{posix_spawn}, with no C{setpriv} between
(an C{exec} and most of a job's cost). The jobs can signal such a launcher,
as they can signal each other: one that dies is started again (its jobs end
as failed), one that is stopped gets C{SIGCONT} within L{CONTINUE_INTERVAL}.
"""

from __future__ import annotations

import itertools
import marshal
import os
import shutil
import signal
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from haikutx.jobs.process import supplementary_groups
from haikutx.net.sending import write as send_now


class Spawn(Protocol):
    """
    Starts processes for the job runner.

    @ivar switches_user: whether the processes it starts already run as the
        jobs' user (else a job for another user goes through C{setpriv}).
    """

    switches_user: bool

    def __call__(
        self, protocol: Any, executable: str, argv: list[str], environ: dict[str, str]
    ) -> Deferred[Any]:
        """
        Start C{argv} with C{executable}: stdin a pipe the protocol's
        transport writes to, stdout and stderr pipes it reads.

        @return: a L{Deferred} firing with the process transport.
        """

    def which(self, command: str, path: str | None) -> Deferred[str | None]:
        """
        Find C{command} on C{path} (the C{PATH} of the job's environment).

        @return: a L{Deferred} firing with the executable, or C{None}.
        """

    def start(self) -> None:
        """
        Get ready (before the first call).
        """

    def stop(self) -> Deferred[None]:
        """
        Release what L{start} took.

        @return: a L{Deferred} that fires once it is released.
        """


#: Seconds a command found on C{PATH} is not looked up again.
WHICH_TTL = 1.0

#: Seconds between the C{SIGCONT}s a launcher run as the jobs' user gets
#: (a job can stop it).
CONTINUE_INTERVAL = 1.0

#: A launcher that ends sooner than this after its start (seconds) is
#: started again only after a wait, doubled each time from
#: L{RESTART_FIRST_WAIT} up to L{RESTART_LONGEST_WAIT}: one that cannot
#: start (or that a job kills again and again) is not restarted in a tight
#: loop.  One that ran longer is started again at once.
RESTART_STABLE = 5.0
RESTART_FIRST_WAIT = 0.1
RESTART_LONGEST_WAIT = 5.0


class ReactorSpawner:
    """
    Starts processes with the reactor's C{spawnProcess}.

    @ivar switches_user: C{False}: processes are started as this process's
        user; a job to be run as another goes through C{setpriv}.
    """

    switches_user = False

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def __call__(
        self, protocol: Any, executable: str, argv: list[str], environ: dict[str, str]
    ) -> Deferred[Any]:
        transport = self._reactor.spawnProcess(
            protocol, executable, argv, env=environ, childFDs={0: "w", 1: "r", 2: "r"}
        )
        return succeed(transport)

    def which(self, command: str, path: str | None) -> Deferred[str | None]:
        return succeed(shutil.which(command, path=path))

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return succeed(None)


#: The launcher's program (standard library only).
LAUNCHER = str(Path(__file__).with_name("launcher.py"))

_HEADER = struct.Struct("!I")


def wait_reason(status: int) -> Failure:
    """
    The C{processEnded} reason of a process with this wait status, as
    Twisted gives it: L{ProcessDone} for exit code 0, else
    L{ProcessTerminated} with the code or the signal.
    """
    if os.WIFEXITED(status):
        code, number = os.WEXITSTATUS(status), None
    else:
        code, number = None, os.WTERMSIG(status)
    if code == 0:
        return Failure(ProcessDone(status))
    return Failure(ProcessTerminated(code, number, status))


class _LaunchedProcess:
    """
    The transport of a job the launcher started: signals and the closing of
    its pipes go through the launcher, which knows whether it is reaped.
    """

    def __init__(self, spawner: LauncherSpawner, handle: int, pid: int, protocol: Any) -> None:
        self._spawner = spawner
        self._handle = handle
        self.pid: int | None = pid
        self.proto = protocol
        self.exited = False

    def signalProcess(self, name: str | int) -> None:
        """
        Send a signal (C{"TERM"}, C{"KILL"}, … or a number) to the job.

        @raise ProcessExitedAlready: when it has exited.
        """
        if self.exited:
            raise ProcessExitedAlready()
        number = name if isinstance(name, int) else getattr(signal, f"SIG{name}")
        self._spawner._send(("kill", self._handle, int(number)))

    def closeStdin(self) -> None:
        """
        Nothing to do: a job's stdin is C{/dev/null}.
        """

    def loseConnection(self) -> None:
        """
        Close the job's output pipes (a process it left behind holds them).
        """
        self._spawner._send(("close", self._handle))


class _LauncherProtocol(ProcessProtocol):
    def __init__(self, spawner: LauncherSpawner) -> None:
        self._spawner = spawner
        self._buffer = b""

    def outReceived(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        start = 0
        size = len(buffer)
        while size - start >= 4:
            (length,) = _HEADER.unpack_from(buffer, start)
            end = start + 4 + length
            if end > size:
                break
            self._spawner._received(marshal.loads(buffer[start + 4 : end]))
            start = end
        self._buffer = buffer[start:]

    def errReceived(self, data: bytes) -> None:
        self._spawner.log.error(
            "job launcher: {output}", output=data.decode("utf-8", "replace").rstrip()
        )

    def processEnded(self, reason: Failure) -> None:
        self._spawner._launcher_ended(self, reason)


class LauncherSpawner:
    """
    Starts jobs through the launcher process (L{LAUNCHER}), one per runner,
    started by L{start} and started again if it ever dies (the jobs it ran
    then end as failed).

    @ivar switches_user: whether the launcher itself runs as the jobs' user
        (a C{uid} was given): jobs are then started as they are, without
        C{setpriv}.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        python: str = sys.executable,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        """
        @param uid: the user the launcher (and so every job) runs as, or
            C{None}: this process's (also when this process is not root).
        @param gid: its group (default: C{uid}); its supplementary groups
            are the user's own.
        """
        self._reactor = reactor
        self._python = python
        self._user: list[str] = []
        if uid is not None and os.geteuid() == 0:
            # Only root can become another user; otherwise jobs go the way
            # they went before (C{setpriv}, which fails for them alike).
            group = gid if gid is not None else uid
            self._user = [str(uid), str(group), supplementary_groups(uid, group)]
        self.switches_user = bool(self._user)
        self._continue: Any = None
        self._transport: Any = None
        self._protocol: _LauncherProtocol | None = None
        self._handles = itertools.count(1)
        self._environ: dict[str, str] | None = None
        self._starting: dict[int, tuple[Any, Deferred[Any]]] = {}
        self._running: dict[int, _LaunchedProcess] = {}
        self._finding: dict[int, Deferred[str | None]] = {}
        self._found: dict[tuple[str, str | None], tuple[float, str | None]] = {}
        self._stopping = False
        self._stopped: Deferred[None] | None = None
        #: When the launcher was last started, and the wait before the next
        #: start after a quick end (0: none yet).
        self._launched = 0.0
        self._restart_wait = 0.0
        self._restart: Any = None
        #: What was asked of the launcher while it waited to be started
        #: again, asked of it once it is.
        self._held: list[Callable[[], None]] = []

    # -- life --

    def start(self) -> None:
        """
        Start the launcher.
        """
        self._stopping = False
        self._launch()

    def _launch(self) -> None:
        self._restart = None
        self._launched = self._reactor.seconds()
        self._environ = None
        self._protocol = _LauncherProtocol(self)
        self._transport = self._reactor.spawnProcess(
            self._protocol,
            self._python,
            [self._python, "-I", LAUNCHER, str(os.getpid()), *self._user],
            env={},
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        if self.switches_user and self._continue is None:
            self._continue = self._reactor.callLater(CONTINUE_INTERVAL, self._keep_going)
        held, self._held = self._held, []
        for ask in held:
            ask()

    def _keep_going(self) -> None:
        """
        Continue the launcher, in case a job stopped it; again later.
        """
        self._continue = None
        if self._transport is None or self._stopping:
            return
        try:
            self._transport.signalProcess(signal.SIGCONT)
        except (ProcessExitedAlready, OSError):
            pass
        self._continue = self._reactor.callLater(CONTINUE_INTERVAL, self._keep_going)

    def stop(self) -> Deferred[None]:
        """
        Close the launcher's pipe: it kills the jobs still running (none,
        after the runner's stop) and exits.

        @return: a L{Deferred} that fires once it has exited.
        """
        self._stopping = True
        if self._continue is not None and self._continue.active():
            self._continue.cancel()
        self._continue = None
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        held, self._held = self._held, []
        for ask in held:
            ask()
        if self._transport is None:
            return succeed(None)
        if self._stopped is None:
            self._stopped = Deferred()
            self._transport.closeStdin()
        return self._stopped

    def _launcher_ended(self, protocol: _LauncherProtocol, reason: Failure) -> None:
        if protocol is not self._protocol:
            return
        self._transport = None
        self._protocol = None
        starting, self._starting = self._starting, {}
        running, self._running = self._running, {}
        finding, self._finding = self._finding, {}
        for _, d in starting.values():
            d.errback(OSError("the job launcher exited"))
        for d in finding.values():
            d.errback(OSError("the job launcher exited"))
        for process in running.values():
            process.exited = True
            failure = Failure(ProcessTerminated(None, None, None))
            process.proto.processExited(failure)
            process.proto.processEnded(failure)
        if self._stopping:
            stopped, self._stopped = self._stopped, None
            if stopped is not None:
                stopped.callback(None)
            return
        self._start_again(f"exited ({reason.value})")

    def _start_again(self, why: str) -> None:
        """
        Start the launcher again, which ended (or could not be started):
        at once after a long run, else after the back-off's wait.
        """
        if self._reactor.seconds() - self._launched >= RESTART_STABLE:
            self._restart_wait = 0.0
        else:
            self._restart_wait = min(
                max(self._restart_wait * 2, RESTART_FIRST_WAIT), RESTART_LONGEST_WAIT
            )
        if not self._restart_wait:
            self.log.error("job launcher {why}: started again", why=why)
            self._relaunch()
            return
        self.log.error(
            "job launcher {why} {ran:.2f} s after its start: started again in {wait:g} s",
            why=why,
            ran=self._reactor.seconds() - self._launched,
            wait=self._restart_wait,
        )
        self._restart = self._reactor.callLater(self._restart_wait, self._relaunch)

    def _relaunch(self) -> None:
        """
        Start the launcher again; if it cannot be started now (no process
        can be made), what waited for it fails and it is tried again after
        a longer wait.
        """
        try:
            self._launch()
        except OSError as e:
            self._transport = self._protocol = None
            held, self._held = self._held, []
            for ask in held:
                ask()
            self._start_again(f"could not be started ({e})")

    # -- messages --

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._transport is None:
            return
        body = marshal.dumps(message)
        writer = self._transport.pipes.get(0)
        if writer is None:
            return
        send_now(writer, _HEADER.pack(len(body)) + body)

    def _received(self, message: tuple[Any, ...]) -> None:
        kind, handle = message[0], message[1]
        if kind == "out":
            process = self._running.get(handle)
            if process is not None:
                process.proto.childDataReceived(message[2], message[3])
        elif kind == "ended":
            process = self._running.pop(handle, None)
            if process is not None:
                reason = wait_reason(message[2])
                if not process.exited:
                    process.exited = True
                    process.proto.processExited(reason)
                process.pid = None
                process.proto.processEnded(reason)
        elif kind == "started":
            protocol, d = self._starting.pop(handle)
            process = _LaunchedProcess(self, handle, message[2], protocol)
            self._running[handle] = process
            protocol.makeConnection(process)
            d.callback(process)
        elif kind == "exited":
            process = self._running.get(handle)
            if process is not None:
                process.exited = True
                process.proto.processExited(Failure(ProcessDone(0)))
        elif kind == "failed":
            _, d = self._starting.pop(handle)
            d.errback(OSError(message[2], message[3], message[4]))
        elif kind == "found":
            self._finding.pop(handle).callback(message[2])

    # -- Spawn --

    def which(self, command: str, path: str | None) -> Deferred[str | None]:
        """
        Find C{command} on C{path} in the launcher; an answer is reused for
        L{WHICH_TTL} seconds.
        """
        key = (command, path)
        now = self._reactor.seconds()
        cached = self._found.get(key)
        if cached is not None and now - cached[0] < WHICH_TTL:
            return succeed(cached[1])

        def found(executable: str | None) -> str | None:
            if len(self._found) > 1000:
                self._found.clear()
            self._found[key] = (now, executable)
            return executable

        if self._transport is None:
            return self._when_launched(lambda: self.which(command, path))
        handle = next(self._handles)
        d: Deferred[str | None] = Deferred()
        self._finding[handle] = d
        self._send(("which", handle, command, path))
        return d.addCallback(found)

    def _when_launched(self, ask: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        """
        C{ask()} once the launcher is started again (it waits to be); or,
        if it will not be (the spawner stops), an L{OSError}.
        """
        if self._restart is None or self._stopping:
            return fail(OSError("the job launcher is not running"))
        d: Deferred[Any] = Deferred()

        def again() -> None:
            if self._transport is None:
                d.errback(OSError("the job launcher is not running"))
            else:
                ask().chainDeferred(d)

        self._held.append(again)
        return d

    def __call__(
        self, protocol: Any, executable: str, argv: list[str], environ: dict[str, str]
    ) -> Deferred[Any]:
        if self._transport is None:
            if self._restart is None or self._stopping:
                raise OSError("the job launcher is not running")
            return self._when_launched(lambda: self(protocol, executable, argv, environ))
        if environ is not self._environ:
            # Sent once for the runner's one environment.
            self._send(("env", dict(environ)))
            self._environ = environ
        handle = next(self._handles)
        d: Deferred[Any] = Deferred()
        self._starting[handle] = (protocol, d)
        self._send(("start", handle, executable, list(argv)))
        return d


def default_spawner(
    reactor: Any, uid: int | None = None, gid: int | None = None
) -> LauncherSpawner | ReactorSpawner:
    """
    L{LauncherSpawner} (run as C{uid}/C{gid} when given) on a real POSIX
    reactor, else L{ReactorSpawner}.
    """
    from twisted.internet.posixbase import PosixReactorBase

    if isinstance(reactor, PosixReactorBase) and hasattr(os, "pidfd_open"):
        return LauncherSpawner(reactor, uid=uid, gid=gid)
    return ReactorSpawner(reactor)
