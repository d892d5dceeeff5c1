# -*- test-case-name: haikutx.test.test_jobstore -*-
"""
Tests for the job stores: one conformance mixin run against
L{MemoryJobStore}, L{SQLiteJobStore} and L{PostgreSQLJobStore} (a real
server of the test's own, see L{haikutx.test.postgres}); the group commit;
file modes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from haikutx.interfaces import IJobStore
from haikutx.jobs.job import FINISHED, QUEUED, RUNNING, CallbackOutcome, Job
from haikutx.jobs.store.batch import GroupCommit
from haikutx.jobs.store.sqlite import SQLiteJobStore
from haikutx.test import postgres
from haikutx.testing import MemoryJobStore


def _evolved(job: Job) -> Job:
    from attrs import evolve

    return evolve(job, state=RUNNING, started=1.0)


def _job(n: int, **kw: Any) -> Job:
    return Job(id=f"{n:040x}", seq=0, command="echo", arguments=("a b", "c"), **kw)


class _JobStoreTestsMixin:
    """
    The conformance tests every L{IJobStore} passes.
    """

    def make_store(self) -> Any:
        raise NotImplementedError()

    async def _opened(self) -> Any:
        store = self.make_store()
        await store.open()
        self.addCleanup(store.close)
        return store

    async def _added(self, store: Any, *numbers: int, **kw: Any) -> list[Job]:
        return [await store.add(_job(n, **kw)) for n in numbers]

    def test_interface(self) -> None:
        """
        The store provides L{IJobStore}.
        """
        self.assertTrue(verifyObject(IJobStore, self.make_store()))

    async def test_empty(self) -> None:
        """
        A new store has no job and nothing to claim.
        """
        store = await self._opened()
        self.assertIsNone(await store.get(_job(1).id))
        self.assertEqual(await store.claim("a", 5, 1.0), [])

    async def test_add_order_and_round_trip(self) -> None:
        """
        Added jobs get increasing C{seq}; a saved job reads back equal,
        binary output and outcome included.
        """
        store = await self._opened()
        first, second = await self._added(store, 1, 2)
        self.assertLess(first.seq, second.seq)
        self.assertEqual(await store.get(first.id), first)
        done = first.__class__(
            **{
                **{a: getattr(first, a) for a in ("id", "seq", "command", "arguments")},
                "state": FINISHED,
                "stdout": b"\xff\xfeh\xc3",
                "stderr": b"err",
                "code": 3,
                "signal": "SIGTERM",
                "error": "timeout",
                "callback": "http://example.com/cb",
                "created": 1.25,
                "started": 1.5,
                "finished": 2.5,
                "stdout_truncated": True,
                "callback_outcome": CallbackOutcome("delivered", 2, 200, None),
                "owner": "a",
            }
        )
        await store.save(done)
        self.assertEqual(await store.get(first.id), done)

    async def test_save_owned(self) -> None:
        """
        A save that names the owner it expects replaces the job only while
        the stored job is that owner's, and says whether it did.
        """
        store = await self._opened()
        (job,) = await self._added(store, 1)
        (claimed,) = await store.claim("a", 1, 5.0)
        finished = claimed.__class__(**{**_fields(claimed), "state": FINISHED, "code": 0})
        # Taken over by "b" (as when "a"'s lease ran out): "a" changes nothing.
        taken = claimed.__class__(**{**_fields(claimed), "owner": "b", "error": "interrupted"})
        self.assertTrue(await store.save(taken, "a"))
        self.assertFalse(await store.save(finished, "a"))
        self.assertEqual(await store.get(job.id), taken)
        self.assertTrue(await store.save(finished, "b"))
        self.assertEqual((await store.get(job.id)).code, 0)

    async def test_claim(self) -> None:
        """
        Claims take queued jobs oldest first, each once, and mark them
        running for their owner.
        """
        store = await self._opened()
        jobs = await self._added(store, 1, 2, 3)
        a = await store.claim("a", 2, 5.0)
        self.assertEqual([j.id for j in a], [jobs[0].id, jobs[1].id])
        self.assertEqual({(j.state, j.owner, j.started) for j in a}, {(RUNNING, "a", 5.0)})
        b = await store.claim("b", 5, 6.0)
        self.assertEqual([j.id for j in b], [jobs[2].id])
        self.assertEqual(await store.claim("c", 5, 7.0), [])

    async def test_concurrent_claims(self) -> None:
        """
        Claims made at the same time never take the same job twice.
        """
        store = await self._opened()
        await self._added(store, *range(1, 21))
        results = await DeferredList(
            [store.claim(f"r{n}", 3, 1.0) for n in range(10)], fireOnOneErrback=True
        )
        ids = [job.id for _, claimed in results for job in claimed]
        self.assertEqual(len(ids), 20)
        self.assertEqual(len(set(ids)), 20)

    async def test_cancel_queued(self) -> None:
        """
        A queued job is finished as stopped, its callback pending, and can
        no longer be claimed; a running job is not cancelled this way.
        """
        store = await self._opened()
        queued = (await self._added(store, 1, callback="http://example.com/"))[0]
        running = (await self._added(store, 2))[0]
        await store.save(running.__class__(**{**_fields(running), "state": RUNNING}))
        stopped = await store.cancel_queued(queued.id, "a", 9.0)
        self.assertEqual(
            (stopped.state, stopped.error, stopped.finished, stopped.owner),
            (FINISHED, "stopped", 9.0, "a"),
        )
        self.assertEqual(stopped.callback_outcome.status, "pending")
        self.assertIsNone(await store.cancel_queued(queued.id, "a", 9.0))
        self.assertIsNone(await store.cancel_queued(running.id, "a", 9.0))
        self.assertIsNone(await store.cancel_queued("f" * 40, "a", 9.0))
        self.assertEqual(await store.claim("a", 5, 1.0), [])

    async def test_recover(self) -> None:
        """
        The running jobs of a runner that is gone become interrupted and
        the recovering runner's; so do its finished jobs with a pending
        callback; queued jobs stay queued.
        """
        store = await self._opened()
        await store.heartbeat("gone")
        jobs = await self._added(store, 1, 2, 3, callback="http://example.com/")
        await store.claim("gone", 2, 1.0)
        await store.save(
            jobs[1].__class__(
                **{
                    **_fields(jobs[1]),
                    "state": FINISHED,
                    "owner": "gone",
                    "callback_outcome": CallbackOutcome("pending", 1),
                }
            )
        )
        await self._expire("gone")
        await store.heartbeat("me")
        taken = await store.recover("me", 0.0, 50.0)
        self.assertEqual([j.id for j in taken], [jobs[0].id, jobs[1].id])
        first = await store.get(jobs[0].id)
        self.assertEqual(
            (first.state, first.error, first.finished, first.owner),
            (FINISHED, "interrupted", 50.0, "me"),
        )
        self.assertEqual(first.callback_outcome.status, "pending")
        self.assertEqual(
            (await store.get(jobs[1].id)).callback_outcome, CallbackOutcome("pending", 1)
        )
        self.assertEqual((await store.get(jobs[2].id)).state, QUEUED)
        self.assertEqual(await store.recover("me", 0.0, 51.0), [])

    async def _expire(self, owner: str) -> None:
        """
        Let C{owner}'s lease run out (the stores that are not shared have
        none).
        """

    async def test_evict(self) -> None:
        """
        Only the oldest finished jobs beyond C{keep} are removed.
        """
        store = await self._opened()
        jobs = await self._added(store, 1, 2, 3, 4)
        for job, finished in zip(jobs[:3], (3.0, 1.0, 2.0), strict=True):
            await store.save(
                job.__class__(**{**_fields(job), "state": FINISHED, "finished": finished})
            )
        removed = await store.evict(1)
        self.assertEqual(sorted(removed), sorted([jobs[1].id, jobs[2].id]))
        self.assertIsNotNone(await store.get(jobs[0].id))
        self.assertIsNotNone(await store.get(jobs[3].id))
        self.assertEqual(await store.evict(1), [])
        # A save of an evicted job does not bring it back.
        await store.save(jobs[1])
        self.assertIsNone(await store.get(jobs[1].id))


def _fields(job: Job) -> dict[str, Any]:
    from attrs import asdict

    return asdict(job, recurse=False)


class MemoryJobStoreTests(_JobStoreTestsMixin, TestCase):
    """
    L{MemoryJobStore} conforms to L{IJobStore}.
    """

    def make_store(self) -> Any:
        return MemoryJobStore()


class SQLiteJobStoreTests(_JobStoreTestsMixin, TestCase):
    """
    L{SQLiteJobStore} conforms to L{IJobStore}, persists across instances
    and keeps its files private.
    """

    def make_store(self) -> Any:
        if not hasattr(self, "_path"):
            self._path = Path(self.mktemp()) / "state" / "jobs.sqlite3"
        return SQLiteJobStore(reactor, self._path)

    async def test_persists(self) -> None:
        """
        Jobs saved by one store are read by the next one on the same file.
        """
        store = self.make_store()
        await store.open()
        job = await store.add(_job(7, stdout=b"out"))
        await store.close()
        again = await self._opened()
        self.assertEqual(await again.get(job.id), job)

    async def test_modes(self) -> None:
        """
        The state directory is 0700 (also when it existed with a wider
        mode), the database and its -wal and -shm files 0600, whatever the
        umask.
        """
        self.make_store()
        self._path.parent.mkdir(parents=True)
        os.chmod(self._path.parent, 0o755)
        old = os.umask(0o022)
        try:
            store = await self._opened()
            await store.add(_job(1))
        finally:
            os.umask(old)
        self.assertEqual(self._path.parent.stat().st_mode & 0o777, 0o700)
        for name in ("", "-wal", "-shm"):
            path = Path(f"{self._path}{name}")
            self.assertTrue(path.exists(), path)
            self.assertEqual(path.stat().st_mode & 0o777, 0o600, path)

    async def test_accepted_job_synced(self) -> None:
        """
        The commit that adds a job is followed by an C{fdatasync} of the
        write-ahead log before L{SQLiteJobStore.add} fires; a save alone is
        not synced.
        """
        from haikutx.jobs.store import sqlite as module

        synced: list[int] = []

        def sync(fd: int) -> None:
            synced.append(os.fstat(fd).st_ino)
            os.fdatasync(fd)

        self.patch(module, "_sync", sync)
        store = await self._opened()
        job = await store.add(_job(1))
        wal = Path(f"{self._path}-wal").stat().st_ino
        self.assertEqual(synced, [wal])
        await store.save(_evolved(job))
        self.assertEqual(synced, [wal])
        await store.add(_job(2))
        self.assertEqual(synced, [wal, wal])

    async def test_statements(self) -> None:
        """
        An add or a save alone in its batch is one statement (its own
        transaction: no C{BEGIN}, no C{COMMIT}); several share one
        transaction; the durability setting is never switched per commit.
        """
        store = await self._opened()
        statements: list[str] = []
        recorded = Deferred()

        def record() -> None:
            store._connection.set_trace_callback(
                lambda s: statements.append(" ".join(s.split()[:2]))
            )

        store._pool.callInThreadWithCallback(
            lambda ok, r: reactor.callFromThread(recorded.callback, None), record
        )
        await recorded
        job = await store.add(_job(1))
        await store.save(_evolved(job))
        self.assertEqual(statements, ["INSERT INTO", "UPDATE jobs"])
        del statements[:]
        await DeferredList([store.add(_job(2)), store.save(_evolved(job))])
        self.assertEqual(
            statements, ["BEGIN IMMEDIATE", "INSERT INTO", "UPDATE jobs", "COMMIT"]
        )

    async def test_checkpoints(self) -> None:
        """
        The write-ahead log is copied into the database file about once a
        second (not by the commits): the database file alone holds the jobs.
        """
        import shutil
        import sqlite3

        from twisted.internet.task import deferLater

        from haikutx.jobs.store import sqlite as module

        store = await self._opened()
        await DeferredList([store.add(_job(n)) for n in range(1, 51)])
        await deferLater(reactor, module.CHECKPOINT_INTERVAL * 1.5)
        alone = Path(self.mktemp())
        alone.mkdir()
        shutil.copy(self._path, alone / "copy.sqlite3")
        connection = sqlite3.connect(str(alone / "copy.sqlite3"))
        self.addCleanup(connection.close)
        self.assertEqual(connection.execute("SELECT count(*) FROM jobs").fetchone()[0], 50)

    async def test_log_starts_again(self) -> None:
        """
        The writing thread checkpoints the log between batches, every
        L{CHECKPOINT_EVERY} commits: commits one after another start the
        log again from its beginning, and it stays the size of a few
        commits (rewritten in place, not grown and synced with its size).
        """
        import os

        from haikutx.jobs.store import sqlite as module

        self.patch(module, "CHECKPOINT_EVERY", 4)
        store = await self._opened()
        wal = f"{self._path}-wal"
        sizes = []
        for n in range(1, 61):
            await store.add(_job(n))
            sizes.append(os.path.getsize(wal))
        # A commit here writes at most 5 pages of 4 kB (with their headers).
        self.assertLess(max(sizes), 8 * 5 * 4120)

    async def test_not_on_reactor_thread(self) -> None:
        """
        Statements run in the store's own thread, not the reactor's.
        """
        import threading

        store = await self._opened()
        thread = await store._do(lambda connection: threading.current_thread())
        self.assertIsNot(thread, threading.current_thread())
        self.assertIn("haikutx-jobstore", thread.name)

    async def test_group_commit(self) -> None:
        """
        Jobs added while a commit runs share the next commit: 100 jobs
        added at once take far fewer than 100 commits, and each is stored
        when its L{Deferred} fires.
        """
        store = await self._opened()
        before = store.commits
        jobs = await DeferredList(
            [store.add(_job(n)) for n in range(1, 101)], fireOnOneErrback=True
        )
        self.assertLessEqual(store.commits - before, 3)
        for _, job in jobs:
            self.assertEqual((await store.get(job.id)).id, job.id)


class PostgreSQLJobStoreTests(_JobStoreTestsMixin, TestCase):
    """
    L{PostgreSQLJobStore} conforms to L{IJobStore} on a real server, and its
    notifications reach the other stores on the same database.
    """

    timeout = 120

    def make_store(self) -> Any:
        from haikutx.jobs.store.postgresql import PostgreSQLJobStore

        if not hasattr(self, "_url"):
            self._url = postgres.database(self)
        return PostgreSQLJobStore(reactor, self._url)

    async def _expire(self, owner: str) -> None:
        import psycopg

        with psycopg.connect(self._url, autocommit=True) as connection:
            connection.execute(
                "UPDATE haikutx_runners SET heartbeat = now() - interval '1 hour' WHERE owner = %s",
                (owner,),
            )

    async def test_lease(self) -> None:
        """
        The jobs of a runner whose heartbeat is recent are not taken over.
        """
        store = await self._opened()
        await store.heartbeat("alive")
        await self._added(store, 1)
        await store.claim("alive", 1, 1.0)
        self.assertEqual(await store.recover("me", 30.0, 2.0), [])
        await self._expire("alive")
        self.assertEqual(len(await store.recover("me", 30.0, 3.0)), 1)

    async def test_notifications(self) -> None:
        """
        A job added through one store, and a stop request, are told to
        another store's listener.
        """
        first = await self._opened()
        second = await self._opened()
        queued: list[bool] = []
        cancels: list[str] = []
        ready: Deferred[None] = Deferred()

        def on_queued() -> None:
            queued.append(True)
            if not ready.called:
                ready.callback(None)

        second.listen(on_queued, cancels.append)
        await ready  # listening (it looks once when it starts)
        queued.clear()
        await first.add(_job(1))
        await first.request_cancel("a" * 40)
        from twisted.internet.task import deferLater

        for _ in range(100):
            if queued and cancels:
                break
            await deferLater(reactor, 0.05)
        self.assertTrue(queued)
        self.assertEqual(cancels, ["a" * 40])


class _FakePool:
    """
    A thread pool that runs nothing until told to: the test decides when a
    transaction ends.
    """

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any) -> None:
        self.calls.append((on_result, f, args))

    def run_one(self) -> None:
        on_result, f, args = self.calls.pop(0)
        on_result(True, f(*args))


class _FakeReactor:
    """
    Runs what is called from a thread at once, and what is called later at
    the end of the current turn (L{turn}).
    """

    def __init__(self) -> None:
        self.later: list[Any] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)

    def callLater(self, delay: float, f: Any, *args: Any) -> None:
        self.later.append((f, args))

    def turn(self) -> None:
        later, self.later = self.later, []
        for f, args in later:
            f(*args)


class GroupCommitTests(SynchronousTestCase):
    """
    L{GroupCommit} batches operations submitted while a transaction runs.
    """

    def _batch(self, fail_on: object = None) -> tuple[_FakePool, GroupCommit, list[list[Any]]]:
        pool = _FakePool()
        self.reactor = _FakeReactor()
        transactions: list[list[Any]] = []

        self.durable: list[bool] = []

        def transact(operations: Any, durable: bool) -> list[Any]:
            results = [operation(None) for operation in operations]
            if fail_on in results:
                raise ValueError("bad operation")
            transactions.append(results)
            self.durable.append(durable)
            return results

        return pool, GroupCommit(self.reactor, pool, transact), transactions

    def test_batches(self) -> None:
        """
        The first operation runs alone (at the end of the reactor's turn);
        the ones submitted meanwhile all share the next transaction, which
        the database thread starts itself when the first ends (no second
        hand-over from the reactor); each gets its own result.
        """
        pool, batch, transactions = self._batch()
        others: list[Deferred[Any]] = []

        def first_operation(connection: object) -> int:
            # Submitted while the first transaction runs.
            others.extend(batch.submit(lambda c, n=n: n) for n in range(2, 6))
            return 1

        first = batch.submit(first_operation)
        self.assertEqual(len(pool.calls), 0)
        self.reactor.turn()
        self.assertEqual(len(pool.calls), 1)
        pool.run_one()
        self.assertEqual(self.successResultOf(first), 1)
        self.assertEqual([self.successResultOf(d) for d in others], [2, 3, 4, 5])
        self.assertEqual(transactions, [[1], [2, 3, 4, 5]])
        self.assertEqual((pool.calls, self.reactor.later), ([], []))
        self.assertEqual(batch.commits, 2)
        self.successResultOf(batch.idle())
        # Idle again: the next operation is started from the reactor.
        batch.submit(lambda c: 6)
        self.reactor.turn()
        self.assertEqual(len(pool.calls), 1)

    def test_one_turn(self) -> None:
        """
        Operations submitted in one turn of the reactor, the pool idle, share
        one transaction.
        """
        pool, batch, transactions = self._batch()
        done = [batch.submit(lambda c, n=n: n) for n in range(3)]
        self.reactor.turn()
        self.assertEqual(len(pool.calls), 1)
        pool.run_one()
        self.assertEqual([self.successResultOf(d) for d in done], [0, 1, 2])
        self.assertEqual(transactions, [[0, 1, 2]])

    def test_synced_together(self) -> None:
        """
        Operations that need no sync, submitted ahead of one that does, share
        its synced transaction (the accepted job does not wait for a commit
        of theirs first); so do the ones after it.
        """
        pool, batch, transactions = self._batch()
        done = [
            batch.submit(lambda c: "result"),
            batch.submit(lambda c: "claim"),
            batch.submit(lambda c: "insert", durable=True),
            batch.submit(lambda c: "result 2"),
        ]
        self.reactor.turn()
        self.assertEqual(len(pool.calls), 1)
        pool.run_one()
        self.assertEqual(
            [self.successResultOf(d) for d in done], ["result", "claim", "insert", "result 2"]
        )
        self.assertEqual(transactions, [["result", "claim", "insert", "result 2"]])
        self.assertEqual(self.durable, [True])
        self.assertEqual(batch.commits, 1)

    def test_unsynced_alone(self) -> None:
        """
        A batch with nothing that must be synced is committed without a sync.
        """
        pool, batch, transactions = self._batch()
        batch.submit(lambda c: "result")
        self.reactor.turn()
        pool.run_one()
        self.assertEqual(self.durable, [False])

    def test_failure_isolated(self) -> None:
        """
        When a batch fails, its operations run again one per transaction, so
        only the bad one fails.
        """
        pool, batch, transactions = self._batch(fail_on="bad")
        batch.submit(lambda c: 0)
        self.reactor.turn()
        good = batch.submit(lambda c: 1)
        bad = batch.submit(lambda c: "bad")
        pool.run_one()
        self.assertEqual(self.successResultOf(good), 1)
        self.failureResultOf(bad, ValueError)
        self.assertEqual(transactions, [[0], [1]])

    def test_idle_waits(self) -> None:
        """
        L{GroupCommit.idle} fires once everything submitted has run.
        """
        pool, batch, _ = self._batch()
        batch.submit(lambda c: 1)
        idle = batch.idle()
        self.assertNoResult(idle)
        self.reactor.turn()
        pool.run_one()
        self.successResultOf(idle)


class GroupCommitUpkeepTests(SynchronousTestCase):
    """
    The upkeep given to L{GroupCommit} runs in the database thread once the
    results of the batches are handed back, when no batch waits.
    """

    def test_after_results(self) -> None:
        """
        It runs once after the batches of one hand-over, the results already
        given; what is submitted during it is run after it, then it runs
        again.
        """
        pool = _FakePool()
        fake = _FakeReactor()
        seen: list[Any] = []
        done: list[Deferred[Any]] = []

        def upkeep() -> None:
            seen.append([d.called for d in done])
            if len(seen) == 1:
                done.append(batch.submit(lambda c: "during"))

        batch = GroupCommit(fake, pool, lambda ops, durable: [op(None) for op in ops], upkeep)
        done.append(batch.submit(lambda c: "first"))
        fake.turn()
        pool.run_one()
        self.assertEqual(seen, [[True], [True, True]])
        self.assertEqual(self.successResultOf(done[1]), "during")
        self.assertEqual(batch.commits, 2)

    def test_failure_logged(self) -> None:
        """
        An upkeep that fails is logged; the batches go on.
        """
        pool = _FakePool()
        fake = _FakeReactor()

        def upkeep() -> None:
            raise ZeroDivisionError()

        batch = GroupCommit(fake, pool, lambda ops, durable: [op(None) for op in ops], upkeep)
        first = batch.submit(lambda c: 1)
        fake.turn()
        pool.run_one()
        self.assertEqual(self.successResultOf(first), 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        second = batch.submit(lambda c: 2)
        fake.turn()
        pool.run_one()
        self.assertEqual(self.successResultOf(second), 2)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class DatabaseThreadTests(TestCase):
    """
    L{DatabaseThread} runs what it is given in one thread of its own, in
    order, and gives the results (or failures) back in the reactor's thread.
    """

    async def test_one_thread_in_order(self) -> None:
        import threading

        from twisted.internet.threads import deferToThreadPool

        from haikutx.jobs.store.thread import DatabaseThread

        thread = DatabaseThread("test-db")
        thread.start()
        self.addCleanup(thread.stop)
        seen: list[tuple[int, str]] = []

        def work(n: int) -> int:
            seen.append((n, threading.current_thread().name))
            if n == 3:
                raise ValueError("three")
            return n * 10

        results = [deferToThreadPool(reactor, thread, work, n) for n in range(5)]
        self.assertEqual(await results[0], 0)
        self.assertEqual(await results[4], 40)
        with self.assertRaises(ValueError):
            await results[3]
        self.assertEqual([n for n, _ in seen], [0, 1, 2, 3, 4])
        self.assertEqual({name for _, name in seen}, {"test-db"})
        thread.stop()
        self.assertFalse(thread.started)
        self.assertEqual([t.name for t in threading.enumerate() if t.name == "test-db"], [])
