# -*- test-case-name: haikutx.test.test_pool -*-
"""
The pool of worker slots: it keeps C{size} slots (a zygote each, with one
child at a time) started ahead of demand, hands an idle one to each
request, retires a child that reached its request quota (its zygote forks
the next), replaces a slot whose zygote died, and stops them all with the
service.  How each slot's zygote is started is
L{haikutx.runtime.spawner}'s (L{PythonWorkerSpawner}, named here too).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger, LogLevel

from haikutx.events import EventEmitter
from haikutx.interfaces import IWorkerSpawner
from haikutx.runtime.spawner import (
    EGRESS_FD,
    EGRESS_PORT,
    MAX_HANDLER_THREADS,
    SLOT_BASE_UID,
    PythonWorkerSpawner,
    default_options,
)
from haikutx.runtime.timers import Deadline
from haikutx.runtime.worker import (
    ChildProtocol,
    WorkerProtocol,
)

__all__ = [
    "EGRESS_FD",
    "EGRESS_PORT",
    "MAX_HANDLER_THREADS",
    "SLOT_BASE_UID",
    "PoolBusy",
    "PythonWorkerSpawner",
    "WorkerPool",
    "default_options",
]

#: A request waiting for a worker, the handler kind it will run, and when
#: it gives up.
_Waiter = tuple[Deferred[WorkerProtocol], str | None, float]


class PoolBusy(Exception):
    """
    No worker became free in time.
    """


class WorkerPool(Service):
    """
    A fixed number of worker processes.

    @ivar size: workers kept running.
    @ivar max_requests: requests a worker serves before it is replaced;
        0 means never.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        size: int,
        max_requests: int,
        spawner: IWorkerSpawner | None = None,
        keepalive_interval: float = 5.0,
        keepalive_timeout: float = 5.0,
        kill_time: float = 5.0,
    ) -> None:
        self._reactor = reactor
        self.size = size
        self.max_requests = max_requests
        self._spawner = spawner if spawner is not None else PythonWorkerSpawner(reactor)
        self._keepalive = (keepalive_interval, keepalive_timeout)
        self._kill_time = kill_time
        self.workers: set[WorkerProtocol] = set()
        self._idle: deque[WorkerProtocol] = deque()
        self._waiters: deque[_Waiter] = deque()
        #: The time limit of the first waiter to give up (one timer for all
        #: of them, kept while requests come and go).
        self._wait_limit = Deadline(reactor, self._give_up)
        self._failures = 0
        self._respawn: IDelayedCall | None = None
        self.counters = {"started": 0, "recycled": 0, "died": 0, "killed": 0}
        self.sandbox: dict[str, Any] | None = None
        # The class's logger bound to this pool once, not at each event.
        self.log = self.log
        self._emit_routine = EventEmitter(self.log, LogLevel.debug)
        self._emit_recycle = EventEmitter(self.log, LogLevel.info)
        #: The routine recycle's reason, made once (L{_quota_reason}).
        self._quota = (max_requests, f"served its quota of {max_requests} requests")

    # Service

    def startService(self) -> None:
        super().startService()
        for _ in range(self.size):
            self._spawn()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._respawn is not None and self._respawn.active():
            self._respawn.cancel()
        self._wait_limit.stop()
        while self._waiters:
            self._waiters.popleft()[0].errback(PoolBusy("the runtime is stopping"))
        ended = []
        for worker in list(self.workers):
            ended.append(worker.ended)
            worker.terminate()
            timer = self._reactor.callLater(
                self._kill_time, worker.kill_zygote, "did not stop in time"
            )
            worker.ended.addBoth(_cancel_timer, timer)
        stopped = DeferredList(ended, consumeErrors=True)
        close = getattr(self._spawner, "close", None)
        if close is not None:
            stopped.addCallback(lambda result: (close(), result)[1])
        return stopped

    # Workers

    def _free_slot(self) -> int:
        taken = {worker.slot for worker in self.workers}
        return next(slot for slot in range(len(taken) + 1) if slot not in taken)

    def _spawn(self) -> None:
        slot = self._free_slot()
        worker = WorkerProtocol(
            self._reactor,
            self._ready,
            self._ended,
            keepalive_interval=self._keepalive[0],
            keepalive_timeout=self._keepalive[1],
            on_child_ended=self._child_ended,
            fresh_timeout=self._kill_time,
        )
        worker.slot = slot
        self.workers.add(worker)
        self.counters["started"] += 1
        self._spawner.spawn(worker, self.max_requests)

    def _ready(self, worker: WorkerProtocol) -> None:
        if worker.sandbox is not None and self.sandbox is None:
            self.sandbox = worker.sandbox
            self.log.info(
                "handler sandbox layers: {layers}", layers=worker.sandbox.get("layers")
            )
        self._hand_out(worker)

    def _hand_out(self, worker: WorkerProtocol) -> None:
        """
        Give C{worker} to the longest-waiting request whose handler it can
        run, or keep it idle.  When requests wait but none can run on it
        (its process is confined for the other kind of handler), its
        process is replaced by a fresh one, which suits any of them.
        """
        waiting = False
        for entry in list(self._waiters):
            waiter, kind, _ = entry
            if waiter.called:
                self._waiters.remove(entry)
                continue
            if _suits(worker, kind):
                self._waiters.remove(entry)
                worker.state = "idle"
                waiter.callback(worker)
                return
            waiting = True
        if waiting:
            self._recycle(worker, "a waiting request needs a fresh process", retire=True)
            return
        worker.state = "idle"
        self._idle.append(worker)

    def _recycle(self, worker: WorkerProtocol, reason: str, retire: bool = True) -> None:
        """
        Retire C{worker}'s current child (its channel is closed and its
        zygote kills it) and wait for the zygote's next one; kill the
        zygote if none comes in time.

        @param reason: why, for the log (at debug level for the routine
            quota recycle of C{--maxrequests 1}, which happens after every
            request).
        @param retire: kept for callers of the earlier interface; the child
            is always retired by the server, never trusted to leave.
        """
        routine = self.max_requests == 1 and reason == self._quota_reason()
        # At debug level for the routine recycle, which follows every
        # request of --maxrequests 1: its text made here, once, and every
        # field in the event (EventEmitter).
        (self._emit_routine if routine else self._emit_recycle)(
            f"worker {worker.pid} recycling its process {worker.child_pid}: {reason}",
            {"worker_pid": worker.pid, "child_pid": worker.child_pid, "reason": reason},
        )
        worker.state = "recycling"
        self.counters["recycled"] += 1
        worker.retire()
        worker.expect_child()

    def _quota_reason(self) -> str:
        quota = self._quota
        if quota[0] != self.max_requests:
            quota = self._quota = (
                self.max_requests, f"served its quota of {self.max_requests} requests"
            )
        return quota[1]

    def _child_ended(self, worker: WorkerProtocol, child: ChildProtocol, cause: str) -> None:
        """
        A child of C{worker} has ended: count it; a child that died before
        it was sent any request (so ran no handler code) is a failure of
        the slot, and the slot is restarted with back-off if they repeat.
        """
        if child.kill_reason is not None:
            self.counters["killed"] += 1
        if child.retired and child.kill_reason is None:
            return  # the routine end
        if child.kill_reason is None:
            self.counters["died"] += 1
            self.log.info(
                "worker {worker_pid} process {child_pid} ended: {reason}",
                worker_pid=worker.pid,
                child_pid=child.pid,
                reason=cause,
            )
        if not child.requested and child.kill_reason is None:
            self._failures += 1
            if self._failures > 2:
                worker.kill_zygote(f"its processes keep dying before serving ({cause})")

    def _ended(self, worker: WorkerProtocol, reason: str) -> None:
        self.workers.discard(worker)
        try:
            self._idle.remove(worker)
        except ValueError:
            pass
        if worker.kill_reason is not None:
            self.counters["killed"] += 1
        else:
            self.counters["died"] += 1
        if not self.running:
            return
        if worker.children_started == 0 and worker.kill_reason is None:
            self._failures += 1
        replacements = self.size - len(self.workers)
        if replacements <= 0:
            return
        if self._failures > 2:
            delay = min(2.0 ** (self._failures - 2), 60.0)
            self.log.warn(
                "workers keep dying before serving ({reason}); "
                "next start in {delay:.0f}s",
                reason=reason,
                delay=delay,
            )
            if self._respawn is None or not self._respawn.active():
                self._respawn = self._reactor.callLater(delay, self._refill)
            return
        for _ in range(replacements):
            self._spawn()

    def _refill(self) -> None:
        self._respawn = None
        for _ in range(self.size - len(self.workers)):
            self._spawn()

    # Requests

    def take(self, kind: str | None = None) -> WorkerProtocol | None:
        """
        An idle worker that can run handlers of C{kind}, taken at once, or
        C{None} (then L{acquire} waits for one): the common case, without
        a L{Deferred}.
        """
        for worker in self._idle:
            if worker.state == "idle" and _suits(worker, kind):
                self._idle.remove(worker)
                return worker
        return None

    def acquire(
        self, timeout: float, kind: str | None = None
    ) -> Deferred[WorkerProtocol]:
        """
        An idle worker, as soon as one is free.

        @param timeout: seconds to wait before failing with L{PoolBusy}.
        @param kind: the kind of handler it will run
            (L{haikutx.runtime.worker.handler_kind}): a worker whose process already
            ran the other kind is not handed out (its process is replaced by
            a fresh one instead); C{None} takes any worker.
        @return: a L{Deferred} firing with a worker in state C{idle}.
        """
        other = None
        for worker in list(self._idle):
            if worker.state != "idle":
                self._idle.remove(worker)
            elif _suits(worker, kind):
                self._idle.remove(worker)
                return _succeed(worker)
            elif other is None:
                other = worker
        waiter: Deferred[WorkerProtocol] = Deferred(self._forget)
        limit = self._wait_limit
        due = self._reactor.seconds() + timeout
        self._waiters.append((waiter, kind, due))
        if not limit.pending or due < limit.due:
            limit.set(timeout)
        if other is not None:
            self._idle.remove(other)
            self._recycle(
                other, f"a {kind} handler cannot run in a process that ran "
                f"{other.kind} handlers", retire=True,
            )
        return waiter

    def _forget(self, waiter: Deferred[WorkerProtocol]) -> bool:
        for entry in self._waiters:
            if entry[0] is waiter:
                self._waiters.remove(entry)
                return True
        return False

    def _give_up(self) -> None:
        """
        Fail with L{PoolBusy} every waiter whose time is up, and watch for
        the next one's.
        """
        now = self._reactor.seconds()
        expired = [entry for entry in self._waiters if entry[2] <= now]
        for entry in expired:
            self._waiters.remove(entry)
        if self._waiters:
            self._wait_limit.set(min(entry[2] for entry in self._waiters) - now)
        for entry in expired:
            entry[0].errback(PoolBusy("all workers are busy"))

    def release(self, worker: WorkerProtocol) -> None:
        """
        Take back a worker whose request has been answered.  When its
        process reached its quota, the process exits and the worker's
        zygote forks a fresh one at once; the worker is handed out again
        when that one is ready.
        """
        worker.served += 1
        self._failures = 0
        if worker.state != "busy":
            return
        if self.max_requests and worker.served >= self.max_requests:
            self._recycle(worker, self._quota_reason())
            return
        self._hand_out(worker)

    def status(self) -> dict[str, Any]:
        """
        The pool's state for C{/_haiku/status}.
        """
        states: dict[str, int] = {}
        for worker in self.workers:
            states[worker.state] = states.get(worker.state, 0) + 1
        return {
            "size": self.size,
            "max_requests": self.max_requests,
            "workers": states,
            "waiting": len(self._waiters),
            "sandbox": self.sandbox,
            **self.counters,
        }


def _suits(worker: WorkerProtocol, kind: str | None) -> bool:
    return kind is None or worker.kind is None or worker.kind == kind


def _succeed(worker: WorkerProtocol) -> Deferred[WorkerProtocol]:
    d: Deferred[WorkerProtocol] = Deferred()
    d.callback(worker)
    return d


def _cancel_timer(result: Any, timer: IDelayedCall) -> Any:
    if timer.active():
        timer.cancel()
    return result
