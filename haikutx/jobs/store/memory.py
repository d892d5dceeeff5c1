# -*- test-case-name: haikutx.test.test_jobstore -*-
"""
An L{IJobStore} in memory, for tests and for code built on haikutx: every
method answers at once, nothing survives the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from haikutx.interfaces import IJobStore
from haikutx.jobs.job import FINISHED, PENDING, QUEUED, RUNNING, CallbackOutcome, Job, interrupted


@implementer(IJobStore)
class MemoryJobStore:
    """
    An L{IJobStore} in a dict, for one runner.

    @ivar jobs: the stored jobs by id, in insertion order.
    @ivar closed: whether L{close} was called.
    """

    shared = False

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.closed = False
        self._seq = 0

    def open(self) -> Deferred[None]:
        self.closed = False
        self._seq = max((job.seq for job in self.jobs.values()), default=0)
        return succeed(None)

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)

    def add(self, job: Job) -> Deferred[Job]:
        self._seq += 1
        stored = evolve(job, seq=self._seq)
        self.jobs[job.id] = stored
        return succeed(stored)

    def get(self, job_id: str) -> Deferred[Job | None]:
        return succeed(self.jobs.get(job_id))

    def save(self, job: Job, expected_owner: str | None = None) -> Deferred[bool]:
        stored = self.jobs.get(job.id)
        if stored is None or (expected_owner is not None and stored.owner != expected_owner):
            return succeed(False)
        self.jobs[job.id] = evolve(job, seq=stored.seq)
        return succeed(True)

    def claim(self, owner: str, limit: int, now: float) -> Deferred[list[Job]]:
        queued = sorted(
            (job for job in self.jobs.values() if job.state == QUEUED), key=lambda j: j.seq
        )
        claimed = []
        for job in queued[:limit]:
            job = evolve(job, state=RUNNING, owner=owner, started=now)
            self.jobs[job.id] = job
            claimed.append(job)
        return succeed(claimed)

    def cancel_queued(self, job_id: str, owner: str, now: float) -> Deferred[Job | None]:
        job = self.jobs.get(job_id)
        if job is None or job.state != QUEUED:
            return succeed(None)
        job = evolve(
            job,
            state=FINISHED,
            error="stopped",
            finished=now,
            owner=owner,
            callback_outcome=None if job.callback is None else CallbackOutcome(PENDING),
        )
        self.jobs[job_id] = job
        return succeed(job)

    def recover(self, owner: str, lease: float, now: float) -> Deferred[list[Job]]:
        taken = []
        for job in sorted(self.jobs.values(), key=lambda j: j.seq):
            pending = job.callback_outcome is not None and job.callback_outcome.status == PENDING
            if job.owner not in (None, owner) and (job.state == RUNNING or pending):
                job = interrupted(job, owner, now)
                self.jobs[job.id] = job
                taken.append(job)
        return succeed(taken)

    def heartbeat(self, owner: str) -> Deferred[None]:
        return succeed(None)

    def retire(self, owner: str) -> Deferred[None]:
        return succeed(None)

    def evict(self, keep: int) -> Deferred[list[str]]:
        finished = sorted(
            (job for job in self.jobs.values() if job.state == FINISHED),
            key=lambda j: (j.finished or 0.0, j.seq),
            reverse=True,
        )
        removed = [job.id for job in finished[keep:]]
        for job_id in removed:
            del self.jobs[job_id]
        return succeed(removed)

    def listen(self, on_queued: Callable[[], Any], on_cancel: Callable[[str], Any]) -> None:
        pass

    def request_cancel(self, job_id: str) -> Deferred[None]:
        return succeed(None)
