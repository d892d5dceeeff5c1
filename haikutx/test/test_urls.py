"""
Tests for L{haikutx.net.urls}: credentials in a handler URL never appear in
an answer or a log line, and the runtime's answers about handler URLs.
"""

from __future__ import annotations

import string
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data
from twisted.web.util import Redirect

from haikutx.config import Config
from haikutx.net.urls import redact_url
from haikutx.runtime import handler_urls
from haikutx.runtime.site import RuntimeSite
from haikutx.service import build_runtime
from haikutx.test.support import http, write_handlers

SECRET = "s3cret-Pa55"

#: Password characters a URL may carry in its userinfo.
_PASSWORD = string.ascii_letters + string.digits + "-._~!$&'()*+,;=%:"


class RedactURLTests(SynchronousTestCase):
    """
    Tests for L{redact_url}.
    """

    def test_examples(self) -> None:
        """
        A password, or a user name given alone (often a token), is replaced
        by C{***}; anything else is unchanged.
        """
        cases = {
            "http://user:pw@example.test/x.py?q=1": "http://user:***@example.test/x.py?q=1",
            "https://token@example.test:8443/": "https://***@example.test:8443/",
            "http://a:b@c@example.test/": "http://a:***@example.test/",
            "HTTP://u:pw@example.test": "HTTP://u:***@example.test",
            "http://u:pw@example.test:99999/": "http://u:***@example.test:99999/",
            "http://example.test/users/@me": "http://example.test/users/@me",
            "hello.py": "hello.py",
            "": "",
        }
        for url, shown in cases.items():
            self.assertEqual(redact_url(url), shown, url)

    @given(st.text(_PASSWORD, min_size=1, max_size=30))
    def test_password_never_shown(self, password: str) -> None:
        """
        Whatever the password, the shown URL is the URL with C{***} for it.
        """
        self.assertEqual(
            redact_url(f"https://alice:{password}@example.test/h.py"),
            "https://alice:***@example.test/h.py",
        )

    def test_fetch_messages(self) -> None:
        """
        The fetcher's 403 and 502 messages show the URL redacted (a URL
        with credentials is refused with 400 before either can happen).
        """
        url = f"http://alice:{SECRET}@example.test/h.py"
        for error in (handler_urls.refused(url, "no"), handler_urls.unable(url, "timed out")):
            self.assertNotIn(SECRET, error.message)
            self.assertIn("http://alice:***@example.test/h.py", error.message)


def start_runtime(case: TestCase, allow: tuple[str, ...] = ()) -> tuple[int, object]:
    """
    A runtime served as C{twistd haiku} serves it (a L{RuntimeSite}, whose
    access log leaves handler requests to the runtime's own event).
    """
    config = Config(
        workers=1, allow=allow, handlers=write_handlers(Path(case.mktemp()), {})
    )
    pool, root, fetcher = build_runtime(reactor, config)
    pool.startService()
    case.addCleanup(fetcher.close)
    site = RuntimeSite(root, reactor=reactor)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    case.addCleanup(pool.stopService)
    case.addCleanup(port.stopListening)
    return port.getHost().port, pool


class RuntimeURLAnswersTests(TestCase):
    """
    The runtime's answers and log events for handler URLs.
    """

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        origin = Resource()
        origin.putChild(b"hello.py", Data(b"res.end('hi')\n", "text/plain"))
        listening = reactor.listenTCP(0, Site(origin), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.origin_port = listening.getHost().port
        self.origin = f"http://127.0.0.1:{self.origin_port}/"
        origin.putChild(
            b"moved.py",
            Redirect(f"http://bob:{SECRET}@127.0.0.1:{self.origin_port}/hello.py".encode()),
        )

    def logged(self) -> str:
        return "\n".join(
            formatEvent(e) + repr(sorted(map(str, e.values()))) for e in self.events
        )

    async def test_credentials_never_echoed(self) -> None:
        """
        A handler URL with C{user:password@} gets 400, and neither the
        answer nor any log event holds the password: neither when the
        request names it nor when a redirect does.
        """
        port, _ = start_runtime(self, allow=(self.origin,))
        named = f"http://alice:{SECRET}@127.0.0.1:{self.origin_port}/hello.py"
        response = await http(port, f"/?x-haiku-handler={named}")
        self.assertEqual(
            (response.status, response.text),
            (400, f"The handler URL http://alice:***@127.0.0.1:{self.origin_port}"
                  "/hello.py is not a valid URL.\n"),
        )
        response = await http(port, "/", headers={"x-haiku-handler": self.origin + "moved.py"})
        self.assertEqual(response.status, 400)
        self.assertIn("http://bob:***@127.0.0.1", response.text)
        self.assertNotIn(SECRET, response.text)
        self.assertNotIn(SECRET, self.logged())
        self.assertIn("http://alice:***@", self.logged())

    async def test_loopback_names_allow(self) -> None:
        """
        A loopback handler URL is refused with 403 naming the C{--allow}
        prefix that would allow it.
        """
        port, _ = start_runtime(self)
        response = await http(port, f"/?x-haiku-handler={self.origin}hello.py")
        self.assertEqual(response.status, 403)
        self.assertEqual(
            response.text,
            f"The handler URL {self.origin}hello.py is not allowed: 127.0.0.1 resolves "
            "to a loopback address (127.0.0.1); the server allows it when started "
            f"with --allow http://127.0.0.1:{self.origin_port}/\n",
        )

    async def test_no_handler_logged(self) -> None:
        """
        A request that names no handler is logged with C{-} for it, never
        C{None}.
        """
        port, _ = start_runtime(self)
        response = await http(port, "/")
        self.assertEqual(response.status, 400)
        await http(port, "/favicon.ico")
        requests = [e for e in self.events if "method" in e and "handler_url" in e]
        self.assertEqual([e["handler_url"] for e in requests], ["-", "-"])
        texts = [formatEvent(e) for e in requests]
        self.assertTrue(texts[0].startswith("127.0.0.1 GET - -> 400: "), texts)
        self.assertTrue(texts[1].startswith("127.0.0.1 GET - -> 404 in "), texts)
