"""
End-to-end tests: C{twistd -n haiku} as a user runs it, over HTTP and HTTPS.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from haikutx.test.support import free_port, http
from haikutx.tls import fingerprint

ROOT = Path(__file__).resolve().parent.parent.parent


class _Collector(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


async def start_twistd(case: TestCase, *argv: str) -> _Collector:
    """
    Run C{twistd -n haiku ARGV} and wait until the first listener in
    C{argv} accepts; it is stopped with SIGTERM when the test ends.
    """
    collector = _Collector()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = reactor.spawnProcess(
        collector,
        sys.executable,
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "haiku", *argv],
        env=env,
    )

    async def stop() -> None:
        if not collector.ended.called:
            process.signalProcess("TERM")
            timer = reactor.callLater(10, lambda: collector.ended.called or process.signalProcess("KILL"))
            await collector.ended
            if timer.active():
                timer.cancel()

    case.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    return collector


async def wait_for_port(port: int, collector: _Collector) -> None:
    from twisted.internet.protocol import Factory, Protocol

    for _ in range(200):
        if collector.ended.called:
            raise AssertionError(collector.output.decode())
        try:
            connection = await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
                Factory.forProtocol(Protocol)
            )
        except ConnectError:
            await deferLater(reactor, 0.05, lambda: None)
            continue
        connection.transport.loseConnection()
        return
    raise AssertionError("port never opened: " + collector.output.decode())


class TwistdTests(TestCase):
    """
    The C{haiku} plugin, end to end.
    """

    async def test_http_and_generated_https(self) -> None:
        """
        C{twistd -n haiku} serves the bundled samples over HTTP and over
        HTTPS with a self-signed pair generated into the state directory,
        whose fingerprint it logs.
        """
        state = Path(self.mktemp()).absolute()
        http_port, https_port = free_port(), free_port()
        collector = await start_twistd(
            self,
            "--port", f"tcp:{http_port}:interface=127.0.0.1",
            "--sslport", f"ssl:{https_port}:interface=127.0.0.1",
            "--state", str(state),
            "--workers", "2",
        )
        await wait_for_port(http_port, collector)
        await wait_for_port(https_port, collector)
        response = await http(http_port, "/?x-haiku-handler=hello.py")
        self.assertEqual((response.status, response.text), (200, "Hello, world!\n"))

        cert_pem = (state / "tls" / "cert.pem").read_bytes()
        self.assertEqual(os.stat(state / "tls" / "key.pem").st_mode & 0o777, 0o600)
        trust = Certificate.loadPEM(cert_pem)
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=trust),
            TCP4ClientEndpoint(reactor, "127.0.0.1", https_port),
        )
        response = await http(endpoint, "/?x-haiku-handler=hello.py")
        self.assertEqual((response.status, response.text), (200, "Hello, world!\n"))
        self.assertIn(fingerprint(cert_pem).encode(), collector.output)

    async def test_maxbody(self) -> None:
        """
        C{--maxbody} reaches the listeners: a body over it gets 413 over
        HTTP and over HTTPS (whose transport cannot half-close), and the
        refusal is logged with the handler; a body within it is served.
        """
        state = Path(self.mktemp()).absolute()
        http_port, https_port = free_port(), free_port()
        collector = await start_twistd(
            self,
            "--port", f"tcp:{http_port}:interface=127.0.0.1",
            "--sslport", f"ssl:{https_port}:interface=127.0.0.1",
            "--state", str(state),
            "--workers", "1",
            "--maxbody", "1000",
        )
        await wait_for_port(http_port, collector)
        await wait_for_port(https_port, collector)
        expected = "The request body is larger than the limit of 1000 bytes.\n"
        response = await http(http_port, "/?x-haiku-handler=hello.py", "POST", body=b"x" * 1001)
        self.assertEqual((response.status, response.text), (413, expected))
        trust = Certificate.loadPEM((state / "tls" / "cert.pem").read_bytes())
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=trust),
            TCP4ClientEndpoint(reactor, "127.0.0.1", https_port),
        )
        response = await http(endpoint, "/?x-haiku-handler=hello.py", "POST", body=b"x" * 5000)
        self.assertEqual((response.status, response.text), (413, expected))
        response = await http(http_port, "/?x-haiku-handler=hello.py", "POST", body=b"x" * 1000)
        self.assertEqual((response.status, response.text), (200, "Hello, world!\n"))
        self.assertIn(b"POST hello.py -> 413", collector.output)

    async def test_bad_option_stops_startup(self) -> None:
        """
        A bad value stops start-up with a line naming the option, and
        nothing listens.
        """
        collector = await start_twistd(self, "--port", "99999", "--sslport", "none")
        await collector.ended
        self.assertIn(b"--port: 99999 is out of range", collector.output)
