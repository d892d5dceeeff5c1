"""
Tests for L{haikutx.jobs.channel} (the poll answered at once) and
L{haikutx.net.sending} (writes sent at once).
"""

from __future__ import annotations

import json
import re

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from haikutx.jobs.api import job_site
from haikutx.jobs.channel import JobChannel
from haikutx.jobs.runner import JobRunner
from haikutx.jobs.store.memory import MemoryJobStore
from haikutx.test.test_jobs import _ProcessClock

ADDRESS = IPv4Address("TCP", "127.0.0.1", 1234)


def _response(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"0"))
    return status, headers, body[:length]


class FastPollTests(SynchronousTestCase):
    """
    L{JobChannel} answers a poll of a job the runner holds without a
    L{twisted.web.server.Request}, with the same answer as Twisted's, and
    leaves everything else to Twisted.
    """

    def setUp(self) -> None:
        self.clock = _ProcessClock()
        self.runner = JobRunner(
            self.clock,
            MemoryJobStore(),
            post_callback=lambda u, b: succeed(200),
            evict_delay=0,
        )
        self.successResultOf(Deferred.fromCoroutine(self.runner.start()))
        self.job = self.successResultOf(
            Deferred.fromCoroutine(self.runner.submit("echo", ["hi"], None))
        )
        self.clock.advance(0)

    def _channel(self, token: str | None = None) -> tuple[JobChannel, StringTransport, list]:
        site = job_site(self.clock, self.runner, token)
        made = []
        factory = site.requestFactory

        def counting(*args, **kw):
            made.append(True)
            return factory(*args, **kw)

        site.requestFactory = counting
        channel = site.buildProtocol(ADDRESS)
        self.assertIsInstance(channel, JobChannel)
        transport = StringTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        return channel, transport, made

    def _poll(self, job_id: str | None = None, extra: bytes = b"") -> bytes:
        job_id = job_id or self.job.id
        return b"GET /" + job_id.encode() + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"

    def test_fast(self) -> None:
        """
        A poll of a job the runner runs is answered at once, without a
        request object: 200, Twisted's headers, the job's JSON.
        """
        channel, transport, made = self._channel()
        channel.dataReceived(self._poll())
        status, headers, body = _response(transport.value())
        self.assertEqual(made, [])
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertTrue(headers[b"server"].startswith(b"TwistedWeb/"))
        self.assertRegex(headers[b"date"].decode(), r"^\w{3}, \d\d \w{3} \d{4} [\d:]{8} GMT$")
        self.assertEqual(json.loads(body)["id"], self.job.id)
        self.assertEqual(json.loads(body)["state"], "running")

    def test_same_answer(self) -> None:
        """
        The fast answer has the same status, header names and body as the
        one Twisted gives (through a query string, which sends the same poll
        to Twisted's own parse when a header forces it there).
        """
        channel, transport, made = self._channel()
        channel.dataReceived(self._poll())
        fast = _response(transport.value())
        other, other_transport, other_made = self._channel()
        other.dataReceived(self._poll(extra=b"Connection: keep-alive\r\n"))
        slow = _response(other_transport.value())
        self.assertEqual((made, other_made), ([], [True]))
        self.assertEqual(fast[0], slow[0])
        self.assertEqual(sorted(fast[1]), sorted(slow[1]))
        self.assertEqual(fast[2], slow[2])

    def test_finished_and_trailing_slash_and_query(self) -> None:
        """
        A finished job, C{/<id>/} and a query string are fast too.
        """
        self.runner._running[self.job.id].ended(0, None)
        channel, transport, made = self._channel()
        channel.dataReceived(b"GET /" + self.job.id.encode() + b"/?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = _response(transport.value())
        self.assertEqual((status, made), (200, []))
        self.assertEqual(json.loads(body)["state"], "finished")

    def test_keep_alive(self) -> None:
        """
        Polls after one another on one connection are each answered.
        """
        channel, transport, made = self._channel()
        for _ in range(3):
            channel.dataReceived(self._poll())
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 3)
        self.assertEqual(made, [])
        self.assertFalse(transport.disconnecting)

    def test_token(self) -> None:
        """
        With a token, a poll carrying it is fast; one without it or with a
        wrong one gets Twisted's 401.
        """
        for extra, status, fast in (
            (b"Authorization: Bearer s3cret\r\n", 200, True),
            (b"authorization: bearer s3cret\r\n", 200, True),
            (b"", 401, False),
            (b"Authorization: Bearer wrong\r\n", 401, False),
            (b"Authorization: Basic s3cret\r\n", 401, False),
        ):
            channel, transport, made = self._channel(token="s3cret")
            channel.dataReceived(self._poll(extra=extra))
            self.assertEqual(_response(transport.value())[0], status, extra)
            self.assertEqual(made == [], fast, extra)

    def test_left_to_twisted(self) -> None:
        """
        Requests the fast path is not sure of go through Twisted, which
        answers them as it always did.
        """
        unknown = "0" * 40
        cases = [
            # a job the runner does not hold: the store answers
            (self._poll(unknown), 404),
            (self._poll(extra=b"Connection: close\r\n"), 200),
            (self._poll(extra=b"Content-Length: 0\r\n"), 200),
            (self._poll(extra=b"Expect: 100-continue\r\n"), 100),
            (self._poll().replace(b"HTTP/1.1", b"HTTP/1.0"), 200),
            (b"GET /abc HTTP/1.1\r\nHost: x\r\n\r\n", 404),
            (b"DELETE /" + unknown.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n", 404),
            # malformed: Twisted's 400
            (self._poll(extra=b"Bad Name: x\r\n"), 400),
            (self._poll(extra=b"X: a\x00b\r\n"), 400),
            (self._poll(extra=b"X: a\nb\r\n"), 400),
            (self._poll(extra=b" folded\r\n"), 200),
            # what the shared strict parser (haikutx.net.http1) refuses
            (self._poll(extra=b"Host : y\r\n"), 400),
            (self._poll(extra=b"Keep-Alive: 5\r\n"), 200),
            (self._poll(extra=b"Accept: a\r\nAccept: b\r\n"), 200),
        ]
        for data, status in cases:
            channel, transport, made = self._channel()
            channel.dataReceived(data)
            self.assertEqual(made, [True], data)
            self.assertEqual(_response(transport.value())[0], status, data)

    def test_connection_close(self) -> None:
        """
        C{Connection: close} is Twisted's: the connection closes after the
        answer.
        """
        channel, transport, made = self._channel()
        channel.dataReceived(self._poll(extra=b"Connection: close\r\n"))
        self.assertTrue(transport.disconnecting)

    def test_pipelined_and_split(self) -> None:
        """
        Two polls in one read, and a poll in two reads, are Twisted's and
        are answered in order.
        """
        channel, transport, made = self._channel()
        channel.dataReceived(self._poll() + self._poll("0" * 40))
        statuses = re.findall(rb"HTTP/1.1 (\d+)", transport.value())
        self.assertEqual(statuses, [b"200", b"404"])
        channel, transport, made = self._channel()
        data = self._poll()
        channel.dataReceived(data[:10])
        channel.dataReceived(data[10:])
        self.assertEqual(_response(transport.value())[0], 200)
        self.assertEqual(made, [True])

    def test_after_a_request_in_progress(self) -> None:
        """
        A poll arriving while a submission of the same connection is being
        committed waits for it, and is answered after its 202.
        """
        channel, transport, made = self._channel()
        body = b'{"command": "echo"}'
        post = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        self.runner._stopping = False
        # A store that answers later: the POST stays in progress.
        later: Deferred = Deferred()
        store = self.runner._store
        add = store.add
        store.add = lambda job: later.addCallback(lambda _: add(job))  # type: ignore[method-assign]
        channel.dataReceived(post)
        channel.dataReceived(self._poll())
        self.assertEqual(transport.value(), b"")
        later.callback(None)
        statuses = re.findall(rb"HTTP/1.1 (\d+)", transport.value())
        self.assertEqual(statuses, [b"202", b"200"])
        self.assertEqual(made, [])

    def _post(self, body: bytes, extra: bytes = b"") -> bytes:
        return (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)
        )

    def test_submit_fast(self) -> None:
        """
        A valid submission is answered 202 without a request object, with
        the same status, header names and body shape as Twisted's answer;
        the job is the runner's.
        """
        channel, transport, made = self._channel()
        channel.dataReceived(self._post(b'{"command": "echo", "args": "fast"}'))
        status, headers, body = _response(transport.value())
        self.assertEqual((status, made), (202, []))
        job = json.loads(body)
        self.assertEqual((job["command"], job["arguments"]), ("echo", ["fast"]))
        self.assertIsNotNone(self.runner.peek(job["id"]))
        other, other_transport, other_made = self._channel()
        other.dataReceived(
            self._post(b'{"command": "echo", "args": "slow"}', b"Connection: keep-alive\r\n")
        )
        slow = _response(other_transport.value())
        self.assertEqual(other_made, [True])
        self.assertEqual((slow[0], sorted(slow[1])), (status, sorted(headers)))
        self.assertEqual(sorted(json.loads(slow[2])), sorted(job))

    def test_submit_refused_by_twisted(self) -> None:
        """
        A submission the runner would refuse, or one the fast path is not
        sure of, goes through Twisted: its 400 (or 401), its answer.
        """
        self.runner.whitelist = frozenset(["echo"])
        for data, status in (
            (self._post(b'{"command": "rm"}'), 400),
            (self._post(b"not json"), 400),
            (self._post(b'{"command": "echo", "args": 3}'), 400),
            (self._post(b'{"command": "echo"}')[:-3], None),
            (self._post(b'{"command": "echo"}', b"Transfer-Encoding: chunked\r\n"), 400),
            (self._post(b'{"command": "echo"}').replace(b"POST / ", b"POST /x "), 501),
        ):
            channel, transport, made = self._channel()
            channel.dataReceived(data)
            self.assertEqual(made, [True], data)
            if status is not None:
                self.assertEqual(_response(transport.value())[0], status, data)
        channel, transport, made = self._channel(token="s3cret")
        channel.dataReceived(self._post(b'{"command": "echo"}'))
        self.assertEqual((_response(transport.value())[0], made), (401, [True]))
        channel, transport, made = self._channel(token="s3cret")
        channel.dataReceived(
            self._post(b'{"command": "echo"}', b"Authorization: Bearer s3cret\r\n")
        )
        self.assertEqual((_response(transport.value())[0], made), (202, []))

    def test_submit_store_fails(self) -> None:
        """
        A submission whose store fails is answered 500, and logged.
        """
        from twisted.internet.defer import fail

        self.runner._store.add = lambda job: fail(RuntimeError("disk"))  # type: ignore[method-assign]
        channel, transport, made = self._channel()
        channel.dataReceived(self._post(b'{"command": "echo"}'))
        self.assertEqual(_response(transport.value())[0], 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # The connection goes on.
        channel.dataReceived(self._poll())
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 1)

    def test_submit_then_gone(self) -> None:
        """
        A client that goes away while its submission is committed gets no
        write; the job is accepted all the same.
        """
        later: Deferred = Deferred()
        store = self.runner._store
        add = store.add
        added = []

        def slow_add(job):
            return later.addCallback(lambda _: add(job)).addCallback(lambda j: added.append(j) or j)

        store.add = slow_add  # type: ignore[method-assign]
        channel, transport, made = self._channel()
        channel.dataReceived(self._post(b'{"command": "echo"}'))
        channel.connectionLost(None)
        later.callback(None)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(added), 1)

    def test_held_bounded(self) -> None:
        """
        What a client sends while its submission is committed is held up to
        a bound; beyond it the connection is not read until the answer, and
        everything held is then answered in order.
        """
        from haikutx.jobs.channel import MAX_HELD

        later: Deferred = Deferred()
        store = self.runner._store
        add = store.add
        store.add = lambda job: later.addCallback(lambda _: add(job))  # type: ignore[method-assign]
        channel, transport, made = self._channel()
        channel.dataReceived(self._post(b'{"command": "echo"}'))
        polls = MAX_HELD // len(self._poll()) + 2
        for _ in range(polls):
            channel.dataReceived(self._poll())
        self.assertEqual(transport.producerState, "paused")
        later.callback(None)
        self.assertEqual(transport.producerState, "producing")
        statuses = re.findall(rb"HTTP/1.1 (\d+)", transport.value())
        self.assertEqual(statuses, [b"202"] + [b"200"] * polls)

    def test_host_asked_once(self) -> None:
        """
        The local address is asked of the transport once per connection.
        """
        channel, transport, made = self._channel()
        asked = []
        host = transport.getHost

        def get_host():
            asked.append(True)
            return host()

        transport.getHost = get_host  # type: ignore[method-assign]
        for _ in range(3):
            channel.dataReceived(self._poll("0" * 40))
        self.assertEqual(len(asked), 1)


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.connected_d: Deferred = Deferred()
        self.more: Deferred | None = None

    def connectionMade(self) -> None:
        self.connected_d.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.more is not None and b"\r\n\r\n" in self.data:
            more, self.more = self.more, None
            more.callback(None)


class SendNowTests(TestCase):
    """
    On a real connection a fast answer is written straight to the socket:
    nothing is left in the transport's buffer and the reactor is not asked
    to watch it for writing.
    """

    async def test_straight_to_socket(self) -> None:
        clock = _ProcessClock()
        runner = JobRunner(
            clock, MemoryJobStore(), post_callback=lambda u, b: succeed(200), evict_delay=0
        )
        await runner.start()
        job = await runner.submit("echo", ["hi"], None)
        site = job_site(reactor, runner)
        channels: list[JobChannel] = []
        build = site.buildProtocol

        def building(addr):
            channel = build(addr)
            channels.append(channel)
            return channel

        site.buildProtocol = building  # type: ignore[method-assign]
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        factory = ClientFactory()
        client = _Collect()
        factory.protocol = lambda: client
        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        self.addCleanup(connector.disconnect)
        await client.connected_d
        client.more = Deferred()
        seen: list[tuple[bytes, bool]] = []
        channel_data = JobChannel.dataReceived

        def watching(channel, data):
            channel_data(channel, data)
            transport = channel.transport
            seen.append(
                (
                    transport.dataBuffer + b"".join(transport._tempDataBuffer),
                    transport in reactor.getWriters(),
                )
            )

        self.patch(JobChannel, "dataReceived", watching)
        client.transport.write(b"GET /" + job.id.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        await client.more
        self.assertTrue(client.data.startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(seen, [(b"", False)])

    async def test_launcher_pipe(self) -> None:
        """
        A message to the job launcher is written straight to its pipe, and
        its answer comes.
        """
        from haikutx.jobs.spawn import LauncherSpawner

        spawner = LauncherSpawner(reactor)
        spawner.start()
        self.addCleanup(spawner.stop)
        found = spawner.which("sh", "/usr/bin:/bin")
        writer = spawner._transport.pipes[0]
        self.assertEqual((writer.dataBuffer, writer._tempDataBuffer), (b"", []))
        self.assertNotIn(writer, reactor.getWriters())
        self.assertTrue((await found).endswith("/sh"))
