# -*- test-case-name: haikutx.test.test_jobs -*-
"""
The processes of the jobs a runner runs: each job in a L{JobProcess}
started through the runner's spawner (its launcher), its output saved every
C{flush_interval} while it runs, its end (or its failure to start) given
back to the runner.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from attrs import evolve
from twisted.logger import LogLevel

from haikutx.events import EventEmitter
from haikutx.jobs.job import FINISHED, Job
from haikutx.jobs.process import JobProcess
from haikutx.jobs.spawn import Spawn


class RunningJobs:
    """
    Start and watch the runner's job processes.

    @param reactor: the reactor.
    @param spawn: starts processes (the launcher).
    @param running: the runner's running jobs by id, kept here.
    @param environ: the environment of commands.
    @param uid: run commands as this user id (C{None}: as this process),
        unless the spawner is that user already.
    @param gid: run commands with this group id.
    @param max_output: bytes of stdout and of stderr kept per job.
    @param kill_grace: seconds between SIGTERM and SIGKILL.
    @param drain_time: seconds output pipes may outlive the process.
    @param job_time: wall-clock limit of a job in seconds, or C{None}.
    @param flush_interval: seconds between saves of running output.
    @param save: saves a job as it is now.
    @param ended: told each job that ended (or did not start), finished.
    @param background: runs a coroutine, logging its failure.
    @param log: the runner's logger.
    """

    def __init__(
        self,
        reactor: Any,
        spawn: Spawn,
        running: dict[str, JobProcess],
        *,
        environ: dict[str, str],
        uid: int | None,
        gid: int | None,
        max_output: int,
        kill_grace: float,
        drain_time: float,
        job_time: float | None,
        flush_interval: float,
        save: Callable[[Job], None],
        ended: Callable[[Job], None],
        background: Callable[[Coroutine[Any, Any, None], str], None],
        log: Any,
    ) -> None:
        self._reactor = reactor
        self._spawn = spawn
        self._running = running
        self._environ = environ
        self._uid = uid
        self._gid = gid
        self._max_output = max_output
        self._kill_grace = kill_grace
        self._drain_time = drain_time
        self._job_time = job_time
        self._flush_interval = flush_interval
        self._save = save
        self._ended = ended
        self._background = background
        self.log = log
        self._emit = EventEmitter(log, LogLevel.info)
        self._flushes: dict[str, Any] = {}

    def run(self, job: Job, soon: bool = False) -> None:
        """
        Run C{job}: at once, or, when C{soon}, at the reactor's next turn,
        once the answer that accepted it is out (the 202 does not wait for
        the job's start: building its process and the write to the
        launcher); it is this runner's running job either way (a stop
        meanwhile stops it as soon as it has started).
        """
        process = JobProcess(
            self._reactor,
            job,
            max_output=self._max_output,
            kill_grace=self._kill_grace,
            drain_time=self._drain_time,
            job_time=self._job_time,
            on_output=self._output,
        )
        self._running[job.id] = process
        if soon:
            self._reactor.callLater(0, self._start_soon, process)
        else:
            self._background(self._start(process), "starting a job")

    def log_accepted(self, job: Job) -> None:
        """
        Log that C{job} was accepted.
        """
        self._emit(
            f"job {job.id} accepted: {job.command} {job.arguments}",
            {"job_id": job.id, "command": job.command, "arguments": job.arguments},
        )

    def _start_soon(self, process: JobProcess) -> None:
        self._background(self._start(process, accepted=True), "starting a job")

    async def _start(self, process: JobProcess, accepted: bool = False) -> None:
        """
        Start C{process}'s command and log its start; when C{accepted}, the
        job was accepted just now (to run at once), and one event says both
        (an event costs about as much as a tenth of a short job).
        """
        job = process.job
        try:
            if self._spawn.switches_user:
                # Its launcher is the jobs' user already.
                await process.start(self._spawn, self._environ)
            else:
                await process.start(self._spawn, self._environ, self._uid, self._gid)
        except OSError as e:
            self._running.pop(job.id, None)
            if accepted:
                self.log_accepted(job)
            self.log.warn("job {job_id}: {reason}", job_id=job.id, reason=str(e))
            self._ended(
                evolve(job, state=FINISHED, finished=self._reactor.seconds(), error=str(e))
            )
            return
        if accepted:
            self._emit(
                f"job {job.id} accepted and started: {job.command} {job.arguments}: "
                f"pid {process.pid}",
                {
                    "job_id": job.id,
                    "command": job.command,
                    "arguments": job.arguments,
                    "pid": process.pid,
                },
            )
        else:
            self._emit(
                f"job {job.id} started: pid {process.pid}",
                {"job_id": job.id, "pid": process.pid},
            )
        process.done.addCallback(self._done)
        process.done.addErrback(
            lambda f: self.log.failure("job {job_id} crashed", f, job_id=job.id)
        )

    def _output(self, process: JobProcess) -> None:
        job_id = process.job.id
        if job_id not in self._flushes:
            self._flushes[job_id] = self._reactor.callLater(
                self._flush_interval, self._flush, process
            )

    def _flush(self, process: JobProcess) -> None:
        self._flushes.pop(process.job.id, None)
        if process.job.id in self._running:
            self._save(process.snapshot())

    def _done(self, job: Job) -> None:
        self._running.pop(job.id, None)
        flush = self._flushes.pop(job.id, None)
        if flush is not None and flush.active():
            flush.cancel()
        self._ended(job)
