# -*- test-case-name: haikutx.test.test_jobstore -*-
"""
Group commit: operations on one database connection, run in one thread,
as many per transaction as arrived while the previous transaction ran.

A POST answered 202 only after its job is committed would otherwise cost one
commit (one C{fsync}) per job; with a group commit, the jobs that arrive
while one commit is under way all share the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

#: One operation: called in the database thread with the connection.
Operation = Callable[[Any], Any]

#: Runs operations in one transaction and returns their results, or raises
#: (and rolls back) when one of them fails; the flag says whether the commit
#: must reach the disk before it returns (else it may follow with the next
#: durable commit).
Transact = Callable[[Sequence[Operation], bool], list[Any]]

#: Most operations in one transaction.
MAX_BATCH = 512


class GroupCommit:
    """
    Collects operations and runs them in batches, one transaction each, in
    a thread pool of one thread, in the order they were submitted: what is
    submitted in one turn of the reactor, or while the previous transaction
    runs, goes in one batch.

    When a batch fails, its operations are run again one per transaction, so
    that one bad operation fails alone.

    @ivar commits: the transactions run so far (batches and retries).
    """

    def __init__(self, reactor: Any, pool: Any, transact: Transact) -> None:
        """
        @param reactor: the reactor the results are delivered in (and the
            batches started from: L{IReactorTime.callLater}).
        @param pool: a started L{twisted.python.threadpool.ThreadPool} of
            one thread: the thread that owns the connection.
        @param transact: runs a batch in that thread.
        """
        self._reactor = reactor
        self._pool = pool
        self._transact = transact
        self._pending: list[tuple[Operation, bool, Deferred[Any]]] = []
        self._busy = False
        self._idle: list[Deferred[None]] = []
        self.commits = 0

    def submit(self, operation: Operation, durable: bool = False) -> Deferred[Any]:
        """
        Run C{operation} in the next transaction.

        @param durable: whether the transaction must be on disk (C{fsync})
            before C{operation}'s result is given.
        @return: a L{Deferred} that fires with its result once that
            transaction is committed, or fails with its error.
        """
        done: Deferred[Any] = Deferred()
        self._pending.append((operation, durable, done))
        if not self._busy:
            # Not at once: at the end of this turn of the reactor, so that
            # what is submitted together (a job's result and the claim of
            # the next, the jobs of one read) shares a transaction.
            self._busy = True
            self._reactor.callLater(0, self._next)
        return done

    def idle(self) -> Deferred[None]:
        """
        @return: a L{Deferred} that fires once every operation submitted so
            far has been run.
        """
        waiter: Deferred[None] = Deferred()
        if self._busy:
            self._idle.append(waiter)
        else:
            waiter.callback(None)
        return waiter

    def _next(self) -> None:
        if not self._pending:
            self._busy = False
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)
            return
        self._busy = True
        size = MAX_BATCH
        for n, (_, flag, _) in enumerate(self._pending[:MAX_BATCH]):
            if flag:
                # Operations that need no sync ahead of the first that does
                # (a result, the claim of the next job) are committed first,
                # without waiting for the sync.
                size = n or MAX_BATCH
                break
        batch = self._pending[:size]
        del self._pending[:size]
        durable = any(flag for _, flag, _ in batch)
        running = deferToThreadPool(
            self._reactor, self._pool, self._run, [op for op, _, _ in batch], durable
        )
        running.addBoth(self._ran, batch)

    def _run(
        self, operations: list[Operation], durable: bool
    ) -> tuple[int, list[tuple[bool, Any]]]:
        try:
            return 1, [(True, result) for result in self._transact(operations, durable)]
        except Exception:
            if len(operations) == 1:
                return 1, [(False, Failure())]
        outcomes: list[tuple[bool, Any]] = []
        for operation in operations:
            try:
                outcomes.append((True, self._transact([operation], durable)[0]))
            except Exception:
                outcomes.append((False, Failure()))
        return 1 + len(operations), outcomes

    def _ran(self, result: Any, batch: list[tuple[Operation, bool, Deferred[Any]]]) -> None:
        if isinstance(result, Failure):
            outcomes = [(False, result)] * len(batch)
        else:
            commits, outcomes = result
            self.commits += commits
        for (_, _, done), (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                done.callback(value)
            else:
                done.errback(value)
        self._next()
