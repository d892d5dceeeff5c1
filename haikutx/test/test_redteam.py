"""
Red-team trials (SPEC 3.2): hostile handlers, Python and stdio, written by
an attacker who knows haikutx's code, against the parts the other hostile
tests leave alone: how the server frames what a handler sends, what it
buffers for it, and what it logs for it.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import h11
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from haikutx.test.support import http, ready, start_runtime, until
from haikutx.test.test_isolation import FIND_WORKERS

#: The attacks below start by finding the runtime's worker object, as an
#: attacker who knows the code would (see L{FIND_WORKERS}).
FIND_WORKER = FIND_WORKERS + "worker = workers[0]\nfrom haikutx.child import wire\n"

#: Lies about its length: says its body is empty, then writes a whole
#: forged response, which a keep-alive client (or a front proxy reusing its
#: connection for another tenant) takes for the answer to its next request.
SMUGGLE_PY = r"""
forged = 'HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Forged: yes\r\n\r\npwned!'
res.write_head(200, {'Content-Length': '0'})
res.end(forged)
"""

#: The same lie from a shell script, in its CGI header block.
SMUGGLE_SH = """#!/bin/bash
printf 'Content-Type: text/plain\\r\\nContent-Length: 0\\r\\n\\r\\n'
printf 'HTTP/1.1 200 OK\\r\\nContent-Length: 6\\r\\nX-Forged: yes\\r\\n\\r\\npwned!'
"""

#: Sends its own frames: a head that names trailers, then trailers whose
#: names end the response and start a forged one; and a head whose
#: C{Content-Length} hides behind white space.
SMUGGLE_FRAMES = FIND_WORKER + r"""
forged = 'HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Forged: yes\r\n\r\npwned!'
if req.query.get('via') == 'trailer':
    worker.send(wire.encode_json(wire.HEAD, {'status': 200, 'headers': [['Trailer', 'x']]}))
    worker.send(wire.encode(wire.DATA, b'ok'))
    worker.send(wire.encode_json(wire.FINISH, {'trailers': [['x\r\n\r\n' + forged, 'v']]}))
elif req.query.get('via') == 'fail':
    worker.send(wire.encode_json(wire.FAIL, {'status': int(req.query['status']),
                                             'message': forged}))
elif req.query.get('via') == 'odd-types':
    worker.send(wire.encode_json(wire.HEAD, {'status': 200, 'headers': [['Trailer', 'x'],
                                                                        [1, None]]}))
    worker.send(wire.encode(wire.DATA, b'ok'))
    worker.send(wire.encode_json(wire.FINISH, {'trailers': [[1, 2], ['x', None]]}))
elif req.query.get('via') == 'odd-failure':
    worker.send(wire.encode_json(wire.FAIL, {'status': 500, 'message': ['not', 'text']}))
elif req.query.get('via') == 'empty-chunk':
    worker.send(wire.encode_json(wire.HEAD, {'status': 200, 'headers': [['Trailer', 'x']]}))
    worker.send(wire.encode(wire.DATA, b''))
    worker.send(wire.encode(wire.DATA, forged.encode()))
    worker.send(wire.encode_json(wire.FINISH, {'trailers': []}))
else:
    name = req.query['name'].replace('_', ' ').replace('~', '\t')
    status = int(req.query.get('status', '200'))
    worker.send(wire.encode_json(wire.HEAD, {'status': status, 'headers': [[name, '0']]}))
    worker.send(wire.encode(wire.DATA, forged.encode()))
    worker.send(wire.encode_json(wire.FINISH, {'trailers': []}))
res.done = True
"""

#: One head frame just under the frame limit, made of tiny headers (or
#: trailers): what the server builds of it is many times its size.
HEADER_BOMB = FIND_WORKER + r"""
n = (wire.MAX_FRAME - 64) // 10
pairs = [['a', ''] for _ in range(n)]
if req.query.get('via') == 'trailer':
    worker.send(wire.encode_json(wire.HEAD, {'status': 200, 'headers': [['Trailer', 'a']]}))
    worker.send(wire.encode_json(wire.FINISH, {'trailers': pairs}))
elif req.query.get('via') == 'fail':
    worker.send(wire.encode_json(wire.FAIL, {'status': 500, 'message': 'm' * (15 << 20)}))
elif req.query.get('via') == 'heads':
    head = wire.encode_json(wire.HEAD, {'status': 200,
                                        'headers': [['a', 'b' * 200]] * 1000})
    for _ in range(int(req.query.get('n', '1000'))):
        worker.send(head)
    worker.send(wire.encode_json(wire.FINISH, {'trailers': []}))
else:
    worker.send(wire.encode_json(wire.HEAD, {'status': int(req.query.get('status', 200)),
                                             'headers': pairs}))
    worker.send(wire.encode_json(wire.FINISH, {'trailers': []}))
res.done = True
"""

#: Another tenant.
VICTIM = r"""
res.end('victim')
"""

#: Writes far more than any client reads, as fast as its channel takes it.
FIREHOSE = r"""
chunk = b'x' * (1 << 20)
res.write_head(200, {'Content-Type': 'application/octet-stream'})
for _ in range(int(req.query.get('mib', '256'))):
    res.write(chunk)
res.end()
"""

#: Floods the server's log with console frames it forges on its own
#: channel, the console limit and --debug notwithstanding.
CONSOLE_FLOOD = FIND_WORKER + r"""
line = wire.encode(wire.CONSOLE, b'flood ' + b'y' * 65536)
for _ in range(int(req.query.get('n', '200'))):
    worker.send(line)
res.end('flooded')
"""


class _Pipelined(Protocol):
    """
    Sends its requests at once on one connection and keeps what comes back.
    """

    def __init__(self, requests: bytes, done: Deferred[bytes]) -> None:
        self._requests = requests
        self._done = done
        self._received = b""

    def connectionMade(self) -> None:
        self.transport.write(self._requests)

    def dataReceived(self, data: bytes) -> None:
        self._received += data

    def connectionLost(self, reason: object) -> None:
        self._done.callback(self._received)


async def pipelined(port: int, *targets: str) -> bytes:
    """
    GET each target in turn on one keep-alive connection (the last one
    closes it); all that came back.
    """
    raw = b""
    for n, target in enumerate(targets):
        close = b"Connection: close\r\n" if n == len(targets) - 1 else b""
        raw += b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n" % (target.encode(), close)
    done: Deferred[bytes] = Deferred()
    reactor.connectTCP(
        "127.0.0.1", port, ClientFactory.forProtocol(lambda: _Pipelined(raw, done))
    )
    timeout = reactor.callLater(20, lambda: done.called or done.errback(TimeoutError()))
    try:
        return await done
    finally:
        if timeout.active():
            timeout.cancel()


def responses(raw: bytes, count: int) -> list[bytes]:
    """
    The bodies of the first C{count} responses in C{raw}, read as a client
    that sent C{count} GETs on one connection reads them (h11).
    """
    connection = h11.Connection(h11.CLIENT)
    connection.receive_data(raw)
    connection.receive_data(b"")
    bodies: list[bytes] = []
    for _ in range(count):
        connection.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        connection.send(h11.EndOfMessage())
        body = b""
        for _ in range(10000):
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError:
                return bodies
            if isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                bodies.append(body)
                break
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return bodies
        if connection.our_state is h11.MUST_CLOSE or connection.their_state is h11.MUST_CLOSE:
            return bodies
        connection.start_next_cycle()
    return bodies


def _rss() -> int:
    """
    This process's resident memory, in bytes.
    """
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class FramingTests(TestCase):
    """
    What a handler says about its own response cannot reach past it.
    """

    def setUp(self) -> Deferred[None]:
        self.port, self.pool = start_runtime(
            self,
            {
                "smuggle.py": SMUGGLE_PY,
                "smuggle.sh": SMUGGLE_SH,
                "frames.py": SMUGGLE_FRAMES,
                "victim.py": VICTIM,
            },
            workers=1,
            max_requests=1,
        )
        return Deferred.fromCoroutine(ready(self.pool))

    async def _smuggle(self, name: str) -> None:
        raw = await pipelined(
            self.port, f"/?x-haiku-handler={name}", "/?x-haiku-handler=victim.py"
        )
        bodies = responses(raw, 2)
        self.assertEqual(len(bodies), 2, raw)
        self.assertEqual(bodies[1], b"victim", raw)

    async def test_content_length_python(self) -> None:
        """
        A Python handler's C{Content-Length} cannot be a lie that splits
        the connection: the next response on it is the runtime's.
        """
        await self._smuggle("smuggle.py")

    async def test_content_length_stdio(self) -> None:
        """
        Nor can a stdio handler's CGI C{Content-Length}.
        """
        if shutil.which("bash") is None:
            raise SkipTest("bash is not installed")
        await self._smuggle("smuggle.sh")

    async def test_trailer_names(self) -> None:
        """
        A trailer's name cannot end the response and start another.
        """
        await self._smuggle("frames.py&via=trailer")

    async def test_empty_data_frame(self) -> None:
        """
        An empty data frame, in a response with trailers (whose chunks the
        runtime writes itself), does not end the response early.
        """
        await self._smuggle("frames.py&via=empty-chunk")

    async def test_interim_status(self) -> None:
        """
        A handler's status cannot be an interim one (C{1xx}), after which a
        client reads the handler's bytes as the response, or as another
        protocol altogether (C{101}).
        """
        for status in (100, 101, 103):
            await self._smuggle(f"frames.py&name=X-A&status={status}")
            await self._smuggle(f"frames.py&via=fail&status={status}")

    async def test_names_not_strings(self) -> None:
        """
        Header and trailer names and values that are not strings get the
        child killed, at once: the request neither hangs nor keeps its
        slot.
        """
        started = reactor.seconds()
        raw = await pipelined(self.port, "/?x-haiku-handler=frames.py&via=odd-types")
        self.assertLess(reactor.seconds() - started, 3.0, raw)
        victim = await http(self.port, "/?x-haiku-handler=victim.py")
        self.assertEqual(victim.text, "victim")
        response = await http(self.port, "/?x-haiku-handler=frames.py&via=odd-failure")
        self.assertEqual(response.status, 500)
        self.assertIn("malformed frame", response.text)

    async def test_content_length_spelled_otherwise(self) -> None:
        """
        Nor can a C{Content-Length} with white space before its colon.
        """
        for name in ("Content-Length_", "Content-Length~", "_Content-Length"):
            await self._smuggle(f"frames.py&name={name}")


class SlowClientTests(TestCase):

    """
    A client that does not read makes the handler wait, not the server
    buffer.
    """

    def setUp(self) -> Deferred[None]:
        self.port, self.pool = start_runtime(
            self,
            {"firehose.py": FIREHOSE, "victim.py": VICTIM},
            workers=1,
            max_requests=1,
            keepalive_interval=0.3,
            keepalive_timeout=0.5,
        )
        return Deferred.fromCoroutine(ready(self.pool))

    async def test_unread_response(self) -> None:
        """
        256 MiB written to a client that reads nothing for three seconds
        (longer than the heartbeat) does not grow the server by more than
        64 MiB; the handler waits (and is not taken for a hung one), and
        the slot serves the next request once the client has gone.
        """
        before = _rss()
        done: Deferred[int] = Deferred()
        client = _Counting(done)
        reactor.connectTCP("127.0.0.1", self.port, ClientFactory.forProtocol(lambda: client))
        grown = 0
        for _ in range(30):
            await deferLater(reactor, 0.1, lambda: None)
            grown = max(grown, _rss() - before)
        self.assertLess(grown, 64 << 20, f"the server grew by {grown >> 20} MiB")
        self.assertEqual(self.pool.status()["workers"], {"busy": 1})
        client.transport.abortConnection()
        await done
        victim = await http(self.port, "/?x-haiku-handler=victim.py")
        self.assertEqual(victim.text, "victim")


    async def test_slow_client_medium_response(self) -> None:
        """
        A response of 12 MiB (more than the sockets hold) to a client that
        reads nothing for longer than the time limit is taken whole by a
        server that may hold 16 MiB for it: its handler is done in time, and
        the client gets all of it.
        """
        from haikutx.config import Limits
        from haikutx.runtime import exchange

        self.patch(exchange, "RESPONSE_BUFFER", 16 << 20)

        port, pool = start_runtime(
            self, {"firehose.py": FIREHOSE}, workers=1, max_requests=1,
            limits=Limits(max_time=1.0),
        )
        await ready(pool)
        done: Deferred[int] = Deferred()
        client = _Counting(done, "&mib=12", window=65536)
        reactor.connectTCP("127.0.0.1", port, ClientFactory.forProtocol(lambda: client))
        await deferLater(reactor, 2.0, lambda: None)
        client.transport.resumeProducing()
        timeout = reactor.callLater(30, client.transport.abortConnection)
        self.addCleanup(lambda: timeout.active() and timeout.cancel())
        received = await done
        self.assertTrue(client.tail.endswith(b"\r\n0\r\n\r\n"), (received, client.tail))
        self.assertGreater(received, 12 << 20)


class _Counting(Protocol):
    """
    Asks for a firehose, reads nothing until resumed, then counts.
    """

    def __init__(self, done: Deferred[int], query: str = "", window: int = 0) -> None:
        self._done = done
        self._window = window
        self._query = query.encode()
        self.received = 0
        self.tail = b""

    def connectionMade(self) -> None:
        import socket

        if self._window:
            # Less for the kernel to hold for a client that does not read.
            handle = self.transport.getHandle()
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._window)
        self.transport.pauseProducing()
        self.transport.write(
            b"GET /?x-haiku-handler=firehose.py%s HTTP/1.1\r\nHost: x\r\n"
            b"Connection: close\r\n\r\n" % self._query
        )

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.tail = (self.tail + data)[-16:]

    def connectionLost(self, reason: object) -> None:
        self._done.callback(self.received)


class HeaderBombTests(TestCase):
    """
    What a handler sends as its response head is bounded in the server.
    """

    def setUp(self) -> Deferred[None]:
        self.port, self.pool = start_runtime(
            self, {"bomb.py": HEADER_BOMB, "victim.py": VICTIM}, workers=1, max_requests=1
        )
        return Deferred.fromCoroutine(ready(self.pool))

    async def _bomb(self, query: str) -> Any:
        gaps = []
        last = [reactor.seconds()]

        def tick() -> None:
            now = reactor.seconds()
            gaps.append(now - last[0])
            last[0] = now

        ticker = LoopingCall(tick)
        ticker.start(0.02)
        try:
            response = await http(self.port, "/?x-haiku-handler=bomb.py" + query)
        finally:
            ticker.stop()
        self.assertLess(max(gaps), 1.0, "the server's loop was held")
        victim = await http(self.port, "/?x-haiku-handler=victim.py")
        self.assertEqual(victim.text, "victim")
        return response

    async def test_headers(self) -> None:
        """
        1.6 million headers in one frame: the child is killed (500) without
        holding the server's loop.
        """
        response = await self._bomb("")
        self.assertEqual(response.status, 500, response.raw[:200])

    async def test_many_heads(self) -> None:
        """
        A thousand heads of 200 KiB each for one response: the server does
        not keep adding them up.
        """
        before = _rss()
        response = await self._bomb("&via=heads")
        grown = _rss() - before
        self.assertLess(grown, 64 << 20, f"the server grew by {grown >> 20} MiB")
        self.assertEqual(response.status, 500, response.raw[:200])

    async def test_failure_message(self) -> None:
        """
        A failure frame with a 15 MiB message is not logged or sent whole.
        """
        logged = []

        def observe(event: dict) -> None:
            logged.append(sum(len(str(v)) for v in event.values()))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        response = await self._bomb("&via=fail")
        self.assertEqual(response.status, 500)
        self.assertLess(len(response.body), 1 << 20)
        self.assertLess(max(logged), 1 << 20)

    async def test_trailers(self) -> None:
        """
        The same as trailers: the response is cut off.
        """
        response = await self._bomb("&via=trailer")
        self.assertFalse(response.complete, response.raw[:200])


class ConsoleTests(TestCase):

    """
    A handler's console reaches the server's log only with --debug, and
    within --maxconsole.
    """

    debug = False

    def setUp(self) -> Deferred[None]:
        self.port, self.pool = start_runtime(
            self, {"flood.py": CONSOLE_FLOOD}, workers=1, max_requests=1, debug=self.debug
        )
        self.logged = 0

        def observe(event: dict) -> None:
            if "console" in event:
                self.logged += len(event["console"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return Deferred.fromCoroutine(ready(self.pool))

    async def test_forged_console_frames(self) -> None:
        """
        Console frames a handler forges without --debug are not logged.
        """
        response = await http(self.port, "/?x-haiku-handler=flood.py")
        self.assertEqual(response.status, 200, response.text)
        self.assertEqual(self.logged, 0)


class DebugConsoleTests(ConsoleTests):
    """
    With --debug, forged console frames are logged within --maxconsole.
    """

    debug = True

    async def test_forged_console_frames(self) -> None:
        """
        13 MB of forged console frames log 4096 bytes (the default limit).
        """
        response = await http(self.port, "/?x-haiku-handler=flood.py")
        self.assertEqual(response.status, 200, response.text)
        self.assertLessEqual(self.logged, 4096)
        self.assertGreater(self.logged, 0)


#: Opens as many connections to its egress relay as its processes can
#: hold, and holds them without a word: each is a descriptor in the server.
RELAY_FLOOD = r"""
port=${HTTP_PROXY##*:}
for i in $(seq 1 20); do
  (
    for fd in $(seq 11 60); do
      eval "exec $fd<>/dev/tcp/127.0.0.1/$port" 2>/dev/null || break
    done
    sleep 5
  ) &
done
sleep 2
echo held
"""


def _stdio_sandbox() -> None:
    """
    Skip unless stdio handlers run here with their processes bounded (root,
    Landlock, seccomp, cgroup v1 pids and memory, bash).
    """
    from haikutx.sandbox import probe
    from haikutx.sandbox.cgroup import CgroupTree, hierarchies

    if os.geteuid() != 0:
        raise SkipTest("per-slot uids, the network namespace and cgroups need root")
    layers = probe()
    if not layers.landlock_abi or not layers.seccomp:
        raise SkipTest(f"this kernel lacks a sandbox layer: {layers.reasons}")
    if not CgroupTree(*hierarchies()).complete():
        raise SkipTest("cgroup v1 pids and memory are needed")
    if shutil.which("bash") is None:
        raise SkipTest("bash is not installed")


class RelayFloodTests(TestCase):
    """
    What a handler holds open through its egress relay is bounded in the
    server.
    """

    timeout = 60

    def setUp(self) -> Deferred[None]:
        from haikutx.config import Limits

        _stdio_sandbox()
        self.port, self.pool = start_runtime(
            self, {"flood.sh": RELAY_FLOOD, "victim.py": VICTIM}, workers=1,
            max_requests=1, limits=Limits(max_time=10.0),
        )
        return Deferred.fromCoroutine(ready(self.pool))

    async def test_idle_connections(self) -> None:
        """
        A thousand idle connections to the relay from one run: the server
        holds at most a bounded number of them.
        """
        before = len(os.listdir("/proc/self/fd"))
        most = [0]

        def count() -> None:
            most[0] = max(most[0], len(os.listdir("/proc/self/fd")) - before)

        counter = LoopingCall(count)
        counter.start(0.05)
        try:
            response = await http(self.port, "/?x-haiku-handler=flood.sh")
        finally:
            counter.stop()
        self.assertEqual(response.text, "held\n")
        self.assertLess(most[0], 200, f"the server held {most[0]} more descriptors")
        victim = await http(self.port, "/?x-haiku-handler=victim.py")
        self.assertEqual(victim.text, "victim")


#: Opens tunnels through its relay to an allowed service that never says
#: anything, and ends its run with them open.
TUNNELS = r"""
import os, socket
port = int(os.environ.get('HTTP_PROXY', 'http://127.0.0.1:3128').rsplit(':', 1)[1])
held = []
for _ in range(int(req.query['n'])):
    s = socket.create_connection(('127.0.0.1', port), timeout=5)
    s.sendall(('CONNECT 127.0.0.1:%s HTTP/1.1\r\nHost: x\r\n\r\n' % req.query['to']).encode())
    answer = s.recv(100)
    held.append(s)
res.end('%d tunnels: %s' % (len(held), answer.split(b'\r\n')[0].decode()))
"""


class _Silent(Protocol):
    """
    Accepts and says nothing; counts who is connected.
    """

    live: set[Protocol]

    def connectionMade(self) -> None:
        self.factory.live.add(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: object) -> None:
        self.factory.live.discard(self)  # type: ignore[attr-defined]


class TunnelTests(TestCase):
    """
    Tunnels a run opened through the egress proxy end with its run.
    """

    def setUp(self) -> Deferred[None]:
        from twisted.internet.protocol import Factory

        from haikutx.sandbox import probe

        if os.geteuid() != 0 or not probe().network_namespaces:
            raise SkipTest("the egress namespace needs root")
        factory = Factory.forProtocol(_Silent)
        factory.live = set()  # type: ignore[attr-defined]
        self.live = factory.live  # type: ignore[attr-defined]
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.to = listening.getHost().port
        self.port, self.pool = start_runtime(
            self, {"tunnels.py": TUNNELS}, workers=1, max_requests=1,
            egress_allow=(f"127.0.0.1:{self.to}",),
        )
        return Deferred.fromCoroutine(ready(self.pool))

    async def test_tunnels_end_with_the_run(self) -> None:
        """
        Ten tunnels to a silent service, left open by a handler whose run
        ended: the server closes them, and the slot can open as many again.
        """
        for _ in range(2):
            response = await http(self.port, f"/?x-haiku-handler=tunnels.py&n=10&to={self.to}")
            self.assertEqual(response.text, "10 tunnels: HTTP/1.1 200 Connection established")
            await until(
                lambda: not self.live, 5.0, lambda: f"{len(self.live)} tunnels outlived their run"
            )


#: A stdio handler that looks for the channel among its descriptors and
#: writes the frames a fresh process and a forged response would be.
STDIO_FORGE = r"""
ready='\0\0\0\1Y'
head='\0\0\0\x11H{"status":299}'
for fd in $(seq 3 63); do
  (printf "$ready$head" >&$fd) 2>/dev/null && echo "wrote $fd"
  (read -r -t 0.01 -u $fd line) 2>/dev/null && echo "read $fd"
done
echo done
"""


class StdioDescriptorTests(TestCase):
    """
    A stdio interpreter holds its stdin, stdout and stderr only: no channel
    to forge frames on or read requests from.
    """

    def setUp(self) -> Deferred[None]:
        if shutil.which("bash") is None:
            raise SkipTest("bash is not installed")
        self.port, self.pool = start_runtime(
            self, {"forge.sh": STDIO_FORGE, "victim.py": VICTIM}, workers=1, max_requests=1
        )
        return Deferred.fromCoroutine(ready(self.pool))

    async def test_no_channel(self) -> None:
        """
        Nothing beyond fd 2 can be written or read, and the next request is
        served as usual.
        """
        response = await http(self.port, "/?x-haiku-handler=forge.sh")
        self.assertEqual((response.status, response.text), (200, "done\n"))
        victim = await http(self.port, "/?x-haiku-handler=victim.py")
        self.assertEqual(victim.text, "victim")
