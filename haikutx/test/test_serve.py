"""
Tests for C{--serve} (SPEC §1, stackvana's C{stack ./file}) and
C{--languages}: the serve loader, the first free port from 3000, and
C{twistd -n haiku} run as a user runs it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from haikutx.runtime.loader import HandlerLoadError, ServeLoader
from haikutx.service import FirstFreePort
from haikutx.tap import Options
from haikutx.test.support import free_port, http
from haikutx.test.test_service import ROOT, start_twistd


class ServeLoaderTests(TestCase):
    async def test_reread_on_change(self) -> None:
        """
        Every load reads the one file, whatever the name; it is read again
        only when it changed.
        """
        path = Path(self.mktemp()).absolute()
        path.write_bytes(b"echo one\n")
        loader = ServeLoader(reactor, path, 1000)
        first = await loader.load("ignored.py")
        self.assertEqual((first.url, first.source), (str(path), b"echo one\n"))
        await loader.load("x")
        self.assertEqual(loader.reads, 1)
        path.write_bytes(b"echo two, longer\n")
        second = await loader.load("x")
        self.assertEqual(second.source, b"echo two, longer\n")
        self.assertEqual(loader.reads, 2)

    async def test_missing_and_too_big(self) -> None:
        path = Path(self.mktemp()).absolute()
        loader = ServeLoader(reactor, path, 4)
        with self.assertRaises(HandlerLoadError) as missing:
            await loader.load("x")
        self.assertEqual(missing.exception.status, 404)
        path.write_bytes(b"123456")
        with self.assertRaises(HandlerLoadError) as big:
            await loader.load("x")
        self.assertEqual(big.exception.status, 400)


class FirstFreePortTests(TestCase):
    def test_counts_up(self) -> None:
        """
        When the first port is taken, the next free one is used.
        """
        site = Site(Resource())
        taken = None
        for _ in range(20):
            first = free_port()
            try:
                taken = reactor.listenTCP(first, site)
                break
            except CannotListenError:
                continue
        assert taken is not None
        self.addCleanup(taken.stopListening)
        service = FirstFreePort(reactor, site, f"tcp:{first}", "x")
        service.startService()
        self.addCleanup(service.stopService)
        self.assertIsNotNone(service.port)
        self.assertGreater(service.port, first)


class ServeOptionsTests(TestCase):
    def test_port_search(self) -> None:
        """
        C{--serve} without C{--port} searches from 3000; with it, not.
        """
        path = Path(self.mktemp()).absolute()
        path.write_text("echo hi\n")
        options = Options()
        options.parseOptions(["--serve", str(path), "--state", self.mktemp()])
        self.assertEqual((options.config.http, options.config.port_search), ("tcp:3000", True))
        self.assertEqual(options.config.serve, path)
        options = Options()
        options.parseOptions(["--serve", str(path), "--port", "3456", "--state", self.mktemp()])
        self.assertFalse(options.config.port_search)


_SERVING = re.compile(rb"serving (\S+) at http://127\.0\.0\.1:(\d+)/")


async def _served_port(collector) -> int:
    for _ in range(400):
        match = _SERVING.search(collector.output)
        if match:
            return int(match.group(2))
        if collector.ended.called:
            break
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("no serving line: " + collector.output.decode("utf-8", "replace"))


class ServeTwistdTests(TestCase):
    timeout = 120

    async def test_two_instances(self) -> None:
        """
        Two C{twistd -n haiku --serve FILE} instances each serve their file
        for every request on a free port from 3000, language from the
        extension, and pick up a change of the file.
        """
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        script = directory / "hello.sh"
        script.write_text("printf 'Content-Type: text/plain\\n\\nfirst %s' \"$PATH_INFO\"\n")
        python = directory / "hello.py"
        python.write_text("res.end('python here')\n")
        common = ["--sslport", "none", "--workers", "1"]
        one = await start_twistd(self, "--serve", str(script), "--state",
                                 str(directory / "s1"), *common)
        port_one = await _served_port(one)
        two = await start_twistd(self, "--serve", str(python), "--state",
                                 str(directory / "s2"), *common)
        port_two = await _served_port(two)
        self.assertGreaterEqual(port_one, 3000)
        self.assertGreaterEqual(port_two, 3000)
        self.assertNotEqual(port_one, port_two)

        r = await http(port_one, "/any/path")
        self.assertEqual((r.status, r.body), (200, b"first /any/path"))
        r = await http(port_two, "/?x-haiku-handler=other.sh")
        self.assertEqual((r.status, r.body), (200, b"python here"))

        script.write_text("printf 'Content-Type: text/plain\\n\\nsecond version'\n")
        r = await http(port_one, "/")
        self.assertEqual(r.body, b"second version")

    async def test_languages_flag(self) -> None:
        """
        C{twistd -n haiku --languages} prints every language with its
        interpreter and availability, and exits.
        """
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "haiku", "--languages"],
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        self.assertEqual(code, 0, err)
        lines = out.decode().splitlines()
        self.assertEqual(lines[0].split()[:2], ["language", "aliases"])
        names = {line.split()[0] for line in lines[1:]}
        self.assertEqual(
            names, {"python", "python3", "bash", "sh", "node", "ruby", "perl", "php", "lua", "tcl"}
        )
        bash = next(line for line in lines if line.startswith("bash "))
        self.assertTrue(bash.endswith(" available"))
        self.assertIn("/bash", bash)
