"""
Tests for L{haikutx.runtime.loader.HandlerLoader} with local handlers: files are
read off the reactor thread (for real), and kept in memory for the
freshness given (time from a L{Clock}).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from haikutx.runtime.loader import HandlerLoader, HandlerLoadError


class _ClockedReactor:
    """
    The real reactor for threads, a L{Clock} for time.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def seconds(self) -> float:
        return self._clock.seconds()

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


class LocalCacheTests(TestCase):
    """
    Local handlers are served from memory while fresh, read again after.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.directory = Path(self.mktemp())
        self.directory.mkdir()

    def loader(self, fresh_for: float, cache_bytes: int = 1 << 20) -> HandlerLoader:
        return HandlerLoader(
            _ClockedReactor(self.clock), self.directory, 16384,
            fresh_for=fresh_for, cache_bytes=cache_bytes,
        )

    def write(self, name: str, text: str) -> None:
        (self.directory / name).write_text(text)

    async def test_fresh_from_memory_then_read_again(self) -> None:
        """
        Within C{fresh_for} seconds an edited file is still served from
        memory; after that the new content is read.
        """
        loader = self.loader(fresh_for=5)
        self.write("h.py", "res.end('one')")
        self.assertEqual((await loader.load("h.py")).source, b"res.end('one')")
        self.write("h.py", "res.end('two')")
        self.clock.advance(4.9)
        self.assertEqual((await loader.load("h.py")).source, b"res.end('one')")
        self.clock.advance(0.2)
        self.assertEqual((await loader.load("h.py")).source, b"res.end('two')")

    async def test_zero_reads_every_time(self) -> None:
        """
        With C{fresh_for=0} every load reads the file.
        """
        loader = self.loader(fresh_for=0)
        self.write("h.py", "res.end('one')")
        await loader.load("h.py")
        self.write("h.py", "res.end('two')")
        self.assertEqual((await loader.load("h.py")).source, b"res.end('two')")

    async def test_removed_file_is_404_once_stale(self) -> None:
        """
        A handler whose file is removed answers 404 once its cached code is
        stale; errors are not cached.
        """
        loader = self.loader(fresh_for=5)
        self.write("h.py", "res.end('one')")
        await loader.load("h.py")
        (self.directory / "h.py").unlink()
        self.clock.advance(6)
        with self.assertRaises(HandlerLoadError) as caught:
            await loader.load("h.py")
        self.assertEqual(caught.exception.status, 404)
        self.write("h.py", "res.end('back')")
        self.assertEqual((await loader.load("h.py")).source, b"res.end('back')")

    async def test_bounded_in_bytes(self) -> None:
        """
        When the cache would grow past its bound, the oldest handlers are
        dropped (and read again when next asked for).
        """
        loader = self.loader(fresh_for=60, cache_bytes=30)
        self.write("a.py", "a" * 20)
        self.write("b.py", "b" * 20)
        await loader.load("a.py")
        await loader.load("b.py")
        self.write("a.py", "A" * 20)
        self.write("b.py", "B" * 20)
        self.assertEqual((await loader.load("b.py")).source, b"b" * 20)
        self.assertEqual((await loader.load("a.py")).source, b"A" * 20)
