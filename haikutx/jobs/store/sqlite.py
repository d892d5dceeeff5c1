# -*- test-case-name: haikutx.test.test_jobstore -*-
"""
Jobs of the job runner as frozen values, and their durable store: a SQLite
database in the state directory, written from one dedicated thread so that
the reactor never waits on the disk.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from attrs import asdict, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from haikutx.interfaces import IJobStore

_T = TypeVar("_T")

QUEUED = "queued"
RUNNING = "running"
FINISHED = "finished"


@frozen
class CallbackOutcome:
    """
    What became of a job's completion callback.

    @ivar status: C{"pending"} while it is being tried, C{"delivered"} once
        the receiver answered 2xx, C{"failed"} when retries ran out,
        C{"refused"} when the URL's address is not allowed.
    @ivar attempts: POSTs made so far.
    @ivar http_status: the last HTTP status received, if any.
    @ivar error: the last failure, as text, if any.
    """

    status: str
    attempts: int = 0
    http_status: int | None = None
    error: str | None = None


@frozen
class Job:
    """
    One job of the job runner, as it is at one moment.

    @ivar id: 40 lower-case hex characters.
    @ivar seq: the order in which jobs were accepted (for "oldest").
    @ivar command: the command name as the client gave it.
    @ivar arguments: its arguments.
    @ivar callback: the completion callback URL, if any.
    @ivar state: L{QUEUED}, L{RUNNING} or L{FINISHED}.
    @ivar created: when it was accepted (POSIX seconds).
    @ivar started: when its process was started, if it was.
    @ivar finished: when it finished, if it did.
    @ivar code: the exit code, once it exited normally.
    @ivar signal: the name of the signal that ended it, if one did.
    @ivar error: why it failed to run or was ended (C{"timeout"},
        C{"stopped"}, C{"interrupted"}, a spawn error), if it did.
    @ivar stdout: the most recent bytes of its standard output.
    @ivar stderr: the most recent bytes of its standard error.
    @ivar stdout_truncated: whether older stdout bytes were dropped.
    @ivar stderr_truncated: whether older stderr bytes were dropped.
    @ivar callback_outcome: what became of the callback, once tried.
    """

    id: str
    seq: int
    command: str
    arguments: tuple[str, ...] = field(converter=tuple)
    callback: str | None = None
    state: str = QUEUED
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    code: int | None = None
    signal: str | None = None
    error: str | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    callback_outcome: CallbackOutcome | None = None


def _meta(job: Job) -> str:
    record = asdict(job, recurse=True)
    for name in ("id", "seq", "stdout", "stderr"):
        del record[name]
    record["arguments"] = list(job.arguments)
    return json.dumps(record)


def _job(job_id: str, seq: int, meta: str, stdout: bytes, stderr: bytes) -> Job:
    record: dict[str, Any] = json.loads(meta)
    outcome = record.pop("callback_outcome", None)
    return Job(
        id=job_id,
        seq=seq,
        stdout=bytes(stdout),
        stderr=bytes(stderr),
        callback_outcome=CallbackOutcome(**outcome) if outcome else None,
        **record,
    )


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    meta TEXT NOT NULL,
    stdout BLOB NOT NULL,
    stderr BLOB NOT NULL
)
"""


@implementer(IJobStore)
class SQLiteJobStore:
    """
    An L{IJobStore} in one SQLite file, every statement run in a thread
    pool of exactly one thread (so writes keep their order and the
    connection is only ever used by that thread).

    The database uses write-ahead logging: a job saved before the process
    is killed, even with SIGKILL, is found again by the next L{load}.
    """

    log = Logger()

    def __init__(self, reactor, path: Path) -> None:
        """
        @param reactor: the reactor the results are delivered in.
        @param path: the database file; its directory is created (mode
            0700) when missing.
        """
        self._reactor = reactor
        self._path = path
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="haikutx-jobstore")
        self._connection: sqlite3.Connection | None = None
        self._stopping = False

    def _call(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def open(self) -> Deferred[None]:
        self._pool.start()
        return self._call(self._open)

    def _open(self) -> None:
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        connection = sqlite3.connect(
            str(self._path), check_same_thread=False, isolation_level=None
        )
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(_SCHEMA)
        self._connection = connection

    def load(self) -> Deferred[list[Job]]:
        return self._call(self._load)

    def _load(self) -> list[Job]:
        assert self._connection is not None
        rows = self._connection.execute(
            "SELECT id, seq, meta, stdout, stderr FROM jobs ORDER BY seq"
        ).fetchall()
        return [_job(*row) for row in rows]

    def save(self, job: Job) -> Deferred[None]:
        return self._call(self._save, job.id, job.seq, _meta(job), job.stdout, job.stderr)

    def _save(self, job_id: str, seq: int, meta: str, stdout: bytes, stderr: bytes) -> None:
        assert self._connection is not None
        self._connection.execute(
            "INSERT OR REPLACE INTO jobs (id, seq, meta, stdout, stderr) "
            "VALUES (?, ?, ?, ?, ?)",
            (job_id, seq, meta, stdout, stderr),
        )

    def remove(self, job_ids: Iterable[str]) -> Deferred[None]:
        return self._call(self._remove, list(job_ids))

    def _remove(self, job_ids: list[str]) -> None:
        assert self._connection is not None
        self._connection.executemany(
            "DELETE FROM jobs WHERE id = ?", [(job_id,) for job_id in job_ids]
        )

    async def _close(self) -> None:
        if self._pool.started:
            await self._call(self._close_connection)
            # The one thread is idle now: joining it is immediate.
            self._pool.stop()

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())
