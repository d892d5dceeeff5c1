"""
Tests for L{haikutx.cli}: the C{haiku} command, C{twistd -n haiku} without
a pidfile.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from unittest import skipUnless

from twisted.trial.unittest import SynchronousTestCase, TestCase

from haikutx.test.support import http
from haikutx.test.test_serve import _served_port
from haikutx.test.test_service import ROOT, start_twistd

#: How the test runs the command: what the C{haiku} script does.
HAIKU = [sys.executable, "-c", "from haikutx.cli import main; main()"]


@skipUnless((ROOT / "pyproject.toml").exists(), "needs the source tree's pyproject.toml")
class EntryPointTests(SynchronousTestCase):
    """
    The C{haiku} console script is declared in pyproject.toml.
    """

    def test_declared(self) -> None:
        """
        C{[project.scripts]} maps C{haiku} to L{haikutx.cli.main}.
        """
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())
        self.assertEqual(project["project"]["scripts"], {"haiku": "haikutx.cli:main"})


class HaikuCommandTests(TestCase):
    """
    C{haiku ARGS}, run as a user runs it.
    """

    timeout = 120

    async def test_two_servers_in_one_directory(self) -> None:
        """
        C{haiku --serve ./hello.py} twice in one directory gives two servers
        on different ports from 3000 (no pidfile stops the second), each
        serving the file.
        """
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        (directory / "hello.py").write_text("res.end('hello from serve')\n")
        argv = ["--serve", "./hello.py", "--workers", "1"]
        one = await start_twistd(self, command=[*HAIKU, *argv], cwd=str(directory))
        port_one = await _served_port(one)
        two = await start_twistd(self, command=[*HAIKU, *argv], cwd=str(directory))
        port_two = await _served_port(two)
        self.assertNotEqual(port_one, port_two)
        self.assertGreaterEqual(min(port_one, port_two), 3000)
        for port in (port_one, port_two):
            response = await http(port, "/")
            self.assertEqual((response.status, response.body), (200, b"hello from serve"))
        self.assertEqual(sorted(p.name for p in directory.iterdir()), ["hello.py"])

    async def test_bad_option_is_one_line(self) -> None:
        """
        A bad option is one line on standard error, exit status 1.
        """
        collector = await start_twistd(self, command=[*HAIKU, "--port", "99999"])
        await collector.ended
        self.assertEqual(
            collector.streams[2], b"haiku: --port: 99999 is out of range (0-65535)\n"
        )
        self.assertEqual(collector.exit_code, 1)
