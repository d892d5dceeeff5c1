"""
End-to-end tests: C{twistd -n haiku} as a user runs it, over HTTP and HTTPS.
"""

from __future__ import annotations

import json
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
    """
    Keeps a child's output (together in C{output}, and by file descriptor in
    C{streams}) and its exit code.
    """

    def __init__(self) -> None:
        self.output = b""
        self.streams: dict[int, bytes] = {1: b"", 2: b""}
        self.exit_code: int | None = None
        self.pid = 0
        self.ended: Deferred[None] = Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data
        self.streams[fd] = self.streams.get(fd, b"") + data

    def processEnded(self, reason) -> None:
        self.exit_code = reason.value.exitCode
        self.ended.callback(None)


def twistd_argv(*argv: str, twistd: tuple[str, ...] = ("--pidfile=",)) -> list[str]:
    """
    The command line of C{twistd -n TWISTD haiku ARGV} run from this source
    tree.
    """
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", *twistd, "haiku", *argv]


async def start_twistd(
    case: TestCase,
    *argv: str,
    command: list[str] | None = None,
    cwd: str | None = None,
) -> _Collector:
    """
    Run C{twistd -n haiku ARGV} (or C{command}, from C{cwd}); it is stopped
    with SIGTERM when the test ends.
    """
    collector = _Collector()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if command is None:
        command = twistd_argv(*argv)
    process = reactor.spawnProcess(
        collector, command[0], command, env=env, path=cwd
    )
    collector.pid = process.pid

    async def stop() -> None:
        if not collector.ended.called:
            process.signalProcess("TERM")
            timer = reactor.callLater(
                10, lambda: collector.ended.called or process.signalProcess("KILL")
            )
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


def _children(pid: int) -> list[int]:
    """
    The pids of the child processes of C{pid}, from C{/proc}.
    """
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children.extend(int(c) for c in (task / "children").read_text().split())
    return children


def _log_lines(output: bytes) -> list[bytes]:
    return [line for line in output.splitlines() if line.strip()]


class ServicesChosenTests(TestCase):
    """
    The runtime starts unless the job runner or the gate is asked for
    without a runtime listener.
    """

    def compose(self, *argv: str):
        from haikutx.service import build_service
        from haikutx.tap import Options

        options = Options()
        options.parseOptions([*argv, "--state", self.mktemp()])
        return build_service(reactor, options.config)

    def test_jobs_alone(self) -> None:
        """
        C{--jobs} alone composes the job runner and no runtime: no pool, no
        runtime listeners.
        """
        top = self.compose("--jobs", "9000")
        self.assertEqual(top.getServiceNamed("jobs").name, "jobs")
        self.assertRaises(KeyError, top.getServiceNamed, "pool")
        self.assertRaises(KeyError, top.getServiceNamed, "runtime")

    def test_gate_alone(self) -> None:
        """
        C{--gate} alone composes the gate and no runtime.
        """
        top = self.compose("--gate", "8000")
        self.assertEqual(top.getServiceNamed("gate").name, "gate")
        self.assertRaises(KeyError, top.getServiceNamed, "pool")
        self.assertRaises(KeyError, top.getServiceNamed, "runtime")

    def test_runtime_when_asked(self) -> None:
        """
        With C{--port}, C{--sslport} or C{--serve} beside C{--jobs}, the
        runtime runs too, on the listeners given.
        """
        top = self.compose("--jobs", "9000", "--port", "8080")
        top.getServiceNamed("pool")
        runtime = top.getServiceNamed("runtime")
        self.assertEqual({s.name for s in runtime}, {"http", "https"})
        top = self.compose("--gate", "8000", "--sslport", "8443", "--port", "none")
        self.assertEqual({s.name for s in top.getServiceNamed("runtime")}, {"https"})
        handler = Path(self.mktemp())
        handler.write_text("res.end('x')\n")
        top = self.compose("--jobs", "9000", "--serve", str(handler))
        self.assertEqual({s.name for s in top.getServiceNamed("runtime")}, {"http"})

    def test_runtime_by_default(self) -> None:
        """
        With nothing else asked for, the runtime runs on 80 and 443.
        """
        top = self.compose()
        top.getServiceNamed("pool")
        self.assertEqual({s.name for s in top.getServiceNamed("runtime")}, {"http", "https"})
        self.assertRaises(KeyError, top.getServiceNamed, "jobs")
        self.assertRaises(KeyError, top.getServiceNamed, "gate")

    async def test_job_runner_spawns_no_worker(self) -> None:
        """
        C{twistd -n haiku --jobs PORT} is a job runner alone: it answers on
        its port and has no child process but its job launcher (no sandbox
        worker), and its log names no worker.
        """
        port = free_port()
        collector = await start_twistd(
            self, "--jobs", str(port), "--whitelist", "echo", "--token", "S",
            "--state", str(Path(self.mktemp()).absolute()),
        )
        await wait_for_port(port, collector)
        response = await http(port, "/" + "0" * 40, headers={"Authorization": "Bearer S"})
        self.assertEqual(json.loads(response.body)["message"], "Not Found")
        # A pool spawns its workers when it starts, before the listeners
        # accept; give a stray one time to show anyway.
        await deferLater(reactor, 0.5, lambda: None)
        commands = [
            Path(f"/proc/{child}/cmdline").read_bytes() for child in _children(collector.pid)
        ]
        self.assertEqual(
            [c for c in commands if b"haikutx/jobs/launcher.py" not in c], [], commands
        )
        self.assertNotIn(b"worker", collector.output.lower())


class ListenFailureTests(TestCase):
    """
    A listener that cannot listen stops start-up with one line naming its
    option and the cause, and exit status 1: never a traceback.
    """

    timeout = 120

    def hold_port(self) -> int:
        """
        Listen on a port of 127.0.0.1 for the length of the test.
        """
        from twisted.internet.protocol import Factory, Protocol

        listening = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        return listening.getHost().port

    async def assert_one_line(self, option: str, *argv: str) -> None:
        taken = self.hold_port()
        directory = Path(self.mktemp()).absolute()
        directory.mkdir()
        argv = tuple(a.replace("TAKEN", str(taken)) for a in argv)
        collector = await start_twistd(
            self,
            command=twistd_argv(*argv, "--state", str(directory / "state"), twistd=()),
            cwd=str(directory),
        )
        await collector.ended
        self.assertEqual(
            collector.streams[2].decode(),
            f"{option}: cannot listen on 127.0.0.1:{taken}: Address already in use\n",
        )
        self.assertNotIn(b"Traceback", collector.output)
        self.assertNotIn(b"CannotListenError", collector.output)
        self.assertEqual(collector.exit_code, 1)
        # twistd's default pidfile is removed again.
        self.assertFalse((directory / "twistd.pid").exists())

    async def test_port(self) -> None:
        """
        C{--port} on a port in use.
        """
        await self.assert_one_line(
            "--port", "--port", "tcp:TAKEN:interface=127.0.0.1", "--sslport", "none",
            "--workers", "1",
        )

    async def test_sslport(self) -> None:
        """
        C{--sslport} on a port in use.
        """
        await self.assert_one_line(
            "--sslport", "--port", "none", "--sslport", "ssl:TAKEN:interface=127.0.0.1",
            "--workers", "1",
        )

    async def test_jobs(self) -> None:
        """
        C{--jobs} on a port in use.
        """
        await self.assert_one_line("--jobs", "--jobs", "TAKEN", "--whitelist", "echo")

    async def test_gate(self) -> None:
        """
        C{--gate} on a port in use.
        """
        await self.assert_one_line("--gate", "--gate", "tcp:TAKEN:interface=127.0.0.1")

    def test_message(self) -> None:
        """
        L{ListenFailed} describes a listener's failure in one line, from a
        L{CannotListenError} or an L{OSError}.
        """
        import errno

        from twisted.internet.error import CannotListenError

        from haikutx.service import ListenFailed

        error = CannotListenError("", 80, OSError(errno.EACCES, "Permission denied"))
        self.assertEqual(
            str(ListenFailed.from_error("--port", error)),
            "--port: cannot listen on port 80: Permission denied",
        )
        error2 = OSError(errno.EACCES, "Permission denied")
        self.assertEqual(
            str(ListenFailed.from_error("--jobs", error2)),
            "--jobs: cannot listen on its address: Permission denied",
        )


class SelfSignedCertificateTests(TestCase):
    """
    The generated certificate names every way this machine is reached.
    """

    def test_names(self) -> None:
        """
        It names the host, C{localhost}, C{127.0.0.1} and C{::1}.
        """
        import ipaddress

        from cryptography import x509

        from haikutx.tls import ensure_self_signed

        directory = Path(self.mktemp())
        ensure_self_signed(directory / "cert.pem", directory / "key.pem", hostname="box")
        cert = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["box", "localhost"])
        self.assertEqual(
            names.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )

    async def test_verified_by_address(self) -> None:
        """
        A client connecting to C{127.0.0.1} verifies the certificate (the
        address is a name it holds), over real TLS.
        """
        from twisted.internet.ssl import PrivateCertificate
        from twisted.web.resource import Resource
        from twisted.web.server import Site
        from twisted.web.static import Data

        from haikutx.tls import ensure_self_signed

        directory = Path(self.mktemp())
        cert_path, key_path = directory / "cert.pem", directory / "key.pem"
        ensure_self_signed(cert_path, key_path)
        pair = PrivateCertificate.loadPEM(cert_path.read_bytes() + key_path.read_bytes())
        root = Resource()
        root.putChild(b"x", Data(b"over tls", "text/plain"))
        listening = reactor.listenSSL(0, Site(root), pair.options(), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        endpoint = wrapClientTLS(
            optionsForClientTLS("127.0.0.1", trustRoot=Certificate.loadPEM(cert_path.read_bytes())),
            TCP4ClientEndpoint(reactor, "127.0.0.1", listening.getHost().port),
        )
        response = await http(endpoint, "/x")
        self.assertEqual((response.status, response.body), (200, b"over tls"))


class StopTests(TestCase):
    """
    When the runtime stops, a request still waiting for a turn is answered
    503 at once, before the pool stops.
    """

    async def test_waiting_request_answered_when_stopping(self) -> None:
        """
        With the only worker busy, a second request waits for a turn;
        stopping the runtime's services (last to first, as twistd does)
        answers it 503 with the reason, well before its time limit.
        """
        from haikutx.service import WaitingRequestsService, _runtime_services
        from haikutx.test.support import ready, until, write_handlers

        handlers = write_handlers(
            Path(self.mktemp()),
            {
                "slow.py": "import time\ntime.sleep(3)\nres.end('late')\n",
                "hello.py": "res.end('hi')\n",
            },
        )
        port = free_port()
        from haikutx.tap import Options

        options = Options()
        options.parseOptions([
            "--port", f"tcp:{port}:interface=127.0.0.1", "--sslport", "none",
            "--state", self.mktemp(), "--handlers", str(handlers), "-w", "1",
            "--maxtime", "20000",
        ])
        services = _runtime_services(reactor, options.config)
        self.assertEqual(
            sum(isinstance(service, WaitingRequestsService) for service in services), 1
        )
        site = services[-1].getServiceNamed("http").factory
        scheduler = site.resource.handlers.scheduler
        for service in services:
            service.startService()
        stopped = False

        async def stop() -> None:
            nonlocal stopped
            if not stopped:
                stopped = True
                for service in reversed(services):
                    result = service.stopService()
                    if result is not None:
                        await result

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        pool = services[0]
        await ready(pool)
        slow = Deferred.fromCoroutine(http(port, "/?x-haiku-handler=slow.py"))
        await until(lambda: pool.status()["workers"].get("busy") == 1, 10)
        waiting = Deferred.fromCoroutine(http(port, "/?x-haiku-handler=hello.py"))
        await until(lambda: scheduler.waiting == 1, 10)
        stopping = Deferred.fromCoroutine(stop())
        await until(lambda: waiting.called, 5, lambda: "the waiting request got no answer")
        response = await waiting
        self.assertEqual(response.status, 503)
        self.assertIn(b"the runtime is stopping", response.body)
        await stopping
        await slow
