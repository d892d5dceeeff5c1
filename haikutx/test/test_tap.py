"""
Tests for L{haikutx.tap}: every option is validated and frozen into a
L{haikutx.config.Config}.
"""

from pathlib import Path

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from haikutx.config import Config, Limits, bundled_samples
from haikutx.tap import Options, no_proxy_from_environ, proxy_from_environ


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
        config = parse("--port", "none", "--sslport", "none")
        self.assertIsNone(config.http)
        self.assertIsNone(config.https)
        self.assertFalse(config.generate_tls)

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
