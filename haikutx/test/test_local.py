"""
Tests for L{haikutx.net.local}: which requests are local.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from haikutx.net.local import FORWARDING_HEADERS, is_local_request, is_loopback_host


class _Judge(Resource):
    """
    Answers whether each request is local.
    """

    isLeaf = True

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        return b"local" if is_local_request(request) else b"remote"


def _judge(peer: object, headers: bytes = b"") -> bytes:
    """
    Feed one request from C{peer} with C{headers} to a real
    L{twisted.web.server.Site} and return its verdict.
    """
    site = Site(_Judge())
    protocol = site.buildProtocol(None)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n" + headers + b"\r\n")
    body = transport.value().rpartition(b"\r\n")[2]
    protocol.connectionLost(None)
    return body


class LoopbackHostTests(SynchronousTestCase):
    """
    L{is_loopback_host} recognises loopback addresses as transports report
    them.
    """

    def test_loopback(self) -> None:
        """
        127.0.0.0/8, ::1 and IPv4-mapped loopback are loopback.
        """
        for host in ("127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "::ffff:127.0.0.1",
                     "::1%lo"):
            with self.subTest(host):
                self.assertTrue(is_loopback_host(host))

    def test_not_loopback(self) -> None:
        """
        Other addresses, names and garbage are not.
        """
        for host in ("10.0.0.1", "192.168.1.1", "::", "0.0.0.0", "::ffff:10.0.0.1",
                     "localhost", "", "127.0.0.1.example", "fe80::1"):
            with self.subTest(host):
                self.assertFalse(is_loopback_host(host))


class LocalRequestTests(SynchronousTestCase):
    """
    L{is_local_request}: a loopback peer and no sign of a proxy.
    """

    def test_loopback_direct(self) -> None:
        """
        A request straight from 127.0.0.1 or ::1 is local.
        """
        self.assertEqual(_judge(IPv4Address("TCP", "127.0.0.1", 4000)), b"local")
        self.assertEqual(_judge(IPv6Address("TCP", "::1", 4000)), b"local")

    def test_remote(self) -> None:
        """
        A request from another address is not local.
        """
        self.assertEqual(_judge(IPv4Address("TCP", "10.1.2.3", 4000)), b"remote")

    def test_forwarded(self) -> None:
        """
        A loopback request with any forwarding header (what the gate or any
        proxy sets) is not local, whatever its value and case.
        """
        for name in FORWARDING_HEADERS:
            for spelled in (name, name.upper()):
                with self.subTest(spelled):
                    self.assertEqual(
                        _judge(IPv4Address("TCP", "127.0.0.1", 4000),
                               spelled + b": 127.0.0.1\r\n"),
                        b"remote",
                    )

    def test_gate_headers(self) -> None:
        """
        The headers the gate always sets are forwarding headers.
        """
        self.assertLessEqual(
            {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"},
            set(FORWARDING_HEADERS),
        )
