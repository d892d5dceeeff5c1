"""
Tests for L{haikutx.net.sending}: writing at once on real TCP connections
on 127.0.0.1, with a kernel buffer that fills (a partial send), a producer
paused and resumed, ordering behind queued bytes, a closing and a broken
connection, and transports that are not plain TCP.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from haikutx.net.sending import write

#: Bytes enough to fill a small kernel send and receive buffer many times.
LARGE = 2 * 1024 * 1024


class Accepted(Protocol):
    """
    The server side of a test connection: reports when it is made and lost.
    """

    def __init__(self) -> None:
        self.made: Deferred[Accepted] = Deferred()
        #: Fires with the reason in a list (a Failure would errback).
        self.lost: Deferred[list[Failure]] = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback([reason])


@implementer(IPushProducer)
class Producer:
    """
    Records the flow control calls it gets.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class WriteTests(TestCase):
    """
    L{write} on a real accepted TCP connection whose peer is a plain
    socket the test reads from.
    """

    async def connect(self, small: bool = False) -> tuple[Accepted, socket.socket]:
        accepted = Accepted()
        port = reactor.listenTCP(0, Factory.forProtocol(lambda: accepted),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = socket.socket()
        self.addCleanup(peer.close)
        if small:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.setblocking(False)
        peer.connect_ex(("127.0.0.1", port.getHost().port))
        await accepted.made
        self.addCleanup(lambda: accepted.transport.abortConnection())
        if small:
            accepted.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return accepted, peer

    async def read(self, peer: socket.socket, size: int) -> bytes:
        """
        Read C{size} bytes from C{peer}, letting the reactor run (bounded).
        """
        got = bytearray()
        for _ in range(2000):
            try:
                data = peer.recv(65536)
            except BlockingIOError:
                await deferLater(reactor, 0.001, lambda: None)
                continue
            if not data:
                break
            got += data
            if len(got) >= size:
                break
        return bytes(got)

    async def test_sent_at_once(self) -> None:
        """
        With nothing queued, the bytes are sent before the call returns:
        the peer can read them without a reactor turn, and the transport
        neither queues them nor waits to write.
        """
        accepted, peer = await self.connect()
        transport = accepted.transport
        write(transport, b"hello")
        self.assertEqual(peer.recv(100), b"hello")
        self.assertEqual(transport._tempDataLen, 0)
        self.assertNotIn(transport, reactor.getWriters())

    async def test_partial_send(self) -> None:
        """
        What the kernel does not take is queued on the transport, its
        producer is paused, and resumed once the peer has read it all; the
        peer gets every byte in order.
        """
        accepted, peer = await self.connect(small=True)
        transport = accepted.transport
        producer = Producer()
        transport.registerProducer(producer, True)
        data = bytes(range(256)) * (LARGE // 256)
        write(transport, data)
        queued = transport._tempDataLen
        self.assertGreater(queued, 0)
        self.assertLess(queued, len(data))
        self.assertEqual(producer.calls, ["pause"])
        got = await self.read(peer, len(data))
        self.assertEqual(got, data)
        self.assertEqual(producer.calls, ["pause", "resume"])

    async def test_behind_queued_bytes(self) -> None:
        """
        While bytes are queued, a write is queued behind them rather than
        sent ahead of them.
        """
        accepted, peer = await self.connect(small=True)
        transport = accepted.transport
        first = b"a" * LARGE
        write(transport, first)
        self.assertGreater(transport._tempDataLen, 0)
        write(transport, b"tail")
        got = await self.read(peer, len(first) + 4)
        self.assertEqual(got, first + b"tail")

    async def test_closing(self) -> None:
        """
        A write after C{loseConnection} goes to the transport, which sends it
        before closing, as C{transport.write} does.
        """
        accepted, peer = await self.connect()
        transport = accepted.transport
        transport.loseConnection()
        write(transport, b"last")
        self.assertEqual(transport._tempDataLen, 4)
        self.assertEqual(await self.read(peer, 100), b"last")
        await accepted.lost

    async def test_broken(self) -> None:
        """
        A write on a connection the peer reset does not raise: it is left to
        the transport, and the connection is reported lost (the kernel
        reports the reset once, to the failed send, so the transport may see
        the end as clean).
        """
        accepted, peer = await self.connect()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        peer.close()
        # Loopback delivers the reset at once: the send fails, so the bytes
        # are left to the transport, whose own write finds the error.
        write(accepted.transport, b"lost")
        self.assertEqual(accepted.transport._tempDataLen, 4)
        [reason] = await accepted.lost
        self.assertIsInstance(reason, Failure)

    async def test_pull_producer(self) -> None:
        """
        With a pull producer registered, bytes go through the transport's
        queue, so the producer is asked for more once they are sent.
        """
        accepted, peer = await self.connect()
        transport = accepted.transport
        producer = Producer()
        transport.registerProducer(producer, False)
        self.assertEqual(producer.calls, ["resume"])
        write(transport, b"pulled")
        self.assertEqual(transport._tempDataLen, 6)
        self.assertEqual(await self.read(peer, 6), b"pulled")
        for _ in range(100):
            if len(producer.calls) > 1:
                break
            await deferLater(reactor, 0.001, lambda: None)
        self.assertEqual(producer.calls, ["resume", "resume"])

    def test_not_plain_tcp(self) -> None:
        """
        A transport that is not Twisted's plain TCP (TLS, a test transport)
        is written to with its own C{write}.
        """
        transport = StringTransport()
        write(transport, b"hello")
        self.assertEqual(transport.value(), b"hello")

    async def test_tls_started(self) -> None:
        """
        A TCP transport on which TLS was started is written to with its own
        C{write} (which encrypts).
        """
        accepted, peer = await self.connect()
        transport = accepted.transport
        written = []
        transport.TLS = True
        self.patch(transport, "write", written.append)
        write(transport, b"secret")
        self.assertEqual(written, [b"secret"])
        peer.setblocking(True)
        peer.settimeout(0.05)
        self.assertRaises(TimeoutError, peer.recv, 100)


class CountingTransport(StringTransport):
    """
    A test transport that records each write.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class OneWriteTests(TestCase):
    """
    A kept-alive exchange makes one write each way: the request head (with
    the body that came with it) to the application, the response head with
    the body that came with it to the client.
    """

    def exchange(self, request: bytes, response: bytes) -> tuple[list[bytes], list[bytes]]:
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock

        from haikutx.gate.backends import BackendProtocol
        from haikutx.gate.service import GateService

        gate = GateService(Clock(), install_sighup=False)
        client = gate.factory.buildProtocol(None)
        to_client = CountingTransport(
            peerAddress=IPv4Address("TCP", "127.0.0.1", 5555),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 18180),
        )
        client.makeConnection(to_client)
        to_backend = CountingTransport()
        backend = BackendProtocol(gate.factory.pool, 18181, lambda b: None)
        backend.makeConnection(to_backend)
        gate.factory.pool.give(backend)
        client.dataReceived(request)
        backend.dataReceived(response)
        self.assertEqual(client.state.name, "HEAD")
        return to_backend.writes, to_client.writes

    def test_length_framed(self) -> None:
        """
        A C{Content-Length} response read in one piece is written at once,
        head and body together.
        """
        body = b"x" * 1000
        sent, answered = self.exchange(
            b"POST /18181/ HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + body,
        )
        self.assertEqual(len(sent), 1)
        self.assertTrue(sent[0].endswith(b"\r\n\r\nabc"))
        self.assertEqual(answered, [b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + body])

    def test_rewritten_head(self) -> None:
        """
        A head the gate rewrites (hop-by-hop fields, a chunked body) is
        written with the body bytes that came with it.
        """
        _, answered = self.exchange(
            b"GET /18181/ HTTP/1.1\r\nHost: h\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        self.assertEqual(answered, [
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ])

    def test_interim(self) -> None:
        """
        Interim C{1xx} heads go out with the final head, in order.
        """
        _, answered = self.exchange(
            b"GET /18181/ HTTP/1.1\r\nHost: h\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        )
        self.assertEqual(answered, [
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        ])
