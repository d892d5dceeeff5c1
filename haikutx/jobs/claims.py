# -*- test-case-name: haikutx.test.test_jobs -*-
"""
The claiming of queued jobs for a runner's free running slots: one claim
loop at a time (L{Claims.soon} while one runs asks it to look once more),
each claim taking at most as many jobs as there are free slots
(C{SELECT … FOR UPDATE SKIP LOCKED} on PostgreSQL: every job is claimed
by one runner exactly).

With a store of its own the runner knows when nothing can be queued (every
job it queued has been claimed), and then makes no claim at all: this is
asked at the end of every job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from haikutx.interfaces import IJobStore
from haikutx.jobs.job import QUEUED, Job


class Claims:
    """
    Claim queued jobs and have them run.

    @param clock: the clock (C{seconds()}).
    @param store: the job store.
    @param owner: the runner's name in the store.
    @param free: how many running slots are free now.
    @param run: runs a claimed job.
    @param queued: the jobs this runner queued and has not claimed (a store
        of its own), from which claimed ones are taken out.
    @param log: the runner's logger.

    @ivar maybe_queued: whether a queued job may be waiting (then a new job
        is queued too, behind it, rather than run at once).
    """

    def __init__(
        self,
        clock: Any,
        store: IJobStore,
        owner: str,
        free: Callable[[], int],
        run: Callable[[Job], None],
        queued: dict[str, Job],
        log: Any,
    ) -> None:
        self._clock = clock
        self._store = store
        self._owner = owner
        self._free = free
        self._run = run
        self._queued = queued
        self.log = log
        self.maybe_queued = True
        self._generation = 0
        self._claiming: Deferred[None] | None = None
        self._again = False
        self._started = False
        self._stopping = False

    def start(self) -> None:
        """
        Claim from now on (the runner has recovered the store's jobs).
        """
        self._started = True

    def queued(self) -> None:
        """
        A job was queued, by this runner or (a shared store) another.
        """
        self.maybe_queued = True
        self._generation += 1

    def soon(self) -> None:
        """
        Claim what the free slots can take: now, or once more after the
        claim under way.
        """
        if not self._started or self._stopping:
            return
        if not self.maybe_queued and not self._store.shared:
            # Nothing queued (a store of its own): no claim to make, and no
            # coroutine for it.
            return
        if self._claiming is not None:
            self._again = True
            return
        self._claiming = Deferred.fromCoroutine(self._claim())

        def done(result: Any) -> None:
            self._claiming = None
            if isinstance(result, Failure) and not self._stopping:
                self.log.failure("job runner: claiming jobs failed", result)

        self._claiming.addBoth(done)

    async def stop(self) -> None:
        """
        Claim no more; wait for the claim under way (what it claims goes
        back to the queue, for the next runner).
        """
        self._stopping = True
        if self._claiming is not None:
            await self._claiming

    async def _claim(self) -> None:
        while not self._stopping:
            self._again = False
            free = self._free()
            if free <= 0:
                return
            if not self.maybe_queued and not self._store.shared:
                # A store of its own, and every job this runner queued has
                # been claimed: nothing to look for.
                return
            generation = self._generation
            jobs = await self._store.claim(self._owner, free, self._clock.seconds())
            if len(jobs) < free and generation == self._generation:
                self.maybe_queued = False
            for job in jobs:
                self._queued.pop(job.id, None)
                if self._stopping:
                    # Not started: back in the queue for the next runner.
                    await self._store.save(
                        evolve(job, state=QUEUED, owner=None, started=None), self._owner
                    )
                else:
                    self._run(job)
            if len(jobs) < free and not self._again:
                return
