# -*- test-case-name: haikutx.test.test_jobs -*-
"""
Starting job processes without stalling the reactor.

C{posix_spawn} is cheap for the parent (no copy of its memory), but the
calling thread waits until the child has executed the command, and on a
busy machine that can take milliseconds: every HTTP request waits with it.
L{ThreadSpawner} calls C{posix_spawn} in a thread of its own and hands the
child's pipes to the reactor as Twisted's own process transport does.
L{ReactorSpawner} calls C{spawnProcess} (for reactors without real
processes, such as test clocks).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.process import (
    Process,
    ProcessReader,
    ProcessWriter,
    _BaseProcess,
    registerReapProcessHandler,
)
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class Spawn(Protocol):
    """
    Starts processes for the job runner.
    """

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

    def stop(self) -> None:
        """
        Release what L{start} took.
        """


#: Seconds a command found on C{PATH} is not looked up again.
WHICH_TTL = 1.0


class ReactorSpawner:
    """
    Starts processes with the reactor's C{spawnProcess}.
    """

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

    def stop(self) -> None:
        pass


class _SpawnedProcess(Process):
    """
    Twisted's process transport for a child started elsewhere: the same
    pipes, reaping and signals, without the spawn in C{__init__}.
    """

    def __init__(self, reactor: Any, protocol: Any, pid: int) -> None:
        _BaseProcess.__init__(self, protocol)
        self._reactor = reactor
        self.pipes = {}
        self.pid = pid
        self.proto = protocol


def _inherited_fds(keep: set[int]) -> list[int]:
    """
    The descriptors above 2 a child would inherit (not close-on-exec), other
    than C{keep}.
    """
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd in keep:
            continue
        try:
            if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                found.append(fd)
        except OSError:
            pass
    return found


def _spawn(
    executable: str, argv: list[str], environ: dict[str, str], fdmap: dict[int, int]
) -> int:
    """
    In a thread: start the child with C{fdmap}'s pipes as its 0, 1 and 2,
    every other descriptor closed, signals at their defaults.
    """
    actions: list[tuple[Any, ...]] = [
        (os.POSIX_SPAWN_DUP2, parent, child) for child, parent in fdmap.items()
    ]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inherited_fds(set(fdmap.values()))]
    ignored = [n for n in range(1, signal.NSIG) if signal.getsignal(n) == signal.SIG_IGN]
    return os.posix_spawn(
        executable, argv, environ, file_actions=actions, setsigdef=ignored, setsigmask=()
    )


class ThreadSpawner:
    """
    Starts processes with C{posix_spawn} in a thread pool of its own, so
    the reactor goes on serving requests meanwhile.
    """

    def __init__(self, reactor: Any, threads: int = 2) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=threads, name="haikutx-jobs-spawn")
        self._trigger: Any = None
        self._found: dict[tuple[str, str | None], tuple[float, str | None]] = {}

    def start(self) -> None:
        """
        Start the thread pool; it is stopped at reactor shutdown at the
        latest, so that its threads never keep the process alive.
        """
        self._pool.start()
        self._trigger = self._reactor.addSystemEventTrigger("after", "shutdown", self._shutdown)

    def _shutdown(self) -> None:
        self._trigger = None
        self.stop()

    def stop(self) -> None:
        """
        Stop the thread pool (after the spawns under way).
        """
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        if self._pool.started:
            self._pool.stop()

    def which(self, command: str, path: str | None) -> Deferred[str | None]:
        """
        Find C{command} on C{path} in the thread (a C{stat} per C{PATH}
        entry); an answer is reused for L{WHICH_TTL} seconds.
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

        return deferToThreadPool(
            self._reactor, self._pool, shutil.which, command, os.F_OK | os.X_OK, path
        ).addCallback(found)

    def __call__(
        self, protocol: Any, executable: str, argv: list[str], environ: dict[str, str]
    ) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._start(protocol, executable, argv, environ))

    async def _start(
        self, protocol: Any, executable: str, argv: list[str], environ: dict[str, str]
    ) -> Any:
        stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
        stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
        stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
        child = {0: stdin_r, 1: stdout_w, 2: stderr_w}
        try:
            pid = await deferToThreadPool(
                self._reactor, self._pool, _spawn, executable, argv, environ, child
            )
        except BaseException:
            for fd in (stdin_r, stdin_w, stdout_r, stdout_w, stderr_r, stderr_w):
                os.close(fd)
            raise
        for fd in child.values():
            os.close(fd)
        process = _SpawnedProcess(self._reactor, protocol, pid)
        process.pipes[0] = ProcessWriter(
            self._reactor, process, 0, stdin_w, forceReadHack=True
        )
        process.pipes[1] = ProcessReader(self._reactor, process, 1, stdout_r)
        process.pipes[2] = ProcessReader(self._reactor, process, 2, stderr_r)
        protocol.makeConnection(process)
        registerReapProcessHandler(pid, process)
        return process


def default_spawner(reactor: Any) -> ThreadSpawner | ReactorSpawner:
    """
    L{ThreadSpawner} on a real POSIX reactor, else L{ReactorSpawner}.
    """
    from twisted.internet.posixbase import PosixReactorBase

    if isinstance(reactor, PosixReactorBase) and hasattr(os, "posix_spawn"):
        return ThreadSpawner(reactor)
    return ReactorSpawner(reactor)
