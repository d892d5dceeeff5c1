# -*- test-case-name: haikutx.test.test_jobstore -*-
"""
Group commit: operations on one database connection, run in one thread,
as many per transaction as arrived while the previous transaction ran.

A POST answered 202 only after its job is committed would otherwise cost one
commit (one C{fsync}) per job; with a group commit, the jobs that arrive
while one commit is under way all share the next one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
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
    submitted in one turn of the reactor goes in one batch, and what is
    submitted while a transaction runs goes in the next, synced when any of
    its operations must be.

    The database thread takes the next batch itself as soon as a
    transaction ends (its results go back to the reactor meanwhile): a job
    accepted while another transaction runs waits for that one only, not
    for the reactor to hand it over as well.

    When a batch fails, its operations are run again one per transaction, so
    that one bad operation fails alone.

    @ivar commits: the transactions run so far (batches and retries).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        pool: Any,
        transact: Transact,
        after: Callable[[], None] | None = None,
    ) -> None:
        """
        @param reactor: the reactor the results are delivered in (and the
            batches started from: L{IReactorTime.callLater},
            L{IReactorThreads.callFromThread}).
        @param pool: a started L{twisted.python.threadpool.ThreadPool} of
            one thread (or a L{haikutx.jobs.store.thread.DatabaseThread}):
            the thread that owns the connection.
        @param transact: runs a batch in that thread.
        @param after: called in that thread when the results of a batch are
            handed back and no other batch waits (its upkeep, such as a
            checkpoint, waits for no transaction and delays none already
            submitted); what it raises is logged.
        """
        self._reactor = reactor
        self._pool = pool
        self._transact = transact
        self._after = after
        #: Shared with the database thread, under C{_lock}.
        self._pending: list[tuple[Operation, bool, Deferred[Any]]] = []
        self._busy = False
        self._lock = threading.Lock()
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
        with self._lock:
            self._pending.append((operation, durable, done))
            if self._busy:
                # The database thread takes it when its transaction ends.
                return done
            self._busy = True
        # Not at once: at the end of this turn of the reactor, so that what
        # is submitted together (a job's result and the claim of the next,
        # the jobs of one read) shares a transaction.
        self._reactor.callLater(0, self._start)
        return done

    def idle(self) -> Deferred[None]:
        """
        @return: a L{Deferred} that fires once every operation submitted so
            far has been run.
        """
        waiter: Deferred[None] = Deferred()
        with self._lock:
            self._idle.append(waiter)
            busy = self._busy
        if not busy:
            # After the results the database thread handed back already.
            self._reactor.callFromThread(self._maybe_idle)
        # Else the database thread tells, once it has run what is pending.
        return waiter

    def _start(self) -> None:
        self._pool.callInThreadWithCallback(self._drained, self._drain)

    def _drain(self) -> None:
        """
        In the database thread: run batches until none is waiting.
        """
        upkeep = self._after
        while True:
            with self._lock:
                if not self._pending and upkeep is None:
                    self._busy = False
                    waited = bool(self._idle)
                    break
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
            if not batch:
                # Nothing waits: the upkeep now, once (what is submitted
                # meanwhile waits for it, and is taken after it).
                assert upkeep is not None
                try:
                    upkeep()
                except BaseException:
                    self._reactor.callFromThread(
                        self.log.failure, "job store upkeep failed", Failure()
                    )
                upkeep = None
                continue
            upkeep = self._after
            durable = any(flag for _, flag, _ in batch)
            try:
                result: Any = self._run([op for op, _, _ in batch], durable)
            except BaseException:
                result = Failure()
            self._reactor.callFromThread(self._ran, result, batch)
            batch = result = None
        if waited:
            # Not after every batch: one call (and one wake-up of the
            # reactor) less per transaction when nobody waits.
            self._reactor.callFromThread(self._maybe_idle)

    def _drained(self, ok: bool, result: Any) -> None:
        if not ok:
            # Not expected (L{_drain} catches what a batch raises).
            self._reactor.callFromThread(
                self.log.failure, "job store batches stopped", result
            )

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

    def _maybe_idle(self) -> None:
        with self._lock:
            if self._busy or self._pending or not self._idle:
                return
            waiters, self._idle = self._idle, []
        for waiter in waiters:
            waiter.callback(None)
