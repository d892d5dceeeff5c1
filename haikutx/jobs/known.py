# -*- test-case-name: haikutx.test.test_jobs -*-
"""
What a job runner knows of jobs without asking its store, and the saves
that keep it so: a job whose latest save is not committed yet is shown as
saved; with a store of its own (no other runner can change its jobs), the
jobs it queued and has not claimed yet, and those it finished lately, are
answered from memory.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.defer import Deferred

from haikutx.interfaces import IJobStore
from haikutx.jobs.job import FINISHED, Job

#: Finished jobs a runner with a store of its own keeps at hand for GET.
RECENT_JOBS = 1000


class KnownJobs:
    """
    The jobs a runner knows without its store, and its saves of them.

    @param store: the job store.
    @param owner: the runner's name in the store.
    @param log: the runner's logger (a failed write is logged there).

    @ivar queued: the jobs this runner queued and has not claimed yet, when
        no other runner can claim or change them (a store of its own).
    """

    def __init__(self, store: IJobStore, owner: str, log: Any) -> None:
        self._store = store
        self._owner = owner
        self.log = log
        #: Jobs whose latest save is not committed yet (what GET shows).
        self._saving: dict[str, Job] = {}
        #: Jobs this runner finished lately, when no other runner can
        #: change them (a store of its own).
        self._recent: OrderedDict[str, Job] = OrderedDict()
        self.queued: dict[str, Job] = {}

    @property
    def saving(self) -> bool:
        """
        Whether a save is under way.
        """
        return bool(self._saving)

    def get(self, job_id: str) -> Job | None:
        """
        The job as a save under way, as queued here, or as finished here
        lately; else C{None}.
        """
        saving = self._saving.get(job_id)
        if saving is not None:
            return saving
        queued = self.queued.get(job_id)
        if queued is not None:
            return queued
        return self._recent.get(job_id)

    def save(self, job: Job) -> Deferred[bool]:
        """
        Save C{job} in the store, shown as saved meanwhile.

        @return: the store's L{IJobStore.save} result: whether the job was
            still this runner's.
        """
        self._saving[job.id] = job
        if job.state == FINISHED and not self._store.shared:
            self._recent[job.id] = job
            self._recent.move_to_end(job.id)
            while len(self._recent) > RECENT_JOBS:
                self._recent.popitem(last=False)

        def saved(result: Any) -> Any:
            if self._saving.get(job.id) is job:
                del self._saving[job.id]
            return result

        return self._store.save(job, self._owner).addBoth(saved)

    def write(self, job: Job) -> None:
        """
        Save C{job}, its failure logged (nobody waits for it).
        """
        self.written(self.save(job))

    def written(self, saving: Deferred[Any]) -> None:
        """
        Log the failure of a save nobody waits for.
        """
        saving.addErrback(lambda f: self.log.failure("job store write failed", f))

    def forget(self, job_ids: list[str]) -> None:
        """
        Answer these finished jobs from the store again (evicted, or taken
        over by another runner).
        """
        for job_id in job_ids:
            self._recent.pop(job_id, None)
