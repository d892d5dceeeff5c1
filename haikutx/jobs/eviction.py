# -*- test-case-name: haikutx.test.test_jobs -*-
"""
The eviction of finished jobs beyond the store's bound (C{--maxjobs}), once
for many: a moment after a job finishes, one eviction takes out every
finished job over the bound (and runs again at once if more finished
meanwhile).  One eviction for many jobs, and one log event for it: an
eviction, and its event, per job cost as much as the job's other work.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from haikutx.interfaces import IJobStore


class Eviction:
    """
    Evict the oldest finished jobs beyond C{max_jobs}, C{delay} seconds
    after L{soon} is first called (or at once when C{delay} is 0).

    @param reactor: the clock.
    @param store: the job store.
    @param max_jobs: finished jobs kept.
    @param delay: seconds from a finished job to the eviction.
    @param evicted: told the ids of the jobs each eviction took out.
    @param background: runs a coroutine, logging its failure.
    @param log: the runner's logger, for the event of each eviction.
    """

    def __init__(
        self,
        reactor: Any,
        store: IJobStore,
        max_jobs: int,
        delay: float,
        evicted: Callable[[list[str]], None],
        background: Callable[[Coroutine[Any, Any, None], str], None],
        log: Any,
    ) -> None:
        self._reactor = reactor
        self._store = store
        self._max_jobs = max_jobs
        self._delay = delay
        self._evicted = evicted
        self._background = background
        self.log = log
        self._call: Any = None
        self._running = False
        self._again = False
        self._stopped = False

    def soon(self, at_once: bool = False) -> None:
        """
        Have finished jobs beyond the bound evicted after the delay (one
        eviction for all the calls meanwhile), or now if C{at_once}.
        """
        if self._delay > 0 and not at_once:
            if self._call is None and not self._stopped:
                self._call = self._reactor.callLater(self._delay, self.now)
            return
        self.now()

    def now(self) -> None:
        """
        Evict now (or once more after the eviction under way).
        """
        self._call = None
        if self._running:
            self._again = True
            return
        self._running = True
        self._background(self._evict(), "eviction")

    def stop(self) -> None:
        """
        Evict no more (the runner stops).
        """
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    async def _evict(self) -> None:
        try:
            while True:
                self._again = False
                evicted = await self._store.evict(self._max_jobs)
                self._evicted(evicted)
                if evicted:
                    self.log.info(
                        "{count} finished jobs evicted: {job_ids}",
                        count=len(evicted),
                        job_ids=evicted,
                    )
                if not self._again or self._stopped:
                    return
        finally:
            self._running = False
