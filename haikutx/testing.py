# -*- test-case-name: haikutx.test.test_jobstore -*-
"""
In-memory doubles of haikutx's seams, for tests of haikutx and of code
built on it. Each one passes the same conformance tests as the real part.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from haikutx.interfaces import IJobStore
from haikutx.jobstore import Job


@implementer(IJobStore)
class MemoryJobStore:
    """
    An L{IJobStore} in a dict: every method answers at once.

    @ivar jobs: the stored jobs by id, in insertion order.
    @ivar closed: whether L{close} was called.
    """

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.closed = False

    def open(self) -> Deferred[None]:
        self.closed = False
        return succeed(None)

    def load(self) -> Deferred[list[Job]]:
        return succeed(sorted(self.jobs.values(), key=lambda job: job.seq))

    def save(self, job: Job) -> Deferred[None]:
        self.jobs[job.id] = job
        return succeed(None)

    def remove(self, job_ids: Iterable[str]) -> Deferred[None]:
        for job_id in job_ids:
            self.jobs.pop(job_id, None)
        return succeed(None)

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)
