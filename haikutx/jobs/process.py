# -*- test-case-name: haikutx.test.test_jobs -*-
"""
One job's process: started without a shell, its output kept in bounded
buffers, its wall-clock limit, and its stop (SIGTERM, then SIGKILL after a
grace period).
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import signal as signal_module
from collections.abc import Callable
from typing import Any

from attrs import define, evolve, field
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from haikutx.jobs.job import FINISHED, Job

#: Seconds between SIGTERM and SIGKILL when a job is stopped.
KILL_GRACE = 5.0

#: Seconds a job's pipes may stay open (held by a grandchild) after it exited.
DRAIN_TIME = 1.0

_SETPRIV = shutil.which("setpriv")


@define
class OutputBuffer:
    """
    The most recent C{limit} bytes of a stream.

    @ivar limit: bytes kept.
    @ivar data: the bytes kept.
    @ivar truncated: whether older bytes were dropped.
    """

    limit: int
    data: bytearray = field(factory=bytearray)
    truncated: bool = False

    def append(self, chunk: bytes) -> None:
        """
        Add C{chunk}, dropping the oldest bytes beyond the limit.
        """
        self.data += chunk
        excess = len(self.data) - self.limit
        if excess > 0:
            del self.data[:excess]
            self.truncated = True


@functools.lru_cache(maxsize=64)
def supplementary_groups(uid: int, gid: int) -> str:
    """
    The supplementary groups of C{uid} (what C{initgroups} would give it),
    comma-separated, as C{setpriv --groups} takes them; looked up once, not
    in every job.
    """
    try:
        name = pwd.getpwuid(uid).pw_name
        groups = os.getgrouplist(name, gid)
    except (KeyError, OSError):
        groups = [gid]
    return ",".join(str(g) for g in dict.fromkeys(groups))


def command_line(
    executable: str, argv: list[str], uid: int | None, gid: int | None
) -> tuple[str, list[str], int | None, int | None]:
    """
    How to start C{argv} as C{uid}/C{gid}.

    Twisted can start a process with C{posix_spawn} (cheap: no copy of this
    process) only when it keeps this process's user; so a job that must run
    as another user is started through C{setpriv}, which changes user and
    groups (the user's own groups, as Twisted's fork with C{initgroups}
    gives it) and then executes the command in the same process. Without
    C{setpriv}, Twisted forks.

    @return: the executable, arguments, uid and gid to give C{spawnProcess}.
    """
    if uid is None or _SETPRIV is None:
        return executable, argv, uid, gid
    group = gid if gid is not None else uid
    return (
        _SETPRIV,
        [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={group}",
            f"--groups={supplementary_groups(uid, group)}",
            "--",
            executable,
            *argv[1:],
        ],
        None,
        None,
    )


class _JobProtocol(ProcessProtocol):
    def __init__(self, process: JobProcess) -> None:
        self._process = process

    def connectionMade(self) -> None:
        # Nothing is ever written to a job: close its stdin, so a command
        # that reads it (cat -) ends instead of waiting forever.
        assert self.transport is not None
        # The pid, while the transport still knows it (a quick job may be
        # reaped before its spawn returns, and the transport forgets it).
        self._process.pid = self.transport.pid
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._process.stdout.append(data)
        self._process.changed()

    def errReceived(self, data: bytes) -> None:
        self._process.stderr.append(data)
        self._process.changed()

    def processExited(self, reason: Failure) -> None:
        self._process.exited()

    def processEnded(self, reason: Failure) -> None:
        status = reason.value
        self._process.ended(getattr(status, "exitCode", None), getattr(status, "signal", None))


class JobProcess:
    """
    The live state of one running job: its process, output and timers.

    @ivar job: the job as it was claimed.
    @ivar stdout: its output so far.
    @ivar stderr: its error output so far.
    @ivar done: fires with the finished L{Job} when the process has ended.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        job: Job,
        *,
        max_output: int,
        kill_grace: float = KILL_GRACE,
        drain_time: float = DRAIN_TIME,
        job_time: float | None = None,
        on_output: Callable[[JobProcess], None] = lambda p: None,
    ) -> None:
        self._reactor = reactor
        self.job = job
        self.stdout = OutputBuffer(max_output, bytearray(job.stdout), job.stdout_truncated)
        self.stderr = OutputBuffer(max_output, bytearray(job.stderr), job.stderr_truncated)
        self.on_output = on_output
        self._kill_grace = kill_grace
        self._drain_time = drain_time
        self._job_time = job_time
        self._transport: Any = None
        self._timers: dict[str, Any] = {}
        self._code: int | None = None
        self._signal: str | None = None
        self._error: str | None = None
        self.pid: int | None = None
        self._stop_requested: str | None = None
        self._snapshot: Job | None = None
        self.done: Deferred[Job] = Deferred()

    def changed(self) -> None:
        """
        Output arrived: the next L{snapshot} is a new one.
        """
        self._snapshot = None
        self.on_output(self)

    def snapshot(self) -> Job:
        """
        The job as it is now, output so far included: the same value until
        it changes (so that its JSON form can be reused).
        """
        if self._snapshot is None:
            self._snapshot = self._take_snapshot()
        return self._snapshot

    def _take_snapshot(self) -> Job:
        return evolve(
            self.job,
            stdout=bytes(self.stdout.data),
            stderr=bytes(self.stderr.data),
            stdout_truncated=self.stdout.truncated,
            stderr_truncated=self.stderr.truncated,
            error=self._error,
        )

    async def start(
        self,
        spawn: Any,
        environ: dict[str, str],
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        """
        Start the command, found on C{environ}'s C{PATH}.

        @param spawn: a L{haikutx.jobs.spawn.Spawn}.
        @raise OSError: when it is not found or cannot be started; the
            message says why.
        """
        job = self.job
        executable = await spawn.which(job.command, environ.get("PATH"))
        if executable is None:
            raise OSError(f"command not found: {job.command}")
        path, argv, uid, gid = command_line(executable, [job.command, *job.arguments], uid, gid)
        if uid is not None or gid is not None:
            # No setpriv here: Twisted forks and changes user itself.
            try:
                self._transport = self._reactor.spawnProcess(
                    _JobProtocol(self),
                    path,
                    argv,
                    env=environ,
                    uid=uid,
                    gid=gid,
                    childFDs={0: "w", 1: "r", 2: "r"},
                )
            except (OSError, ValueError) as e:
                raise OSError(f"cannot start {job.command}: {e}") from None
        else:
            try:
                self._transport = await spawn(_JobProtocol(self), path, argv, environ)
            except (OSError, ValueError) as e:
                raise OSError(f"cannot start {job.command}: {e}") from None
        if self.pid is None:
            self.pid = self._transport.pid
        if self._stop_requested is not None:
            self.terminate(self._stop_requested)
        elif self._job_time is not None:
            self._timers["job_time"] = self._reactor.callLater(
                self._job_time, self.terminate, "timeout"
            )

    def terminate(self, reason: str) -> None:
        """
        Stop the job: SIGTERM now, SIGKILL after the grace period.

        @param reason: the job's C{error} (C{"stopped"}, C{"timeout"},
            C{"interrupted"}), unless it already has one.
        """
        if self.done.called or "kill" in self._timers:
            return
        if self._transport is None:
            # Still starting: stopped as soon as it has started.
            self._stop_requested = reason
            return
        if self._error is None:
            self._error = reason
            self._snapshot = None
        self._cancel("job_time")
        self.log.info(
            "job {job_id} stopping ({reason}): SIGTERM to pid {pid}",
            job_id=self.job.id,
            reason=reason,
            pid=self.pid,
        )
        self._send("TERM")
        self._timers["kill"] = self._reactor.callLater(self._kill_grace, self._kill)

    def _kill(self) -> None:
        self._timers.pop("kill", None)
        self.log.warn(
            "job {job_id} ignored SIGTERM: SIGKILL to pid {pid}",
            job_id=self.job.id,
            pid=self.pid,
        )
        self._send("KILL")

    def _send(self, name: str) -> None:
        try:
            self._transport.signalProcess(name)
        except (ProcessExitedAlready, OSError):
            pass

    def _cancel(self, name: str) -> None:
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def exited(self) -> None:
        """
        The process is gone; a grandchild may still hold its pipes open.
        Give the output a moment, then close them so the job ends.
        """
        self._cancel("kill")
        self._cancel("job_time")
        if not self.done.called and self._transport is not None:
            self._timers["drain"] = self._reactor.callLater(
                self._drain_time, self._transport.loseConnection
            )

    def ended(self, code: int | None, signal: int | None) -> None:
        """
        The process and its pipes are closed: the job is finished.
        """
        for name in list(self._timers):
            self._cancel(name)
        self._code = code
        if signal is not None:
            try:
                self._signal = signal_module.Signals(signal).name
            except ValueError:
                self._signal = str(signal)
        self._transport = None
        finished = evolve(
            self._take_snapshot(),
            state=FINISHED,
            finished=self._reactor.seconds(),
            code=self._code,
            signal=self._signal,
        )
        self.done.callback(finished)
