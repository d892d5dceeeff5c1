# -*- test-case-name: haikutx.test.test_jobstore -*-
"""
Tests for L{haikutx.jobs.store.sqlite} and L{haikutx.testing.MemoryJobStore}.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from haikutx.interfaces import IJobStore
from haikutx.jobs.store.sqlite import FINISHED, RUNNING, CallbackOutcome, Job, SQLiteJobStore
from haikutx.testing import MemoryJobStore


def _job(n: int, **kw) -> Job:
    return Job(id=f"{n:040x}", seq=n, command="echo", arguments=("a b", "c"), **kw)


class _JobStoreTestsMixin:
    """
    The conformance tests every L{IJobStore} passes.
    """

    def make_store(self):
        raise NotImplementedError()

    async def _opened(self):
        store = self.make_store()
        await store.open()
        self.addCleanup(store.close)
        return store

    def test_interface(self) -> None:
        """
        The store provides L{IJobStore}.
        """
        self.assertTrue(verifyObject(IJobStore, self.make_store()))

    async def test_empty(self) -> None:
        """
        A new store loads no jobs.
        """
        store = await self._opened()
        self.assertEqual(await store.load(), [])

    async def test_round_trip(self) -> None:
        """
        A saved job loads back equal, binary output and outcome included.
        """
        store = await self._opened()
        job = _job(
            1,
            state=FINISHED,
            stdout=b"\xff\xfeh\xc3",
            stderr=b"err",
            code=3,
            signal="SIGTERM",
            error="timeout",
            callback="http://example.com/cb",
            started=1.5,
            finished=2.5,
            stdout_truncated=True,
            callback_outcome=CallbackOutcome("delivered", 2, 200, None),
        )
        await store.save(job)
        self.assertEqual(await store.load(), [job])

    async def test_replace_and_order(self) -> None:
        """
        Saving a job again replaces it; jobs load in C{seq} order.
        """
        store = await self._opened()
        await store.save(_job(2))
        await store.save(_job(1, state=RUNNING))
        await store.save(_job(1, state=FINISHED, code=0))
        self.assertEqual(await store.load(), [_job(1, state=FINISHED, code=0), _job(2)])

    async def test_remove(self) -> None:
        """
        Removed jobs are gone; unknown ids are ignored.
        """
        store = await self._opened()
        for n in (1, 2, 3):
            await store.save(_job(n))
        await store.remove([_job(1).id, _job(3).id, "f" * 40])
        self.assertEqual(await store.load(), [_job(2)])


class MemoryJobStoreTests(_JobStoreTestsMixin, TestCase):
    """
    L{MemoryJobStore} conforms to L{IJobStore}.
    """

    def make_store(self):
        return MemoryJobStore()


class SQLiteJobStoreTests(_JobStoreTestsMixin, TestCase):
    """
    L{SQLiteJobStore} conforms to L{IJobStore} and persists across instances.
    """

    def make_store(self):
        if not hasattr(self, "_path"):
            self._path = Path(self.mktemp()) / "state" / "jobs.sqlite3"
        return SQLiteJobStore(reactor, self._path)

    async def test_persists(self) -> None:
        """
        Jobs saved by one store are loaded by the next one on the same file,
        which lives in a directory created with mode 0700.
        """
        store = self.make_store()
        await store.open()
        await store.save(_job(7, stdout=b"out"))
        await store.close()
        again = await self._opened()
        self.assertEqual(await again.load(), [_job(7, stdout=b"out")])
        self.assertEqual(self._path.parent.stat().st_mode & 0o777, 0o700)

    async def test_not_on_reactor_thread(self) -> None:
        """
        Statements run in the store's own thread, not the reactor's.
        """
        import threading

        store = await self._opened()
        thread = await store._call(threading.current_thread)
        self.assertIsNot(thread, threading.current_thread())
        self.assertIn("haikutx-jobstore", thread.name)
