# -*- test-case-name: haikutx.test.test_jobs -*-
"""
The job runner: accepts jobs into its L{IJobStore}'s queue, claims them as
running slots free up, runs each in a L{JobProcess}, saves the outcome and
sends the completion callback.

With a shared store (PostgreSQL) several runners serve one queue: each
claims jobs for its own free slots, keeps a lease with a heartbeat, hears of
new jobs and of stop requests from the store, and takes over the jobs of a
runner whose lease ran out.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from haikutx.interfaces import IJobStore
from haikutx.jobs.callbacks import (
    CallbackSender,
    PostCallback,
    callback_poster,
)
from haikutx.jobs.claims import Claims
from haikutx.jobs.ends import JobEnds, counted
from haikutx.jobs.eviction import Eviction
from haikutx.jobs.job import (
    FINISHED,
    PENDING,
    QUEUED,
    RUNNING,
    Job,
)
from haikutx.jobs.known import KnownJobs
from haikutx.jobs.process import DRAIN_TIME, KILL_GRACE, JobProcess
from haikutx.jobs.request import check_job
from haikutx.jobs.running import RunningJobs
from haikutx.jobs.spawn import Spawn, default_spawner
from haikutx.net.addresses import AddressRules

#: Seconds between saves of a running job's output.
FLUSH_INTERVAL = 0.5

#: Seconds between a runner's heartbeats on a shared store.
HEARTBEAT_INTERVAL = 2.0

#: Seconds without a heartbeat after which a runner is taken to be gone.
LEASE = 10.0

#: Seconds between looks at a shared queue (besides its notifications).
POLL_INTERVAL = 1.0



class JobRunner:
    """
    Runs jobs: the queue in the store, at most C{max_running} processes at
    once, output, durability, callbacks.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        store: IJobStore,
        *,
        whitelist: Iterable[str] | None = None,
        max_jobs: int = 100,
        max_running: int = 2,
        job_time: float | None = None,
        max_output: int = 1048576,
        post_callback: PostCallback | None = None,
        allow: Sequence[str] = (),
        uid: int | None = None,
        gid: int | None = None,
        environ: dict[str, str] | None = None,
        kill_grace: float = KILL_GRACE,
        drain_time: float = DRAIN_TIME,
        flush_interval: float = FLUSH_INTERVAL,
        callback_give_up_after: float = 600.0,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        lease: float = LEASE,
        poll_interval: float = POLL_INTERVAL,
        owner: str | None = None,
        spawn: Spawn | None = None,
        evict_delay: float = 1.0,
    ) -> None:
        """
        @param reactor: provides L{IReactorTime} and L{IReactorProcess}.
        @param store: where jobs are kept.
        @param whitelist: the only commands allowed (exact names), or
            C{None} to allow every command.
        @param max_jobs: finished jobs kept; the oldest finished are evicted.
        @param max_running: jobs this runner runs at once.
        @param job_time: wall-clock limit of a job in seconds, or C{None}.
        @param max_output: bytes of stdout and of stderr kept per job.
        @param post_callback: sends a callback (default: L{callback_poster}).
        @param allow: the C{--allow} URL prefixes (the address rules).
        @param uid: run commands as this user id (C{None}: as this process).
        @param gid: run commands with this group id.
        @param environ: the environment of commands (default: this process's).
        @param kill_grace: seconds between SIGTERM and SIGKILL.
        @param drain_time: seconds output pipes may outlive the process.
        @param flush_interval: seconds between saves of running output.
        @param callback_give_up_after: seconds callbacks are retried.
        @param heartbeat_interval: seconds between heartbeats (shared store).
        @param lease: seconds without a heartbeat after which another
            runner takes this one's jobs over (shared store).
        @param poll_interval: seconds between looks at a shared queue.
        @param owner: this runner's name in the store (default: random).
        @param spawn: starts processes (default: L{default_spawner}).
        @param evict_delay: seconds after a job finished before finished jobs
            beyond C{max_jobs} are evicted (one eviction for many jobs).
        """
        self._reactor = reactor
        self._store = store
        self.whitelist = None if whitelist is None else frozenset(whitelist)
        self._max_running = max_running
        self._rules = AddressRules.from_prefixes(tuple(allow))
        self._post = post_callback or callback_poster(reactor, self._rules)
        self._spawn = spawn if spawn is not None else default_spawner(reactor, uid, gid)
        self._kill_grace = kill_grace
        self._heartbeat_interval = heartbeat_interval
        self._lease = lease
        self._poll_interval = poll_interval
        self.owner = owner or secrets.token_hex(8)
        self._running: dict[str, JobProcess] = {}
        #: What this runner knows of jobs without its store, and its saves.
        self._known = KnownJobs(store, self.owner, self.log)
        self._queued = self._known.queued
        #: The completion callbacks under way.
        self._callbacks = CallbackSender(
            reactor,
            self._post,
            callback_give_up_after,
            self._known.write,
            self.log,
        )
        self._ticks: list[Any] = []
        self._reserved = 0
        #: The claiming of queued jobs for free slots.
        self._claims = Claims(
            reactor,
            store,
            self.owner,
            lambda: self._max_running - len(self._running) - self._reserved,
            self._run,
            self._queued,
            self.log,
        )
        #: The processes of the jobs this runner runs.
        self._jobs = RunningJobs(
            reactor,
            self._spawn,
            self._running,
            environ=dict(os.environ if environ is None else environ),
            uid=uid,
            gid=gid,
            max_output=max_output,
            kill_grace=kill_grace,
            drain_time=drain_time,
            job_time=job_time,
            flush_interval=flush_interval,
            save=self._known.write,
            ended=self._ended,
            background=self._background,
            log=self.log,
        )
        #: The eviction of finished jobs beyond C{max_jobs}.
        self._eviction = Eviction(
            reactor, store, max_jobs, evict_delay, self._known.forget, self._background, self.log
        )
        #: Jobs' ends, and the waits for them.
        self._ends = JobEnds(
            self._known,
            self._callbacks,
            self._eviction,
            lambda: self._stopping,
            lambda: self._ready,
            self.log,
        )
        self._ready = False
        self._stopping = False
        self._ready_waiters: list[Deferred[None]] = []

    # -- life --

    async def start(self) -> None:
        """
        Open the store and take over the jobs of runners that are gone (for
        a store of its own: the previous process): their running jobs
        finish with C{"error": "interrupted"}, and their pending callbacks
        are sent (again). Queued jobs stay queued and run.
        """
        self._spawn.start()
        await self._store.open()
        self._store.listen(self._queued_elsewhere, self._cancel_requested)
        await self._store.heartbeat(self.owner)
        await self._recover()
        self._ready = True
        self._claims.start()
        self.log.info("job runner {owner} ready", owner=self.owner)
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self._store.shared:
            self._every(self._heartbeat_interval, self._beat)
            self._every(self._poll_interval, self._claims.soon)
        self._eviction.soon(at_once=not self._ready)
        self._claims.soon()

    async def wait_ready(self) -> None:
        """
        Wait until L{start} has recovered the store's jobs.
        """
        if not self._ready:
            waiter: Deferred[None] = Deferred()
            self._ready_waiters.append(waiter)
            await waiter

    async def stop(self) -> None:
        """
        Stop every running job (finished as C{"interrupted"}, its callback
        left pending for whichever runner starts next), stop sending
        callbacks, save everything and close the store.
        """
        self._stopping = True
        for call in self._ticks:
            if call.active():
                call.cancel()
        self._ticks.clear()
        self._eviction.stop()
        await self._claims.stop()
        ends = []
        for process in list(self._running.values()):
            ends.append(self._ends.wait(process.job.id))
            process.terminate("interrupted")
        if ends:
            await DeferredList(ends, consumeErrors=True)
        self._callbacks.cancel_all()
        await self._store.retire(self.owner)
        await self._store.close()
        await self._spawn.stop()

    def _every(self, interval: float, f: Any) -> None:
        def tick() -> None:
            self._ticks.remove(call)
            if self._stopping:
                return
            try:
                f()
            finally:
                self._every(interval, f)

        call = self._reactor.callLater(interval, tick)
        self._ticks.append(call)

    def _beat(self) -> None:
        async def beat() -> None:
            await self._store.heartbeat(self.owner)
            await self._recover()

        self._background(beat(), "heartbeat")

    async def _recover(self) -> None:
        now = self._reactor.seconds()
        lease = self._lease if self._store.shared else 0.0
        taken = await self._store.recover(self.owner, lease, now)
        for job in taken:
            if job.error == "interrupted" and job.finished == now:
                counted("interrupted")
                self.log.warn(
                    "job {job_id} was running on a runner that is gone: interrupted",
                    job_id=job.id,
                )
            if job.callback_outcome is not None and job.callback_outcome.status == PENDING:
                self._callbacks.send(job)

    def _background(self, coroutine: Any, what: str) -> None:
        d = Deferred.fromCoroutine(coroutine)

        def failed(failure: Failure) -> None:
            if not self._stopping:
                self.log.failure("job runner: {what} failed", failure, what=what)

        d.addErrback(failed)

    # -- API --

    @property
    def ready(self) -> bool:
        """
        Whether L{start} has recovered the store's jobs.
        """
        return self._ready

    def check(self, command: str, arguments: list[str], callback: str | None) -> None:
        """
        Refuse a job L{submit} would refuse.

        @raise JobRefused: for a command outside the whitelist, a bad
            callback URL, or NUL characters.
        """
        check_job(self.whitelist, self._rules, command, arguments, callback)

    async def submit(self, command: str, arguments: list[str], callback: str | None) -> Job:
        """
        Accept a job: it is queued, durably, and runs when a running slot
        (of any runner sharing the store) frees up.

        @return: the job as stored.
        @raise JobRefused: for a command outside the whitelist, a bad
            callback URL, or NUL characters.
        """
        self.check(command, arguments, callback)
        await self.wait_ready()
        now = self._reactor.seconds()
        job = Job(
            id=secrets.token_hex(20),
            seq=0,
            command=command,
            arguments=list(arguments),
            callback=callback,
            created=now,
        )
        # A free slot here and no older job waiting: the job is stored as
        # this runner's, running, in the same commit (no claim to follow).
        direct = (
            not self._stopping
            and not self._claims.maybe_queued
            and len(self._running) + self._reserved < self._max_running
        )
        if direct:
            job = evolve(job, state=RUNNING, owner=self.owner, started=now)
            self._reserved += 1
        else:
            self._claims.queued()
        try:
            stored = await self._store.add(job)
        finally:
            if direct:
                self._reserved -= 1
        counted("accepted")
        if not direct:
            # Logged once the answer is out (at the reactor's next turn,
            # before anything the job's start brings back).
            self._reactor.callLater(0, self._jobs.log_accepted, job)
            if not self._store.shared and stored.state == QUEUED:
                self._queued[stored.id] = stored
            self._claims.soon()
        elif self._stopping:
            await self._store.save(
                evolve(stored, state=QUEUED, owner=None, started=None), self.owner
            )
        else:
            self._run(stored, soon=True)
        return stored

    async def get(self, job_id: str) -> Job | None:
        """
        The job with this id as it is now (live output when this runner
        runs it), or C{None}.
        """
        known = self.peek(job_id)
        if known is not None:
            return known
        return await self._store.get(job_id)

    def peek(self, job_id: str) -> Job | None:
        """
        The job with this id as this runner knows it without asking the
        store: one it runs, one whose save is under way, or (with a store of
        its own) one it finished lately; else C{None}.
        """
        if not self._ready:
            return None
        process = self._running.get(job_id)
        if process is not None:
            return process.snapshot()
        return self._known.get(job_id)

    async def cancel(self, job_id: str) -> Job | None:
        """
        Stop a job: a queued one never runs, a running one (on this runner
        or another) gets SIGTERM and SIGKILL after the grace period; either
        finishes with C{"error": "stopped"}. A finished job is left as it is.

        @return: the job, once finished (or as it is when another runner
            did not stop it within the grace period and a few seconds), or
            C{None} when unknown.
        """
        process = self._running.get(job_id)
        if process is not None:
            finished = self._ends.wait(job_id)
            process.terminate("stopped")
            return await finished
        job = await self._store.cancel_queued(job_id, self.owner, self._reactor.seconds())
        if job is not None:
            self._queued.pop(job_id, None)
            self.log.info("job {job_id} stopped before it started", job_id=job_id)
            self._ends.finished(job, saved=True)
            return job
        job = await self._store.get(job_id)
        if job is None or job.state != RUNNING:
            return job
        process = self._running.get(job_id)
        if process is not None:
            finished = self._ends.wait(job_id)
            process.terminate("stopped")
            return await finished
        await self._store.request_cancel(job_id)
        for _ in range(int((self._kill_grace + 5.0) / 0.1) + 1):
            await deferLater(self._reactor, 0.1)
            job = await self._store.get(job_id)
            if job is None or job.state == FINISHED:
                return job
        return job

    # -- running --

    def _queued_elsewhere(self) -> None:
        self._claims.queued()
        self._claims.soon()

    def _run(self, job: Job, soon: bool = False) -> None:
        """
        Run C{job} (L{RunningJobs.run}), taking it out of those this runner
        queued.
        """
        self._queued.pop(job.id, None)
        self._jobs.run(job, soon)

    def _ended(self, job: Job) -> None:
        self._ends.finished(job)
        self._claims.soon()

    def _cancel_requested(self, job_id: str) -> None:
        process = self._running.get(job_id)
        if process is not None:
            process.terminate("stopped")
