"""
Tests for L{haikutx.tap}: every option is validated and frozen into a
L{haikutx.config.Config}.
"""

from pathlib import Path
from unittest import skipUnless

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from haikutx.config import Config, Limits, bundled_samples
from haikutx.tap import Options, no_proxy_from_environ, proxy_from_environ

#: The source tree (with pyproject.toml and doc/), or None when these tests
#: run from an installed copy.
SOURCE = Path(__file__).resolve().parent.parent.parent
if not (SOURCE / "pyproject.toml").exists():
    SOURCE = None  # type: ignore[assignment]
NOT_SOURCE = "needs the source tree (pyproject.toml, doc/), not an installed copy"


def parse(*argv: str) -> Config:
    options = Options()
    options.parseOptions(list(argv))
    return options.config


class OptionsTests(SynchronousTestCase):
    """
    Tests for L{Options}.
    """

    def setUp(self) -> None:
        self.state = Path(self.mktemp())

    def test_defaults(self) -> None:
        """
        With no options the runtime listens on 80 and 443 (a generated pair in
        the state directory) and the limits of the SPEC apply.
        """
        config = parse("--state", str(self.state))
        self.assertEqual(config.http, "tcp:80")
        self.assertTrue(config.https.startswith("ssl:443:privateKey="))
        self.assertTrue(config.generate_tls)
        self.assertEqual(config.cert, self.state.absolute() / "tls" / "cert.pem")
        self.assertEqual(config.limits, Limits())
        self.assertEqual(config.max_requests, 1)
        self.assertEqual(config.handlers, bundled_samples())
        self.assertTrue((config.handlers / "hello.py").exists())

    def test_none_turns_listeners_off(self) -> None:
        """
        C{none} turns a listener off.
        """
        config = parse("--port", "none", "--sslport", "none", "--jobs", "9000")
        self.assertIsNone(config.http)
        self.assertIsNone(config.https)
        self.assertFalse(config.generate_tls)

    def test_runtime_off(self) -> None:
        """
        C{--jobs}, C{--gate} or C{--gate-target} without C{--port},
        C{--sslport} or C{--serve} turn the runtime's listeners off.
        """
        for argv in (["--jobs", "9000"], ["--gate", "8000"],
                     ["--gate", "8000", "--gate-target", "8080"]):
            config = parse(*argv, "--state", str(self.state))
            self.assertEqual((config.http, config.https, config.generate_tls),
                             (None, None, False), argv)

    def test_runtime_on_when_asked(self) -> None:
        """
        A runtime listener given beside C{--jobs} keeps the runtime on, with
        the other listener at its default.
        """
        config = parse("--jobs", "9000", "--port", "8080", "--state", str(self.state))
        self.assertEqual(config.http, "tcp:8080")
        self.assertTrue(config.https.startswith("ssl:443:"))
        config = parse("--gate", "8000", "-s", "8443", "--state", str(self.state))
        self.assertEqual(config.http, "tcp:80")
        self.assertTrue(config.https.startswith("ssl:8443:"))

    def test_endpoint_string(self) -> None:
        """
        A listening option takes an endpoint string as it is.
        """
        config = parse("-p", "tcp:8080:interface=127.0.0.1", "-s", "none")
        self.assertEqual(config.http, "tcp:8080:interface=127.0.0.1")

    def test_bad_values(self) -> None:
        """
        A bad value stops parsing with one line naming the option.
        """
        cases = [
            (["-p", "70000"], "--port"),
            (["-p", "nonsense"], "--port"),
            (["-p", "bogus:1"], "--port"),
            (["-p", "8080", "-s", "8080"], "--port and --sslport"),
            (["-w", "0"], "--workers"),
            (["-t", "x"], "--maxtime"),
            (["--cert", "/nonexistent.pem", "--key", "/nonexistent.key"], "--cert"),
            (["--cert", "/etc/hostname"], "--cert and --key"),
            (["--handlers", "/nonexistent"], "--handlers"),
            (["--allow", "ftp://x/"], "--allow"),
            (["--egress-allow", "nohost"], "--egress-allow"),
            (["--user", "no-such-user-xyz"], "--user"),
            (["--port", "none", "--sslport", "none"], "nothing to serve"),
            (["--gate-target", "8080"], "nothing to serve"),
            (["--maxbody", "-1"], "--maxbody"),
            (["--maxbody", "10M"], "--maxbody"),
        ]
        for argv, option in cases:
            with self.assertRaises(UsageError, msg=argv) as caught:
                parse(*argv)
            self.assertIn(option, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_limits(self) -> None:
        """
        Limits are given in ms, bytes and MiB, and kept in seconds and bytes.
        """
        config = parse("-t", "250", "-i", "100", "-l", "0", "--maxmemory", "64", "-r", "0")
        self.assertEqual(
            config.limits,
            Limits(max_size=100, max_time=0.25, max_console=0, max_memory=64 << 20),
        )
        self.assertEqual(config.max_requests, 0)

    def test_maxprocs(self) -> None:
        """
        C{--maxprocs} bounds a stdio handler's processes (default 32); it
        must be at least 1.
        """
        self.assertEqual(parse().limits.max_procs, 32)
        self.assertEqual(parse("--maxprocs", "8").limits.max_procs, 8)
        with self.assertRaises(UsageError) as caught:
            parse("--maxprocs", "0")
        self.assertIn("--maxprocs", str(caught.exception))
    def test_maxbody(self) -> None:
        """
        C{--maxbody} is in bytes, 10 MiB by default.
        """
        self.assertEqual(parse().limits.max_body, 10485760)
        self.assertEqual(parse("--maxbody", "4096").limits.max_body, 4096)

    def test_jobs_bare_port_is_loopback(self) -> None:
        """
        A bare C{--jobs} port listens on 127.0.0.1 only.
        """
        config = parse("--jobs", "9000")
        self.assertEqual(config.jobs, "tcp:9000:interface=127.0.0.1")

    def test_repeatable(self) -> None:
        """
        C{--allow}, C{--egress-allow} and C{--gate} may be repeated.
        """
        config = parse(
            "--allow", "http://a/", "--allow", "https://b/",
            "--egress-allow", "localhost:5432", "--gate", "8000", "--gate", "none",
        )
        self.assertEqual(config.allow, ("http://a/", "https://b/"))
        self.assertEqual(config.egress_allow, ("localhost:5432",))
        self.assertEqual(config.gates, ("tcp:8000",))


class ProxyFromEnvironTests(SynchronousTestCase):
    """
    Tests for L{proxy_from_environ}.
    """

    def test_scheme_is_stripped(self) -> None:
        """
        A proxy URL with a scheme gives its host and port (haiku-http split it
        at the first colon).
        """
        self.assertEqual(
            proxy_from_environ({"HTTP_PROXY": "http://proxy.example:3128"}),
            "proxy.example:3128",
        )

    def test_https_wins(self) -> None:
        """
        C{HTTPS_PROXY} is preferred, and a missing port means 80.
        """
        self.assertEqual(
            proxy_from_environ({"HTTPS_PROXY": "a.example", "HTTP_PROXY": "b:1"}),
            "a.example:80",
        )

    def test_unset(self) -> None:
        """
        No proxy variable gives no proxy.
        """
        self.assertIsNone(proxy_from_environ({}))


class NoProxyFromEnvironTests(SynchronousTestCase):
    """
    Tests for L{no_proxy_from_environ}.
    """

    def test_entries(self) -> None:
        """
        C{NO_PROXY} (or C{no_proxy}) gives its comma-separated entries.
        """
        self.assertEqual(
            no_proxy_from_environ({"no_proxy": " localhost, .internal.test,,"}),
            ("localhost", ".internal.test"),
        )
        self.assertEqual(no_proxy_from_environ({}), ())


class VersionTests(SynchronousTestCase):
    """
    C{--version} names haikutx's version.
    """

    def test_version(self) -> None:
        """
        C{--version} prints haikutx's version, then Twisted's and Python's,
        and exits 0.
        """
        import io
        import sys

        import twisted
        from haikutx import __version__

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as caught:
            Options().parseOptions(["--version"])
        self.assertEqual(caught.exception.code, 0)
        self.assertTrue(out.getvalue().startswith(f"haikutx {__version__} (Twisted "))
        self.assertIn(twisted.__version__, out.getvalue())

    @skipUnless(SOURCE, NOT_SOURCE)
    def test_single_source(self) -> None:
        """
        C{haikutx.__version__} is the version the package is built with:
        pyproject.toml reads it from C{haikutx/__init__.py}.
        """
        import re
        import tomllib

        import haikutx

        project = tomllib.loads((SOURCE / "pyproject.toml").read_text())
        self.assertIn("version", project["project"]["dynamic"])
        self.assertEqual(
            project["tool"]["setuptools"]["dynamic"]["version"], {"attr": "haikutx.__version__"}
        )
        self.assertRegex(haikutx.__version__, re.compile(r"^\d+\.\d+\.\d+"))


@skipUnless(SOURCE, NOT_SOURCE)
class DocumentationTests(SynchronousTestCase):
    """
    The user documentation covers the command line and stands alone.
    """

    root = SOURCE

    def test_every_option_documented(self) -> None:
        """
        Every option C{--help} lists, and its short form, is in
        doc/options.md.
        """
        import re

        reference = (self.root / "doc" / "options.md").read_text()
        listed = re.findall(r"^\s+(?:(-\w), )?--([a-z][a-z-]*)", str(Options()), re.M)
        self.assertGreater(len(listed), 30)
        for short, name in listed:
            self.assertIn(f"`--{name}`", reference, name)
            if short:
                row = next(
                    line for line in reference.splitlines()
                    if line.startswith(f"| `--{name}` |")
                )
                self.assertIn(f"| `{short}` |", row, name)

    def test_no_spec_citations(self) -> None:
        """
        README.md and doc/ cite no "SPEC", a file users do not have.
        """
        pages = [self.root / "README.md", *sorted((self.root / "doc").glob("*.md"))]
        self.assertGreater(len(pages), 5)
        for page in pages:
            self.assertNotIn("SPEC", page.read_text(), page.name)
            self.assertNotIn("§", page.read_text(), page.name)
