# -*- test-case-name: haikutx.test.test_jobstore -*-
"""
A job store in PostgreSQL, shared by every job runner pointed at the same
database: one queue, claimed with C{SELECT ... FOR UPDATE SKIP LOCKED}; a
lease per runner kept by a heartbeat column; C{LISTEN}/C{NOTIFY} to tell
the other runners of new jobs and of stop requests.

The driver is psycopg 3 (the maintained PostgreSQL driver for Python, with
a binary wheel). It blocks, so every statement runs in a thread of this
store's own, never on the reactor: one thread owns the connection that runs
the operations (many per transaction, L{GroupCommit}), another one waits
for notifications on a second connection.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from attrs import evolve
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from haikutx.interfaces import IJobStore
from haikutx.jobs.job import Job, interrupted
from haikutx.jobs.store.batch import GroupCommit, Operation
from haikutx.jobs.store.rows import COLUMNS, INSERTED, UPDATED, from_row, to_row

#: The channel of every notification.
CHANNEL = "haikutx_jobs"

#: The advisory lock held while the schema is created (several runners may
#: start at once).
_SCHEMA_LOCK = 0x6861696B

_SELECTED = ", ".join(COLUMNS)

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS haikutx_jobs (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        command TEXT NOT NULL,
        arguments TEXT NOT NULL,
        callback TEXT,
        state TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        started DOUBLE PRECISION,
        finished DOUBLE PRECISION,
        code INTEGER,
        signal TEXT,
        error TEXT,
        stdout BYTEA NOT NULL,
        stderr BYTEA NOT NULL,
        stdout_truncated BOOLEAN NOT NULL,
        stderr_truncated BOOLEAN NOT NULL,
        callback_status TEXT,
        callback_attempts INTEGER,
        callback_http_status INTEGER,
        callback_error TEXT,
        owner TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS haikutx_jobs_queued ON haikutx_jobs (seq) "
    "WHERE state = 'queued'",
    "CREATE INDEX IF NOT EXISTS haikutx_jobs_owned ON haikutx_jobs (owner) "
    "WHERE state = 'running' OR callback_status = 'pending'",
    "CREATE INDEX IF NOT EXISTS haikutx_jobs_finished ON haikutx_jobs (finished, seq) "
    "WHERE state = 'finished'",
    """
    CREATE TABLE IF NOT EXISTS haikutx_runners (
        owner TEXT PRIMARY KEY,
        heartbeat TIMESTAMPTZ NOT NULL
    )
    """,
)

_INSERT = "INSERT INTO haikutx_jobs ({}) VALUES ({}) RETURNING seq".format(
    ", ".join(INSERTED), ", ".join(f"%({c})s" for c in INSERTED)
)
_UPDATE = "UPDATE haikutx_jobs SET {} WHERE id = %(id)s".format(
    ", ".join(f"{c} = %({c})s" for c in UPDATED)
)
_UPDATE_OWNED = _UPDATE + " AND owner = %(expected_owner)s"


def _update(connection: Any, job: Job, expected_owner: str | None = None) -> bool:
    row = to_row(job)
    del row["seq"]
    if expected_owner is None:
        return connection.execute(_UPDATE, row).rowcount > 0
    row["expected_owner"] = expected_owner
    return connection.execute(_UPDATE_OWNED, row).rowcount > 0


@implementer(IJobStore)
class PostgreSQLJobStore:
    """
    An L{IJobStore} in a PostgreSQL database, shared by many runners.
    """

    shared = True
    log = Logger()

    def __init__(self, reactor: Any, url: str) -> None:
        """
        @param reactor: the reactor the results are delivered in.
        @param url: a libpq connection URL (C{postgresql://user@host/db}).
        """
        self._reactor = reactor
        self._url = url
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="haikutx-jobstore-pg")
        self._connection: Any = None
        self._trigger: Any = None
        self._batch = GroupCommit(reactor, self._pool, self._transact)
        self._listener: threading.Thread | None = None
        self._stopping = threading.Event()
        self._on_queued: Callable[[], Any] = lambda: None
        self._on_cancel: Callable[[str], Any] = lambda job_id: None

    @property
    def commits(self) -> int:
        """
        Transactions committed so far.
        """
        return self._batch.commits

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self._url, autocommit=True, connect_timeout=10)

    def _transact(self, operations: Sequence[Operation], durable: bool) -> list[Any]:
        import psycopg

        if self._connection is None or self._connection.closed:
            self._connection = self._connect()
        try:
            with self._connection.transaction():
                if not durable:
                    # Committed at once, flushed with the next durable commit.
                    self._connection.execute("SET LOCAL synchronous_commit = off")
                return [operation(self._connection) for operation in operations]
        except psycopg.OperationalError:
            # The connection is gone (server restart, network): the next
            # batch connects again.
            self._connection.close()
            raise

    def _do(self, operation: Operation, durable: bool = False) -> Deferred[Any]:
        return self._batch.submit(operation, durable)

    # -- life --

    def open(self) -> Deferred[None]:
        self._pool.start()
        # Stopped by close; at reactor shutdown at the latest, so that its
        # thread never keeps the process alive.
        self._trigger = self._reactor.addSystemEventTrigger(
            "after", "shutdown", self._stop_pools
        )
        return deferToThreadPool(self._reactor, self._pool, self._open)

    def _open(self) -> None:
        self._connection = self._connect()
        with self._connection.transaction():
            self._connection.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in _SCHEMA:
                self._connection.execute(statement)

    def _stop_pools(self) -> None:
        self._trigger = None
        for pool in (self._pool, getattr(self, "_read_pool", None)):
            if pool is not None and pool.started:
                pool.stop()

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        self._stopping.set()
        if self._pool.started:
            await self._batch.idle()
            if self._listener is not None:
                # It looks at the stop flag twice a second.
                listener, self._listener = self._listener, None
                await deferToThreadPool(self._reactor, self._pool, listener.join, 10)
            await deferToThreadPool(self._reactor, self._pool, self._close_connection)
            self._pool.stop()
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # -- jobs --

    def add(self, job: Job) -> Deferred[Job]:
        row = to_row(job)
        del row["seq"]

        def insert(connection: Any) -> Job:
            seq = connection.execute(_INSERT, row).fetchone()[0]
            connection.execute("SELECT pg_notify(%s, 'queued')", (CHANNEL,))
            return evolve(job, seq=seq)

        return self._do(insert, durable=True)

    def get(self, job_id: str) -> Deferred[Job | None]:
        def select(connection: Any) -> Job | None:
            found = connection.execute(
                f"SELECT {_SELECTED} FROM haikutx_jobs WHERE id = %s", (job_id,)
            ).fetchone()
            return None if found is None else from_row(found)

        return self._do(select)

    def save(self, job: Job, expected_owner: str | None = None) -> Deferred[bool]:
        return self._do(lambda connection: _update(connection, job, expected_owner))

    def claim(self, owner: str, limit: int, now: float) -> Deferred[list[Job]]:
        def take(connection: Any) -> list[Job]:
            rows = connection.execute(
                f"UPDATE haikutx_jobs SET state = 'running', owner = %s, started = %s "
                f"WHERE seq IN (SELECT seq FROM haikutx_jobs WHERE state = 'queued' "
                f"ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING {_SELECTED}",
                (owner, now, limit),
            ).fetchall()
            return sorted((from_row(r) for r in rows), key=lambda j: j.seq)

        return self._do(take)

    def cancel_queued(self, job_id: str, owner: str, now: float) -> Deferred[Job | None]:
        def cancel(connection: Any) -> Job | None:
            found = connection.execute(
                f"UPDATE haikutx_jobs SET state = 'finished', error = 'stopped', "
                f"finished = %s, owner = %s, "
                f"callback_status = CASE WHEN callback IS NULL THEN NULL "
                f"ELSE 'pending' END, callback_attempts = 0 "
                f"WHERE id = %s AND state = 'queued' RETURNING {_SELECTED}",
                (now, owner, job_id),
            ).fetchone()
            return None if found is None else from_row(found)

        return self._do(cancel)

    def recover(self, owner: str, lease: float, now: float) -> Deferred[list[Job]]:
        def take_over(connection: Any) -> list[Job]:
            # Owners whose lease ran out, by the database's clock (the same
            # for every runner, wherever it is).
            rows = connection.execute(
                f"SELECT {_SELECTED} FROM haikutx_jobs "
                f"WHERE (state = 'running' OR callback_status = 'pending') "
                f"AND owner IS NOT NULL AND owner <> %(owner)s AND owner NOT IN ("
                f"  SELECT r.owner FROM haikutx_runners r "
                f"  WHERE r.heartbeat >= now() - make_interval(secs => %(lease)s)) "
                f"ORDER BY seq FOR UPDATE SKIP LOCKED",
                {"owner": owner, "lease": lease},
            ).fetchall()
            taken = [interrupted(from_row(r), owner, now) for r in rows]
            for job in taken:
                _update(connection, job)
            connection.execute(
                "DELETE FROM haikutx_runners "
                "WHERE heartbeat < now() - make_interval(secs => %s) AND owner <> %s",
                (lease, owner),
            )
            return taken

        return self._do(take_over)

    def heartbeat(self, owner: str) -> Deferred[None]:
        def beat(connection: Any) -> None:
            connection.execute(
                "INSERT INTO haikutx_runners (owner, heartbeat) VALUES (%s, now()) "
                "ON CONFLICT (owner) DO UPDATE SET heartbeat = now()",
                (owner,),
            )

        return self._do(beat)

    def retire(self, owner: str) -> Deferred[None]:
        def forget(connection: Any) -> None:
            connection.execute("DELETE FROM haikutx_runners WHERE owner = %s", (owner,))

        return self._do(forget)

    def evict(self, keep: int) -> Deferred[list[str]]:
        def remove(connection: Any) -> list[str]:
            rows = connection.execute(
                "DELETE FROM haikutx_jobs WHERE seq IN ("
                "  SELECT seq FROM haikutx_jobs WHERE state = 'finished' "
                "  ORDER BY finished DESC, seq DESC OFFSET %s "
                "  FOR UPDATE SKIP LOCKED) RETURNING id",
                (keep,),
            ).fetchall()
            return [r[0] for r in rows]

        return self._do(remove)

    def request_cancel(self, job_id: str) -> Deferred[None]:
        def notify(connection: Any) -> None:
            connection.execute("SELECT pg_notify(%s, %s)", (CHANNEL, "cancel " + job_id))

        return self._do(notify)

    # -- notifications --

    def listen(self, on_queued: Callable[[], Any], on_cancel: Callable[[str], Any]) -> None:
        self._on_queued = on_queued
        self._on_cancel = on_cancel
        if self._listener is None:
            self._listener = threading.Thread(
                target=self._listen, name="haikutx-jobstore-listen", daemon=True
            )
            self._listener.start()

    def _listen(self) -> None:
        """
        The listener thread: C{LISTEN}, hand each notification to the
        reactor, reconnect (with back-off) when the connection is lost.
        """
        import psycopg

        delay = 0.5
        while not self._stopping.is_set():
            try:
                with self._connect() as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    delay = 0.5
                    # Anything queued while not listening: look once.
                    self._reactor.callFromThread(self._on_queued)
                    while not self._stopping.is_set():
                        for note in connection.notifies(timeout=0.5):
                            self._reactor.callFromThread(self._dispatch, note.payload)
            except psycopg.Error as e:
                if self._stopping.is_set():
                    return
                self._reactor.callFromThread(
                    self.log.warn,
                    "job store: listening for notifications failed: {reason}",
                    reason=str(e),
                )
                self._stopping.wait(delay)
                delay = min(delay * 2, 10.0)

    def _dispatch(self, payload: str) -> None:
        if payload == "queued":
            self._on_queued()
        elif payload.startswith("cancel "):
            self._on_cancel(payload[len("cancel ") :])
