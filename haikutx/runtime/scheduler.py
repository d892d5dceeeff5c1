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

from collections.abc import Callable
from functools import partial
from itertools import count
from typing import Any

from attrs import define
from twisted.internet.defer import CancelledError, Deferred
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
    One request's share of the pool: it waits for it, is granted it, holds
    it with a worker, and gives it back with L{Scheduler.release}.

    @ivar tenant: the request's handler.
    @ivar worker: the worker the pool gave it, once it did.
    """

    tenant: Tenant
    kind: str | None
    #: called with the turn, or a L{Failure}, when the wait ends (none
    #: for a turn taken at once, and once called)
    then: Callable[[Any], None] | None
    worker: Any = None
    #: the order of arrival, for a request that waits
    since: int = 0
    #: when a request that waits fails with PoolBusy, granted or not
    deadline: float = 0.0
    #: whether it waits in its handler's queue
    queued: bool = False
    #: the pool's acquire, once granted and until it fires
    acquiring: Deferred[Any] | None = None
    cancelled: bool = False
    released: bool = False


class Scheduler:
    """
    Fair turns at the workers of one pool.

    @param clock: the reactor, for time.
    @param pool: the L{WorkerPool} (its C{size}, fixed, and C{acquire}).
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
        size = pool.size if pool is not None else 1
        #: Turns one handler holds at most.
        self.max_concurrency = (
            max_concurrency if max_concurrency is not None else default_max_concurrency(size)
        )
        #: Requests of one handler waiting at most.
        self.max_queue = max_queue if max_queue is not None else default_max_queue(size)
        self.tenants = tenants if tenants is not None else Tenants()
        self.granted = 0
        #: Tenants with requests waiting, in no particular order.
        self._queued: dict[Tenant, None] = {}
        self._arrivals = count()
        #: The queue's one timer, while requests wait: it fires by the
        #: soonest deadline of a waiting request (sooner, when that request
        #: has left the queue: then it is set again), not a timer each.
        self._expiry: IDelayedCall | None = None

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
        result: Deferred[Turn] = Deferred(lambda _: self._cancel(turn))
        turn = self.wait(tenant, timeout, kind, partial(_fire, result))
        return result

    def wait(
        self, tenant: Tenant, timeout: float, kind: str | None, then: Callable[[Any], None]
    ) -> Turn:
        """
        Wait for a turn as L{acquire} does, without a L{Deferred}: C{then} is
        called once, with the L{Turn} (its C{worker} set) or with the
        L{Failure} C{acquire}'s result would fail with (at once when the
        turn or the refusal is at hand, before this returns).

        @return: the turn waited for, to give up with L{cancel} (its client
            left) while C{then} has not been called.
        """
        turn = Turn(tenant, kind, then)
        if tenant.running < self.max_concurrency and self.granted < self._pool.size:
            # Whoever waits while turns are free is at its cap.
            self._grant(turn, timeout)
        elif len(tenant.waiting) >= self.max_queue:
            self._answer(turn, Failure(Overloaded(tenant)))
        else:
            turn.since = next(self._arrivals)
            deadline = turn.deadline = self._clock.seconds() + timeout
            turn.queued = True
            tenant.waiting.append(turn)
            self._queued[tenant] = None
            expiry = self._expiry
            if expiry is None:
                self._expiry = self._clock.callLater(timeout, self._expire)
            elif expiry.getTime() > deadline:
                expiry.reset(timeout)
        return turn

    def waiting_for(self, turn: Turn) -> bool:
        """
        Whether C{turn} (from L{wait}) is still waited for: its C{then} not
        called yet.
        """
        return turn.then is not None

    def cancel(self, turn: Turn) -> None:
        """
        Give up the wait for C{turn} (from L{wait}), as cancelling
        L{acquire}'s result does: its place, or its turn, is given up, and
        its C{then} called with a L{CancelledError}; nothing, once C{then}
        was called.
        """
        then = turn.then
        if then is None:
            return
        self._cancel(turn)
        turn.then = None
        then(Failure(CancelledError()))

    def take(self, tenant: Tenant, kind: str | None = None) -> Turn | None:
        """
        A turn for a request of C{tenant} at once, with an idle worker, when
        one is free to it now, as L{acquire} would grant it (the handler
        below its cap, a turn free, a worker idle), without a L{Deferred};
        else C{None}, and nothing changed: then ask L{acquire}.

        @return: a L{Turn} whose C{worker} is set, to be given back with
            L{release}; or C{None}.
        """
        if tenant.running >= self.max_concurrency or self.granted >= self._pool.size:
            return None
        take = getattr(self._pool, "take", None)
        worker = take(kind) if take is not None else None
        if worker is None:
            return None
        tenant.running += 1
        self.granted += 1
        return Turn(tenant, kind, None, worker)

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
                turn = self._dequeue(tenant)
                self._answer(turn, Failure(PoolBusy("the runtime is stopping")))

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

    def _grant(self, turn: Turn, timeout: float) -> None:
        """
        Grant C{turn} and ask the pool for a worker within C{timeout}
        seconds.
        """
        turn.tenant.running += 1
        self.granted += 1
        take = getattr(self._pool, "take", None)
        worker = take(turn.kind) if take is not None else None
        if worker is not None:
            # An idle worker at once, without a Deferred.
            turn.worker = worker
            self._answer(turn, turn)
            return
        acquiring = self._pool.acquire(timeout, turn.kind)
        if acquiring.called and not isinstance(acquiring.result, Failure):
            # An idle worker at once, the common case: no callbacks needed.
            turn.worker = acquiring.result
            self._answer(turn, turn)
            return
        turn.acquiring = acquiring
        acquiring.addBoth(self._acquired, turn)

    def _acquired(self, result: Any, turn: Turn) -> None:
        """
        The pool answered a granted turn: with a worker, or failing (no
        worker in time, or cancelled because the client left).
        """
        turn.acquiring = None
        if turn.cancelled:
            # The pool's acquire was cancelled with the request.
            self.release(turn)
            return
        if isinstance(result, Failure):
            self.release(turn)
            self._answer(turn, result)
            return
        turn.worker = result
        self._answer(turn, turn)

    def _answer(self, turn: Turn, result: Turn | Failure) -> None:
        """
        End the wait for C{turn}: call its C{then} with C{result}, once.
        """
        then = turn.then
        if then is not None:
            turn.then = None
            then(result)

    def _dispatch(self) -> None:
        """
        Grant free turns to waiting handlers, fewest running first, the
        longest-waiting first among equals.
        """
        queued = self._queued
        cap = self.max_concurrency
        while queued and self.granted < self._pool.size:
            best: Tenant | None = None
            if len(queued) == 1:
                # One handler waits: the common case, made quick.
                best = next(iter(queued))
                if best.running >= cap:
                    return
            for tenant in queued if best is None else ():
                if tenant.running >= cap:
                    continue
                if best is None or (tenant.running, tenant.waiting[0].since) < (
                    best.running,
                    best.waiting[0].since,
                ):
                    best = tenant
            if best is None:
                return
            turn = self._dequeue(best)
            self._grant(turn, max(turn.deadline - self._clock.seconds(), 0.001))

    def _dequeue(self, tenant: Tenant, turn: Turn | None = None) -> Turn:
        if turn is None:
            turn = tenant.waiting.popleft()
        else:
            tenant.waiting.remove(turn)
        turn.queued = False
        if not tenant.waiting:
            del self._queued[tenant]
            if not self._queued and self._expiry is not None:
                # No one waits: no timer.
                self._expiry.cancel()
                self._expiry = None
        return turn

    def _expire(self) -> None:
        """
        The queue's timer: fail the requests that waited until their
        deadline with L{PoolBusy}, and set it again for the soonest of the
        others.
        """
        self._expiry = None
        now = self._clock.seconds()
        for tenant in list(self._queued):
            for turn in [turn for turn in tenant.waiting if turn.deadline <= now]:
                if turn.queued:
                    self._dequeue(tenant, turn)
                    self._answer(turn, Failure(PoolBusy("all workers are busy")))
        deadlines = [turn.deadline for tenant in self._queued for turn in tenant.waiting]
        if deadlines:
            soonest = min(deadlines)
            expiry = self._expiry
            if expiry is None:
                self._expiry = self._clock.callLater(soonest - now, self._expire)
            elif expiry.getTime() > soonest:
                expiry.reset(soonest - now)

    def _cancel(self, turn: Turn) -> None:
        """
        The request's client left: give up its place, or its turn.
        """
        turn.cancelled = True
        turn.then = None
        if turn.queued:
            self._dequeue(turn.tenant, turn)
        elif turn.acquiring is not None:
            turn.acquiring.cancel()
        # acquire's result fails with CancelledError (Deferred.cancel does
        # it); a wait's then is called by cancel.




def _fire(result: Deferred[Turn], outcome: Turn | Failure) -> None:
    """
    Fire L{Scheduler.acquire}'s C{result} with a wait's C{outcome}.
    """
    if isinstance(outcome, Failure):
        result.errback(outcome)
    else:
        result.callback(outcome)
