# -*- test-case-name: haikutx.test.test_jobstore -*-
"""
The job runner's default store: one SQLite database in the state directory,
written from one dedicated thread (so the reactor never waits on the disk),
many operations per commit.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from haikutx.interfaces import IJobStore
from haikutx.jobs.job import (  # noqa: F401 (re-exported for older imports)
    FINISHED,
    QUEUED,
    RUNNING,
    CallbackOutcome,
    Job,
    interrupted,
)
from haikutx.jobs.store.batch import GroupCommit, Operation
from haikutx.jobs.store.rows import COLUMNS, INSERTED, UPDATED, from_row, to_row
from haikutx.jobs.store.thread import DatabaseThread

_SELECTED = ", ".join(COLUMNS)

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        command TEXT NOT NULL,
        arguments TEXT NOT NULL,
        callback TEXT,
        state TEXT NOT NULL,
        created REAL NOT NULL,
        started REAL,
        finished REAL,
        code INTEGER,
        signal TEXT,
        error TEXT,
        stdout BLOB NOT NULL,
        stderr BLOB NOT NULL,
        stdout_truncated INTEGER NOT NULL,
        stderr_truncated INTEGER NOT NULL,
        callback_status TEXT,
        callback_attempts INTEGER,
        callback_http_status INTEGER,
        callback_error TEXT,
        owner TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq)",
)

#: Seconds between checkpoints of the write-ahead log (from the reading
#: thread, and at most this long between two from the writing thread).
CHECKPOINT_INTERVAL = 1.0

#: Transactions after which the writing thread checkpoints the log.
CHECKPOINT_EVERY = 32

_INSERT = "INSERT INTO jobs ({}) VALUES ({})".format(
    ", ".join(INSERTED), ", ".join(f":{c}" for c in INSERTED)
)
_UPDATE = "UPDATE jobs SET {} WHERE id = :id".format(
    ", ".join(f"{c} = :{c}" for c in UPDATED)
)
_UPDATE_OWNED = _UPDATE + " AND owner = :expected_owner"


#: How the write-ahead log is synced (a name of its own for the tests).
_sync = os.fdatasync


def _one_statement(operation: Operation) -> Operation:
    """
    Mark C{operation} as one statement that returns no rows: alone in a
    batch, it runs without C{BEGIN} and C{COMMIT} (it is its own
    transaction).
    """
    operation.one_statement = True  # type: ignore[attr-defined]
    return operation


def _private(path: Path) -> None:
    """
    Make C{path} readable and writable by its owner only, when it exists.
    """
    try:
        os.chmod(path, 0o600)
    except FileNotFoundError:
        pass


@implementer(IJobStore)
class SQLiteJobStore:
    """
    An L{IJobStore} in one SQLite file, for one runner.

    Every write runs in a thread pool of exactly one thread (so the
    connection is only ever used by that thread, and writes keep their
    order), through a L{GroupCommit}; reads run on a connection of their own
    in another thread (write-ahead logging lets them read while a commit is
    under way), so a C{GET} never waits for an C{fsync}.

    A job is on disk (the WAL is synced after its commit, as
    C{synchronous=FULL} would) before L{add} fires, so neither a SIGKILL nor
    a power cut loses an accepted job. Later writes (claims, output,
    results) are committed at once but synced with the next synced commit
    (C{synchronous=NORMAL}): a SIGKILL loses none of them; a power cut may
    take the database back to an earlier state of those jobs (a finished
    job shows running, and is interrupted at start).

    The state directory is made mode 0700 and the database and its C{-wal}
    and C{-shm} files 0600: jobs run as another user must not read other
    jobs' output from them.
    """

    shared = False
    log = Logger()

    def __init__(self, reactor: Any, path: Path) -> None:
        """
        @param reactor: the reactor the results are delivered in.
        @param path: the database file; its directory is created (mode
            0700) when missing.
        """
        self._reactor = reactor
        self._path = path
        self._pool = DatabaseThread("haikutx-jobstore")
        self._read_pool = DatabaseThread("haikutx-jobstore-read")
        self._reader: sqlite3.Connection | None = None
        self._checkpoints: Any = None
        self._connection: sqlite3.Connection | None = None
        #: The write-ahead log, opened for its syncs.
        self._wal: int | None = None
        self._trigger: Any = None
        self._batch = GroupCommit(reactor, self._pool, self._transact, self._upkeep)
        #: Transactions since the writer's last checkpoint, and its time.
        self._uncheckpointed = 0
        self._checkpointed = 0.0

    @property
    def commits(self) -> int:
        """
        Transactions committed so far.
        """
        return self._batch.commits

    def _do(self, operation: Operation, durable: bool = False) -> Deferred[Any]:
        return self._batch.submit(operation, durable)

    def _transact(self, operations: Sequence[Operation], durable: bool) -> list[Any]:
        connection = self._connection
        assert connection is not None
        if len(operations) == 1 and getattr(operations[0], "one_statement", False):
            # One statement is a transaction of its own: no BEGIN, no COMMIT.
            results = [operations[0](connection)]
        else:
            connection.execute("BEGIN IMMEDIATE")
            try:
                results = [operation(connection) for operation in operations]
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        if durable:
            self._sync_log()
        self._uncheckpointed += 1
        return results

    def _upkeep(self) -> None:
        """
        In the writing thread, between batches: a checkpoint after
        L{CHECKPOINT_EVERY} transactions or L{CHECKPOINT_INTERVAL} seconds.

        Run here, with no commit under way, the checkpoint copies the whole
        log, so that the next commit starts the log again from its
        beginning: the log stays a few hundred kilobytes, and a commit's
        C{fdatasync} rewrites blocks of the file instead of growing it (a
        size change to sync as well, which costs about twice as much). A
        checkpoint from the reading thread, while commits go on, seldom
        catches up with the last of them.
        """
        if self._uncheckpointed == 0 or self._connection is None:
            return
        now = time.monotonic()
        if (
            self._uncheckpointed < CHECKPOINT_EVERY
            and now - self._checkpointed < CHECKPOINT_INTERVAL
        ):
            return
        self._uncheckpointed = 0
        self._checkpointed = now
        self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _sync_log(self) -> None:
        """
        Put what is committed on disk: C{fdatasync} of the write-ahead log
        (what C{synchronous=FULL} does at every commit; the database itself
        is synced by the checkpoints, before they copy the log into it).
        """
        if self._wal is None:
            self._wal = os.open(f"{self._path}-wal", os.O_RDONLY | os.O_CLOEXEC)
        _sync(self._wal)

    # -- life --

    def open(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self._pool.start()
        # Stopped by close; at reactor shutdown at the latest, so that its
        # thread never keeps the process alive.
        self._trigger = self._reactor.addSystemEventTrigger(
            "after", "shutdown", self._stop_pools
        )
        await self._pool_call(self._open)
        self._read_pool.start()
        await deferToThreadPool(self._reactor, self._read_pool, self._open_reader)
        self._checkpoints = self._reactor.callLater(CHECKPOINT_INTERVAL, self._checkpoint)

    def _checkpoint(self) -> None:
        """
        Copy the write-ahead log into the database, in the reading thread,
        without waiting for (or blocking) writers; again a moment later.
        """

        def again(result: Any) -> None:
            if self._read_pool.started and self._reader is not None:
                self._checkpoints = self._reactor.callLater(
                    CHECKPOINT_INTERVAL, self._checkpoint
                )

        def checkpoint() -> None:
            if self._reader is not None:
                self._reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

        running = deferToThreadPool(self._reactor, self._read_pool, checkpoint)
        running.addErrback(lambda f: self.log.failure("job store checkpoint failed", f))
        running.addBoth(again)

    def _pool_call(self, f: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._pool, f)

    def _open_reader(self) -> None:
        self._reader = sqlite3.connect(
            str(self._path), check_same_thread=False, isolation_level=None
        )

    def _open(self) -> None:
        directory = self._path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.stat().st_mode & 0o077:
            os.chmod(directory, 0o700)
        # Create the file 0600 first: SQLite gives its -wal and -shm files
        # the mode of the database file.
        os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
        connection = sqlite3.connect(
            str(self._path), check_same_thread=False, isolation_level=None
        )
        connection.execute("PRAGMA journal_mode=WAL")
        # Commits are not synced by SQLite: those that must be are synced
        # after they commit (L{_sync_log}), the others only with the next
        # of those or the next checkpoint. No switch of this setting between
        # the two (a statement each time).
        connection.execute("PRAGMA synchronous=NORMAL")
        # Checkpoints run between batches (L{_upkeep}) and from the reading
        # thread (L{CHECKPOINT_INTERVAL}), not in the commit that happens to
        # fill the log.
        connection.execute("PRAGMA wal_autocheckpoint=0")
        columns = [row[1] for row in connection.execute("PRAGMA table_info(jobs)")]
        if "meta" in columns:
            # The first schema (one JSON column): kept aside, not lost.
            connection.execute("ALTER TABLE jobs RENAME TO jobs_v1")
            self.log.warn(
                "{path}: jobs of an older haikutx kept in the table jobs_v1",
                path=str(self._path),
            )
        for statement in _SCHEMA:
            connection.execute(statement)
        for name in (self._path, Path(f"{self._path}-wal"), Path(f"{self._path}-shm")):
            _private(name)
        self._connection = connection
        self._checkpointed = time.monotonic()

    async def _close(self) -> None:
        if self._checkpoints is not None and self._checkpoints.active():
            self._checkpoints.cancel()
        if self._read_pool.started:
            await deferToThreadPool(self._reactor, self._read_pool, self._close_reader)
            self._read_pool.stop()
        if self._pool.started:
            await self._batch.idle()
            await self._pool_call(self._close_connection)
            # The one thread is idle now: joining it is immediate.
            self._pool.stop()
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _close_connection(self) -> None:
        if self._wal is not None:
            os.close(self._wal)
            self._wal = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _stop_pools(self) -> None:
        self._trigger = None
        for pool in (self._pool, getattr(self, "_read_pool", None)):
            if pool is not None and pool.started:
                pool.stop()

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    # -- jobs --

    def add(self, job: Job) -> Deferred[Job]:
        row = to_row(job)
        del row["seq"]

        @_one_statement
        def insert(connection: sqlite3.Connection) -> Job:
            cursor = connection.execute(_INSERT, row)
            return evolve(job, seq=cursor.lastrowid)

        return self._do(insert, durable=True)

    def get(self, job_id: str) -> Deferred[Job | None]:
        def select() -> Job | None:
            assert self._reader is not None
            found = self._reader.execute(
                f"SELECT {_SELECTED} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            return None if found is None else from_row(found)

        return deferToThreadPool(self._reactor, self._read_pool, select)

    def save(self, job: Job, expected_owner: str | None = None) -> Deferred[bool]:
        row = to_row(job)
        del row["seq"]
        statement = _UPDATE
        if expected_owner is not None:
            row["expected_owner"] = expected_owner
            statement = _UPDATE_OWNED

        @_one_statement
        def update(connection: sqlite3.Connection) -> bool:
            return connection.execute(statement, row).rowcount > 0

        return self._do(update)

    def claim(self, owner: str, limit: int, now: float) -> Deferred[list[Job]]:
        def take(connection: sqlite3.Connection) -> list[Job]:
            rows = connection.execute(
                f"UPDATE jobs SET state = 'running', owner = ?, started = ? "
                f"WHERE seq IN (SELECT seq FROM jobs WHERE state = 'queued' "
                f"ORDER BY seq LIMIT ?) RETURNING {_SELECTED}",
                (owner, now, limit),
            ).fetchall()
            return sorted((from_row(r) for r in rows), key=lambda j: j.seq)

        return self._do(take)

    def cancel_queued(self, job_id: str, owner: str, now: float) -> Deferred[Job | None]:
        def cancel(connection: sqlite3.Connection) -> Job | None:
            found = connection.execute(
                f"UPDATE jobs SET state = 'finished', error = 'stopped', "
                f"finished = ?, owner = ?, "
                f"callback_status = CASE WHEN callback IS NULL THEN NULL "
                f"ELSE 'pending' END, callback_attempts = 0 "
                f"WHERE id = ? AND state = 'queued' RETURNING {_SELECTED}",
                (now, owner, job_id),
            ).fetchone()
            return None if found is None else from_row(found)

        return self._do(cancel)

    def recover(self, owner: str, lease: float, now: float) -> Deferred[list[Job]]:
        def take_over(connection: sqlite3.Connection) -> list[Job]:
            rows = connection.execute(
                f"SELECT {_SELECTED} FROM jobs WHERE owner IS NOT NULL "
                f"AND owner != ? AND (state = 'running' OR callback_status = 'pending') "
                f"ORDER BY seq",
                (owner,),
            ).fetchall()
            taken = [interrupted(from_row(r), owner, now) for r in rows]
            for job in taken:
                row = to_row(job)
                del row["seq"]
                connection.execute(_UPDATE, row)
            return taken

        return self._do(take_over)

    def heartbeat(self, owner: str) -> Deferred[None]:
        return succeed(None)

    def retire(self, owner: str) -> Deferred[None]:
        return succeed(None)

    def evict(self, keep: int) -> Deferred[list[str]]:
        def remove(connection: sqlite3.Connection) -> list[str]:
            ids = [
                r[0]
                for r in connection.execute(
                    "SELECT id FROM jobs WHERE state = 'finished' "
                    "ORDER BY finished DESC, seq DESC LIMIT -1 OFFSET ?",
                    (keep,),
                )
            ]
            connection.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
            return ids

        return self._do(remove)

    def listen(self, on_queued: Any, on_cancel: Any) -> None:
        pass

    def request_cancel(self, job_id: str) -> Deferred[None]:
        return succeed(None)

