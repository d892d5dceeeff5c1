"""
Tests for L{haikutx.runtime.loader.HandlerLoader} with local handlers: files are
read off the reactor thread (for real), and kept in memory for the
freshness given (time from a L{Clock}).
"""

from __future__ import annotations

import os
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

    async def test_cached(self) -> None:
        """
        L{HandlerLoader.cached} gives what L{HandlerLoader.load} would give
        at once from memory, and nothing else: not before the first load,
        not once stale, never with C{fresh_for=0}.
        """
        loader = self.loader(fresh_for=5)
        self.write("h.py", "res.end('one')")
        self.assertIsNone(loader.cached("h.py"))
        loaded = await loader.load("h.py")
        self.assertIs(loader.cached("h.py"), loaded)
        self.clock.advance(5)
        self.assertIsNone(loader.cached("h.py"))
        loader = self.loader(fresh_for=0)
        await loader.load("h.py")
        self.assertIsNone(loader.cached("h.py"))

    async def test_one_read_for_requests_at_once(self) -> None:
        """
        Requests that ask for a handler while its file is being read share
        that read: one read, the same code for all, or the same refusal.
        """
        from twisted.internet.defer import gatherResults

        from haikutx.runtime import loader as module

        reads = []
        real = module._read_beneath

        def counting(directory: str, name: str, max_size: int) -> bytes | None:
            reads.append(name)
            return real(directory, name, max_size)

        self.patch(module, "_read_beneath", counting)
        loader = self.loader(fresh_for=5)
        self.write("h.py", "res.end('one')")
        loaded = await gatherResults([loader.load("h.py") for _ in range(5)])
        self.assertEqual([handler.source for handler in loaded], [b"res.end('one')"] * 5)
        self.assertEqual(reads, ["h.py"])
        missing = [loader.load("gone.py") for _ in range(3)]
        for waiting in missing:
            with self.assertRaises(HandlerLoadError) as caught:
                await waiting
            self.assertEqual(caught.exception.status, 404)
        self.assertEqual(reads, ["h.py", "gone.py"])
        with self.assertRaises(HandlerLoadError) as caught:
            await loader.load("ftp://x/h.py")
        self.assertEqual(caught.exception.status, 400)

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


class BeneathTests(TestCase):
    """
    Local handler names resolve inside the handlers directory only, symlinks
    included: the server (often root) never reads a file outside it.
    """

    #: What the outside file holds: it must never reach an answer.
    SECRET = "SECRET-OUTSIDE-HANDLERS"

    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        self.outside = base / "outside"
        self.outside.mkdir(parents=True)
        (self.outside / "shadow").write_text(self.SECRET + " = 1\n")
        self.directory = base / "handlers"
        (self.directory / "sub").mkdir(parents=True)
        (self.directory / "hello.py").write_text("res.end('hello')\n")
        (self.directory / "sub" / "inner.py").write_text("res.end('inner')\n")
        (self.directory / "outdir").symlink_to(self.outside)
        (self.directory / "outfile.py").symlink_to(self.outside / "shadow")
        (self.directory / "relout.py").symlink_to("../outside/shadow")
        (self.directory / "etcdir").symlink_to("/etc")
        (self.directory / "alias.py").symlink_to("sub/inner.py")
        (self.directory / "sub" / "up.py").symlink_to("../hello.py")
        (self.directory / "subdir").symlink_to("sub")
        (self.directory / "selfabs.py").symlink_to(self.directory / "hello.py")
        (self.directory / "proc").symlink_to("/proc/self/root")

    def loader(self) -> HandlerLoader:
        return HandlerLoader(reactor, self.directory, 16384)

    async def refused(self, name: str, status: int) -> HandlerLoadError:
        try:
            handler = await self.loader().load(name)
        except HandlerLoadError as e:
            self.assertEqual(e.status, status, (name, e.message))
            self.assertNotIn(self.SECRET, e.message)
            self.assertNotIn("root:", e.message)
            return e
        self.fail(f"{name} was read: {handler.source[:40]!r}")

    async def test_symlinked_directory_out(self) -> None:
        """
        A link to a directory outside (C{etcdir -> /etc}, C{outdir -> …})
        does not serve the files in it: 403, nothing read.
        """
        for name in ("outdir/shadow", "etcdir/passwd", "etcdir/shadow", "proc/etc/passwd"):
            error = await self.refused(name, 403)
            self.assertEqual(
                error.message, f"The handler {name} leads outside the handlers directory."
            )

    async def test_symlinked_file_out(self) -> None:
        """
        A link to a file outside, absolute or relative, is refused (403).
        """
        for name in ("outfile.py", "relout.py"):
            await self.refused(name, 403)

    async def test_dot_dot(self) -> None:
        """
        A name that climbs out with C{..} is a bad name (400).
        """
        for name in ("../outside/shadow", "sub/../../outside/shadow", "..", "sub/../.."):
            await self.refused(name, 400)

    async def test_absolute(self) -> None:
        """
        An absolute name is a bad name (400), even when it names a file
        inside the handlers directory.
        """
        for name in ("/etc/passwd", str(self.outside / "shadow"), str(self.directory / "hello.py")):
            await self.refused(name, 400)

    async def test_links_inside_allowed(self) -> None:
        """
        Relative links that stay inside the directory are followed: to a
        file, to a directory, and up from a subdirectory.
        """
        loader = self.loader()
        self.assertEqual((await loader.load("alias.py")).source, b"res.end('inner')\n")
        self.assertEqual((await loader.load("subdir/inner.py")).source, b"res.end('inner')\n")
        self.assertEqual((await loader.load("sub/up.py")).source, b"res.end('hello')\n")
        self.assertEqual((await loader.load("sub/../hello.py")).source, b"res.end('hello')\n")

    async def test_absolute_link_refused(self) -> None:
        """
        An absolute link is refused even when it points inside: the name is
        resolved beneath the directory, where an absolute path cannot lead.
        """
        await self.refused("selfabs.py", 403)

    async def test_not_regular(self) -> None:
        """
        A directory or a FIFO is not a handler (404), and opening a FIFO
        does not hang the loader's thread.
        """
        os.mkfifo(self.directory / "fifo.py")
        for name in ("sub", "fifo.py", "missing.py", "hello.py/x"):
            await self.refused(name, 404)


class BeneathFallbackTests(BeneathTests):
    """
    The same, where the kernel has no C{openat2}: real paths are compared.
    """

    def setUp(self) -> None:
        super().setUp()
        from haikutx.runtime import beneath

        self.patch(beneath, "_openat2", None)

    async def test_absolute_link_refused(self) -> None:
        """
        Without C{openat2} an absolute link that points inside is allowed:
        what counts is where it resolves.
        """
        self.assertEqual((await self.loader().load("selfabs.py")).source, b"res.end('hello')\n")
