# -*- test-case-name: haikutx.test.test_jobs -*-
"""
A job's end, on the runner that ran it (or stopped it before it started):
counted in C{haiku_jobs_total}, logged, told to those waiting for it, saved
with its callback pending, then its callback sent and the finished jobs
beyond the bound evicted; unless another runner took the job over
meanwhile (a shared store, this runner's lease run out), whose outcome it
is then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel

from haikutx.events import EventEmitter
from haikutx.jobs.callbacks import CallbackSender
from haikutx.jobs.eviction import Eviction
from haikutx.jobs.job import PENDING, CallbackOutcome, Job
from haikutx.jobs.known import KnownJobs
from haikutx.metrics import JOBS


def counted(state: str) -> None:
    """
    Count a job in C{haiku_jobs_total{state}} (the labelled child looked up
    once per state, not per job).
    """
    child = _COUNTERS.get(state)
    if child is None:
        child = _COUNTERS[state] = JOBS.labels(state=state)
    child.inc()


_COUNTERS: dict[str, Any] = {}


def final_state(job: Job) -> str:
    """
    The C{haiku_jobs_total} state of a finished job: C{finished} (exit code
    0), C{failed}, C{interrupted} or C{deleted} (stopped by a DELETE).
    """
    if job.error == "interrupted":
        return "interrupted"
    if job.error == "stopped":
        return "deleted"
    if job.error is None and job.signal is None and job.code == 0:
        return "finished"
    return "failed"


class JobEnds:
    """
    Finish jobs, and let callers wait for a job's end.

    @param known: the runner's jobs known without the store, and its saves.
    @param callbacks: sends completion callbacks.
    @param eviction: evicts finished jobs beyond the bound.
    @param stopping: whether the runner is stopping (no callback is sent
        then: it stays pending for the runner that starts next).
    @param ready: whether the runner has recovered the store's jobs.
    @param log: the runner's logger.
    """

    def __init__(
        self,
        known: KnownJobs,
        callbacks: CallbackSender,
        eviction: Eviction,
        stopping: Callable[[], bool],
        ready: Callable[[], bool],
        log: Any,
    ) -> None:
        self._known = known
        self._callbacks = callbacks
        self._eviction = eviction
        self._stopping = stopping
        self._ready = ready
        self.log = log
        self._emit = EventEmitter(log, LogLevel.info)
        self._waiters: dict[str, list[Deferred[Job]]] = {}

    def wait(self, job_id: str) -> Deferred[Job]:
        """
        @return: a L{Deferred} firing with the job once it has finished here.
        """
        waiter: Deferred[Job] = Deferred()
        self._waiters.setdefault(job_id, []).append(waiter)
        return waiter

    def finished(self, job: Job, saved: bool = False) -> None:
        """
        A job has finished: save it (its callback pending), tell those
        waiting for it, then send its callback.
        """
        if job.callback is not None and not saved:
            job = evolve(job, callback_outcome=CallbackOutcome(PENDING))
        state = final_state(job)
        counted(state)
        duration = (job.finished or 0.0) - (job.started or job.created)
        self._emit(
            f"job {job.id} {state}: code {job.code} signal {job.signal} error {job.error} "
            f"in {duration:.3f}s",
            {
                "job_id": job.id,
                "state": state,
                "code": job.code,
                "signal": job.signal,
                "error": job.error,
                "duration": duration,
            },
        )
        for waiter in self._waiters.pop(job.id, []):
            waiter.callback(job)
        if saved:
            written: Deferred[bool] = Deferred()
            written.callback(True)
        else:
            written = self._known.save(job)

        def then(replaced: bool) -> None:
            if not replaced:
                # Another runner took the job over (this one's lease ran
                # out): its outcome and callback are that runner's now.
                self._known.forget([job.id])
                self.log.warn(
                    "job {job_id} was taken over by another runner: "
                    "its result here is dropped, no callback from this runner",
                    job_id=job.id,
                )
                return
            if job.callback is not None and not self._stopping():
                self._callbacks.send(job)
            self._eviction.soon(at_once=not self._ready())

        written.addCallback(then)
        self._known.written(written)
