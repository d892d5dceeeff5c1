"""
Tests of the runtime's channel (L{haikutx.runtime.site.RuntimeChannel}):
a plain request's head read in one parse gives the request, and the answer,
that twisted.web's line-by-line reading gives; anything else is read by
twisted.web; a response written whole goes out in one write.
"""

from __future__ import annotations

import re
import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from haikutx.runtime.body import LimitedRequest
from haikutx.runtime.site import RuntimeSite


class Echo(Resource):
    """
    Answers with what twisted.web read of the request; C{/later} is
    answered only when the test says so (L{Echo.waiting}).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []

    def render(self, request: Any) -> Any:
        request.content.seek(0)
        seen = repr(
            (
                request.method,
                request.uri,
                request.path,
                sorted(request.args.items()),
                request.clientproto,
                list(request.requestHeaders.getAllRawHeaders()),
                sorted(request.received_cookies.items()),
                request.content.read(),
                request.getClientAddress(),
                request.getHost(),
                request.channel.persistent,
                request.prepath,
                request.postpath,
                request.sitepath,
                request.site is not None,
                [
                    (name, [b"-"] if name == b"Date" else values)
                    for name, values in request.responseHeaders.getAllRawHeaders()
                ],
            )
        ).encode("utf-8")
        request.setHeader(b"content-type", b"text/plain")
        if request.path == b"/later":
            self.waiting.append((request, seen))
            return NOT_DONE_YET
        return seen


_DATE = re.compile(rb"\r\nDate: [^\r]*")


def exchange(
    chunks: list[bytes], plain_heads: bool, request_factory: Any = None
) -> tuple[bytes, bool, int]:
    """
    Feed C{chunks} to a new runtime channel, answering any C{/later}
    request after each chunk.

    @param request_factory: the site's requests (default: the runtime's).
    @return: what the client received (its C{Date} headers' values left
        out),
        whether the connection was closed, and how many head lines
        twisted.web's line reader read.
    """
    resource = Echo()
    site = RuntimeSite(resource, reactor=Clock(), timeout=None)
    if request_factory is not None:
        site.requestFactory = request_factory
    channel = site.buildProtocol(None)
    channel._channel.plain_heads = plain_heads
    lines = [0]
    line_received = channel._channel.lineReceived

    def count(line: bytes) -> Any:
        lines[0] += 1
        return line_received(line)

    channel._channel.lineReceived = count
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
    )
    channel.makeConnection(transport)
    for chunk in chunks:
        if transport.disconnecting:
            break
        channel.dataReceived(chunk)
        while resource.waiting and not transport.disconnecting:
            request, seen = resource.waiting.pop(0)
            request.write(seen)
            request.finish()
    closed = transport.disconnecting
    channel.connectionLost(None)
    return _DATE.sub(b"\r\nDate: -", transport.value()), closed, lines[0]


def same_either_way(case: SynchronousTestCase, chunks: list[bytes]) -> tuple[bytes, int]:
    """
    Assert that C{chunks} are answered alike with and without the channel's
    one-parse reading of plain heads (by the runtime's request, or a
    L{LimitedRequest}, which does not take the parsed head), and as
    twisted.web's own request
    (L{LimitedRequest}'s C{twisted.web.server.Request}) answers them when
    read line by line.

    @return: the answer, and how many head lines twisted.web read with it.
    """
    plain = exchange(chunks, True)
    twisted = exchange(chunks, False)
    reference = exchange(chunks, False, LimitedRequest)
    # A request that does not take the parsed head: twisted.web's steps.
    plain_limited = exchange(chunks, True, LimitedRequest)
    case.assertEqual(plain[:2], twisted[:2])
    case.assertEqual(plain[:2], reference[:2])
    case.assertEqual(plain[:2], plain_limited[:2])
    return plain[0], plain[2]


GET = b"GET /?x-haiku-handler=hello.py HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"

#: Requests read in one parse: their head lines are not twisted.web's.
PLAIN = [
    [GET],
    [b"GET / HTTP/1.1\r\n\r\n"],
    [b"HEAD /later?a=1 HTTP/1.1\r\nhost: x\r\n\r\n"],
    [
        b"GET /p%20q/r?a=1&a=2;b&c=%ff+ HTTP/1.1\r\nHost: x\r\nuSeR-aGeNt: wrk\r\n"
        b"Accept: */*\r\naccept: text/plain\r\nCookie: a=b; c=d\r\nX-Tab:\tv\tw \r\n"
        b"X-High: \x80\xff\r\nX-Empty:\r\nX-Haiku-Handler: h.py\r\nContent-Md5: z\r\n\r\n"
    ],
    [b"DELETE /later HTTP/1.1\r\nHost: x\r\n\r\n"],
    [b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"],
    [GET + GET],
    [GET, GET, GET],
    [
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /b HTTP/1.1\r\nHost: y\r\nCookie: c=d\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    [b"GET /later HTTP/1.1\r\nHost: x\r\n\r\n" + GET],
]

#: Requests twisted.web reads itself, line by line.
UNUSUAL = [
    [b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"],
    [b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"],
    [b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"],
    [b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n"],
    [b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n"],
    [b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n"],
    [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"],
    [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"],
    [b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"],
    [b"\r\n" + GET],
    [b"GET / HTTP/1.1\r\nHost: x\r\n", b"\r\n"],
    [b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"],
    [b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n  folded\r\n\r\n"],
    [b"GET / HTTP/1.1\r\nHost : x\r\n\r\n"],
    [b"GET / HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n"],
    [b"GET / HTTP/1.2\r\nHost: x\r\n\r\n"],
    [b"GET /\x7f HTTP/1.1\r\nHost: x\r\n\r\n"],
    [b"GET / HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n"],
    [b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 501 + b"\r\n"],
    [b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n"],
    [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"],
]


class PlainHeadTests(SynchronousTestCase):
    """
    A plain request's head is read in one parse, and answered as twisted.web
    answers it; anything else is twisted.web's to read.
    """

    def test_plain(self) -> None:
        """
        A complete HTTP/1.1 head without a body, C{Expect} or hop-by-hop
        field, arriving on an idle connection, is read in one parse
        (twisted.web's line reader reads none of its lines), and the client
        receives the same bytes as from twisted.web's reading, apart from
        the C{Date}: also for several requests in one read, a request
        answered later with the next one already in, C{HEAD}, header
        names in any case, repeated headers, cookies, and values with
        tabs and bytes beyond ASCII.
        """
        for chunks in PLAIN:
            answer, lines = same_either_way(self, chunks)
            self.assertEqual(lines, 0, chunks)
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)

    def test_unusual(self) -> None:
        """
        Anything else (HTTP/1.0, C{Connection}, C{Upgrade}, C{TE},
        C{Expect}, a body, an empty line first, a head in parts, a head the
        strict parser refuses, too many header fields, too long a head, an
        HTTP/2 preface) is read by twisted.web's line reader, with its
        answers.
        """
        for chunks in UNUSUAL:
            _, lines = same_either_way(self, chunks)
            self.assertGreater(lines, 0, chunks)

    def test_fields_read_alike(self) -> None:
        """
        The request's fields read in one parse are twisted.web's: header
        names in its case, values without surrounding white space, the
        query's arguments, the cookies.
        """
        answer, _ = same_either_way(self, PLAIN[3])
        self.assertIn(b"(b'User-Agent', [b'wrk'])", answer)
        self.assertIn(b"(b'Accept', [b'*/*', b'text/plain'])", answer)
        self.assertIn(b"(b'X-Tab', [b'v\\tw'])", answer)
        self.assertIn(b"(b'Content-MD5', [b'z'])", answer)
        self.assertIn(b"(b'a', b'b'), (b'c', b'd')", answer)
        self.assertIn(b"(b'a', [b'1', b'2'])", answer)

    @settings(max_examples=200, deadline=None)
    @given(
        method=st.sampled_from([b"GET", b"HEAD", b"POST", b"get", b"X", b"G T", b""]),
        target=st.sampled_from([b"/", b"/later", b"/a?b=c", b"*", b"/\xff", b""]),
        version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1 "]),
        fields=st.lists(
            st.tuples(
                st.sampled_from(
                    [b"Host", b"x-a", b"Cookie", b"Content-Length", b"Connection",
                     b"Expect", b"Transfer-Encoding", b"X A", b"", b"Accept"]
                ),
                st.binary(max_size=12),
            ),
            max_size=6,
        ),
        split=st.integers(min_value=0, max_value=200),
        again=st.booleans(),
    )
    def test_any_head(
        self, method: bytes, target: bytes, version: bytes,
        fields: list[tuple[bytes, bytes]], split: int, again: bool,
    ) -> None:
        """
        Whatever the head, the client receives the same bytes with and
        without the one-parse reading of plain heads.
        """
        head = method + b" " + target + b" " + version + b"\r\n"
        head += b"".join(name + b":" + value + b"\r\n" for name, value in fields)
        data = head + b"\r\n" + (GET if again else b"")
        same_either_way(self, [data[:split], data[split:]] if split else [data])


class HeldWritesTests(SynchronousTestCase):
    """
    A response written between L{RuntimeChannel.hold_writes} and
    L{RuntimeChannel.send_held} goes out in one write, in its place.
    """

    def setUp(self) -> None:
        self.resource = Echo()
        site = RuntimeSite(self.resource, reactor=Clock(), timeout=None)
        self.protocol = site.buildProtocol(None)
        self.channel = self.protocol._channel
        self.transport = StringTransport()
        self.writes: list[bytes] = []
        write = self.transport.write

        def counted(data: bytes) -> None:
            self.writes.append(data)
            write(data)

        self.transport.write = counted  # type: ignore[method-assign]
        self.protocol.makeConnection(self.transport)

    def test_one_write(self) -> None:
        """
        A response's head and body, written while held, reach the
        transport in one write when the request is done.
        """
        self.protocol.dataReceived(b"GET /later HTTP/1.1\r\nHost: x\r\n\r\n")
        request, seen = self.resource.waiting.pop()
        self.channel.hold_writes()
        request.setHeader(b"content-length", b"%d" % len(seen))
        request.write(seen)
        self.assertEqual(self.writes, [])
        request.finish()
        self.assertEqual(len(self.writes), 1)
        self.assertTrue(self.writes[0].startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(self.writes[0].endswith(seen))
        self.channel.send_held()
        self.assertEqual(len(self.writes), 1)

    def test_before_the_next(self) -> None:
        """
        The held response goes out before anything the next request, read
        when it is done, writes (here twisted.web's 400 for a bad head), and
        before the connection closes.
        """
        self.protocol.dataReceived(
            b"GET /later HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost : x\r\n\r\n"
        )
        request, seen = self.resource.waiting.pop()
        self.channel.hold_writes()
        request.write(seen)
        request.finish()
        value = self.transport.value()
        self.assertIn(seen, value)
        self.assertTrue(value.endswith(b"HTTP/1.1 400 Bad Request\r\n\r\n"), value)
        self.assertTrue(self.transport.disconnecting)

    def test_closed(self) -> None:
        """
        What is held when the channel closes the connection goes out first.
        """
        self.channel.hold_writes()
        self.channel.write(b"last words")
        self.channel.loseConnection()
        self.assertEqual(self.writes, [b"last words"])
        self.assertTrue(self.transport.disconnecting)

    def test_lost(self) -> None:
        """
        Nothing held is written once the connection is lost.
        """
        self.channel.hold_writes()
        self.channel.write(b"unsent")
        self.protocol.connectionLost(None)
        self.channel.send_held()
        self.assertEqual(self.writes, [])


class SentAtOnceTests(TestCase):
    """
    On a real TCP connection, a held response is sent at once: in the
    peer's socket when L{RuntimeChannel.send_held} returns, nothing left
    queued on the transport, which the reactor is not asked to watch for
    writing.
    """

    async def test_sent_at_once(self) -> None:
        """
        The head and body written while held are in the peer's socket, and
        none of them queued on the transport, once the request is done.
        """
        resource = Echo()
        site = RuntimeSite(resource, reactor=reactor, timeout=None)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(peer.close)
        peer.sendall(b"GET /later HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(200):
            if resource.waiting:
                break
            await deferLater(reactor, 0.01, lambda: None)
        request, seen = resource.waiting.pop()
        channel = request.channel
        transport = channel.transport
        channel.hold_writes()
        request.setHeader(b"content-length", b"%d" % len(seen))
        request.write(seen)
        request.finish()
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
        self.assertNotIn(transport, reactor.getWriters())
        peer.settimeout(5)
        received = b""
        while not received.endswith(seen):
            received += peer.recv(65536)
        self.assertTrue(received.startswith(b"HTTP/1.1 200 OK\r\n"), received)
        peer.close()
        for _ in range(200):
            if not transport.connected:
                break
            await deferLater(reactor, 0.01, lambda: None)
