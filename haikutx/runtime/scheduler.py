# -*- test-case-name: haikutx.test.test_scheduler -*-
"""
A fair share of the worker pool for every handler.

The scheduler sits between the runtime's resource and the L{WorkerPool}:
it hands out at most one I{turn} per worker, and a request asks the pool
for a worker only once it has a turn.  A free turn goes to the waiting
handler with the fewest requests running (the longest-waiting first among
equals); no handler holds more than C{max_concurrency} turns; a handler
with C{max_queue} requests already waiting is refused at once
(L{Overloaded}, answered 429) instead of queueing; a request that waits
longer than its timeout fails with L{PoolBusy} (answered 503).

Handlers are L{haikutx.runtime.tenants.Tenant}s from a bounded
L{Tenants} table: the handlers that the table cannot name share the
C{other} bucket, which is one handler here.
"""

from __future__ import annotations

from itertools import count
from typing import Any

from attrs import define
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from haikutx.runtime.pool import PoolBusy
from haikutx.runtime.tenants import Tenant, Tenants


class Overloaded(Exception):
    """
    The handler already has as many requests running and waiting as it
    may: the request is refused at once.

    @ivar tenant: the handler's L{Tenant}.
    """

    def __init__(self, tenant: Tenant) -> None:
        super().__init__(tenant.name)
        self.tenant = tenant


def default_max_concurrency(workers: int) -> int:
    """
    Requests of one handler running at once, by default: all workers but
    one, at least one.
    """
    return max(1, workers - 1)


def default_max_queue(workers: int) -> int:
    """
    Requests of one handler waiting for a turn, by default.
    """
    return 2 * workers


@define(eq=False)
class Turn:
    """
    One request's share of the pool, from the moment it is granted until
    L{Scheduler.release}.

    @ivar tenant: the handler it was granted to.
    @ivar worker: the worker the pool gave it, once it did.
    """

    tenant: Tenant
    worker: Any = None
    released: bool = False


@define(eq=False)
class _Waiter:
    tenant: Tenant
    #: the order of arrival
    since: int
    #: when the request fails with PoolBusy, turn or not
    deadline: float
    kind: str | None
    result: Deferred[Turn]
    timer: IDelayedCall | None = None
    turn: Turn | None = None
    #: the pool's acquire, once granted and until it fires.
    acquiring: Deferred[Any] | None = None
    cancelled: bool = False


class Scheduler:
    """
    Fair turns at the workers of one pool.

    @param clock: the reactor, for time.
    @param pool: the L{WorkerPool} (its C{size} and C{acquire}).
    @param max_concurrency: turns one handler holds at most (default
        L{default_max_concurrency}).
    @param max_queue: requests of one handler waiting at most (default
        L{default_max_queue}).
    @param tenants: the handlers' table (default: a new L{Tenants}).
    """

    def __init__(
        self,
        clock: IReactorTime,
        pool: Any,
        max_concurrency: int | None = None,
        max_queue: int | None = None,
        tenants: Tenants | None = None,
    ) -> None:
        self._clock = clock
        self._pool = pool
        self._max_concurrency = max_concurrency
        self._max_queue = max_queue
        self.tenants = tenants if tenants is not None else Tenants()
        self.granted = 0
        #: Tenants with requests waiting, in no particular order.
        self._queued: dict[Tenant, None] = {}
        self._arrivals = count()

    @property
    def max_concurrency(self) -> int:
        """
        Turns one handler holds at most.
        """
        if self._max_concurrency is not None:
            return self._max_concurrency
        return default_max_concurrency(self._pool.size)

    @property
    def max_queue(self) -> int:
        """
        Requests of one handler waiting at most.
        """
        if self._max_queue is not None:
            return self._max_queue
        return default_max_queue(self._pool.size)

    @property
    def waiting(self) -> int:
        """
        Requests waiting for a turn, all handlers together.
        """
        return sum(len(tenant.waiting) for tenant in self._queued)

    def acquire(self, tenant: Tenant, timeout: float, kind: str | None = None) -> Deferred[Turn]:
        """
        A turn for a request of C{tenant}, with a worker from the pool.

        @param tenant: the request's handler (from L{Tenants.lookup}).
        @param timeout: seconds to wait for a turn and a worker together.
        @param kind: the kind of handler (passed to the pool's C{acquire}).
        @return: a L{Deferred} firing with a L{Turn} whose C{worker} is set,
            to be given back with L{release}; failing with L{Overloaded} at
            once when the handler's queue is full, or with L{PoolBusy}
            after C{timeout}.  Cancelling it (the client left) gives up the
            request's place, or its turn, at once.
        """
        waiter = _Waiter(
            tenant,
            next(self._arrivals),
            self._clock.seconds() + timeout,
            kind,
            Deferred(lambda _: self._cancel(waiter)),
        )
        if self._may_start(tenant):
            # Whoever waits while turns are free is at its cap.
            self._grant(waiter)
        elif len(tenant.waiting) >= self.max_queue:
            waiter.result.errback(Overloaded(tenant))
        else:
            tenant.waiting.append(waiter)
            self._queued[tenant] = None
            waiter.timer = self._clock.callLater(timeout, self._give_up, waiter)
        return waiter.result

    def status(self) -> dict[str, int]:
        """
        The scheduler's state for C{/_haiku/status}.
        """
        return {
            "max_concurrency": self.max_concurrency,
            "max_queue": self.max_queue,
            "granted": self.granted,
            "waiting": self.waiting,
        }

    def stop(self) -> None:
        """
        Fail every waiting request with L{PoolBusy} (the runtime stops).
        """
        for tenant in list(self._queued):
            while tenant.waiting:
                waiter = tenant.waiting[0]
                if waiter.timer is not None and waiter.timer.active():
                    waiter.timer.cancel()
                waiter.timer = None
                self._dequeue(tenant)
                waiter.result.errback(PoolBusy("the runtime is stopping"))

    def release(self, turn: Turn) -> None:
        """
        Give back C{turn} (its request is answered, or failed); the turn
        goes to the next waiting handler.  Releasing a turn twice does
        nothing.
        """
        if turn.released:
            return
        turn.released = True
        turn.tenant.running -= 1
        self.granted -= 1
        self._dispatch()

    # Internals

    def _may_start(self, tenant: Tenant) -> bool:
        return tenant.running < self.max_concurrency and self.granted < self._pool.size

    def _grant(self, waiter: _Waiter) -> None:
        """
        Give C{waiter} a turn and ask the pool for a worker.
        """
        tenant = waiter.tenant
        tenant.running += 1
        self.granted += 1
        waiter.turn = Turn(tenant)
        remaining = max(waiter.deadline - self._clock.seconds(), 0.001)
        acquiring = waiter.acquiring = self._pool.acquire(remaining, waiter.kind)
        acquiring.addBoth(self._acquired, waiter)

    def _acquired(self, result: Any, waiter: _Waiter) -> None:
        """
        The pool answered a granted waiter: with a worker, or failing (no
        worker in time, or cancelled because the client left).
        """
        waiter.acquiring = None
        turn = waiter.turn
        assert turn is not None
        if waiter.cancelled:
            # The pool's acquire was cancelled with the request.
            self.release(turn)
            return
        if isinstance(result, Failure):
            self.release(turn)
            waiter.result.errback(result)
            return
        turn.worker = result
        waiter.result.callback(turn)

    def _dispatch(self) -> None:
        """
        Grant free turns to waiting handlers, fewest running first, the
        longest-waiting first among equals.
        """
        while self._queued and self.granted < self._pool.size:
            best: Tenant | None = None
            for tenant in self._queued:
                if tenant.running >= self.max_concurrency:
                    continue
                if best is None or (tenant.running, tenant.waiting[0].since) < (
                    best.running,
                    best.waiting[0].since,
                ):
                    best = tenant
            if best is None:
                return
            waiter = self._dequeue(best)
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.timer = None
            self._grant(waiter)

    def _dequeue(self, tenant: Tenant, waiter: _Waiter | None = None) -> _Waiter:
        if waiter is None:
            waiter = tenant.waiting.popleft()
        else:
            tenant.waiting.remove(waiter)
        if not tenant.waiting:
            del self._queued[tenant]
        return waiter

    def _give_up(self, waiter: _Waiter) -> None:
        waiter.timer = None
        self._dequeue(waiter.tenant, waiter)
        waiter.result.errback(PoolBusy("all workers are busy"))

    def _cancel(self, waiter: _Waiter) -> None:
        """
        The request's client left: give up its place, or its turn.
        """
        waiter.cancelled = True
        if waiter.timer is not None:
            if waiter.timer.active():
                waiter.timer.cancel()
            waiter.timer = None
            self._dequeue(waiter.tenant, waiter)
        elif waiter.acquiring is not None:
            waiter.acquiring.cancel()
        # The result fails with CancelledError (Deferred.cancel does it).


