"""
Unit tests of the pure parts: framing, console encoding and buffering,
parameters, and handler names.
"""

from __future__ import annotations

from urllib.parse import unquote

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from haikutx.child import wire
from haikutx.child.console import ConsoleBuffer, console_mode, encode_console
from haikutx.child.params import BadRequestBody, merge_params, parse_body
from haikutx.runtime.loader import HandlerLoadError, classify
from haikutx.test.strategies import console_text, frames


class WireTests(SynchronousTestCase):
    """
    Tests for L{haikutx.child.wire}.
    """

    @given(frames, st.lists(st.integers(min_value=1, max_value=50), min_size=1))
    def test_round_trip_any_split(self, sent, cuts) -> None:
        """
        Frames come out whole and in order however the stream is split.
        """
        stream = b"".join(wire.encode(kind, payload) for kind, payload in sent)
        reader = wire.FrameReader()
        received = []
        position = 0
        index = 0
        while position < len(stream):
            step = cuts[index % len(cuts)]
            received.extend(reader.feed(stream[position : position + step]))
            position += step
            index += 1
        self.assertEqual(received, sent)

    def test_bad_length(self) -> None:
        """
        A frame longer than the maximum is refused.
        """
        with self.assertRaises(wire.FrameError):
            list(wire.FrameReader().feed(b"\xff\xff\xff\xff\x01"))


class ConsoleEncodingTests(SynchronousTestCase):
    """
    Tests for L{encode_console}: C{encodeURIComponent}, then spaces back.
    """

    def test_spec_example(self) -> None:
        """
        The SPEC's example.
        """
        self.assertEqual(encode_console("Before write_head\n"), "Before write_head%0A")

    def test_node_example(self) -> None:
        """
        The example checked against node's C{encodeURIComponent}.
        """
        self.assertEqual(
            encode_console("a b:c/d,e%f\"g'h(i)*!~-_.é\t\r\n"),
            "a b%3Ac%2Fd%2Ce%25f%22g'h(i)*!~-_.%C3%A9%09%0D%0A",
        )

    @given(console_text)
    def test_round_trip(self, text: str) -> None:
        """
        Decoding gives the text back, and the encoding is header-safe.
        """
        encoded = encode_console(text)
        self.assertEqual(unquote(encoded.replace(" ", "%20")), text)
        allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.!~*'() %")
        self.assertTrue(set(encoded) <= allowed, encoded)

    def test_modes(self) -> None:
        """
        An unknown mode is C{none}.
        """
        self.assertEqual(console_mode("trailer"), "trailer")
        self.assertEqual(console_mode("Trailer"), "none")
        self.assertEqual(console_mode(None), "none")


class ConsoleBufferTests(SynchronousTestCase):
    """
    Tests for L{ConsoleBuffer}.
    """

    @given(st.lists(console_text, max_size=20), st.integers(min_value=0, max_value=64))
    def test_keeps_most_recent(self, writes, limit) -> None:
        """
        The buffer holds the most recent C{limit} bytes (all when 0).
        """
        buffer = ConsoleBuffer(limit)
        for text in writes:
            buffer.append(text)
        everything = "".join(writes).encode("utf-8")
        expected = everything[-limit:] if limit else everything
        if limit and len(everything) <= limit:
            expected = everything
        self.assertEqual(len(buffer), len(expected))
        self.assertEqual(buffer.text(), expected.decode("utf-8", "replace"))


class ParamsTests(SynchronousTestCase):
    """
    Tests for L{haikutx.child.params}.
    """

    def test_query_last_wins(self) -> None:
        """
        A query parameter given twice keeps its last value.
        """
        self.assertEqual(merge_params("a=1&a=2&b=", "", b""), {"a": "2", "b": ""})

    def test_body_wins(self) -> None:
        """
        Body parameters override query ones.
        """
        self.assertEqual(
            merge_params("a=1", "application/x-www-form-urlencoded", b"a=2&c=3"),
            {"a": "2", "c": "3"},
        )

    def test_json(self) -> None:
        """
        A JSON object's members are parameters; another JSON value is C{body}.
        """
        self.assertEqual(parse_body("application/json; charset=utf-8", b'{"x": [1]}'), {"x": [1]})
        self.assertEqual(parse_body("application/json", b"[1]"), {"body": [1]})
        with self.assertRaises(BadRequestBody):
            parse_body("application/json", b"{")

    def test_multipart(self) -> None:
        """
        Multipart fields are parameters; files are described.
        """
        body = (
            b"--XX\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue\r\n"
            b"--XX\r\nContent-Disposition: form-data; name=\"f\"; filename=\"t.txt\"\r\n"
            b"Content-Type: text/plain\r\n\r\nhello\r\n--XX--\r\n"
        )
        self.assertEqual(
            parse_body("multipart/form-data; boundary=XX", body),
            {
                "a": "value",
                "f": {"name": "f", "filename": "t.txt", "content_type": "text/plain", "size": 5},
            },
        )
        with self.assertRaises(BadRequestBody):
            parse_body("multipart/form-data", body)

    def test_other_types_ignored(self) -> None:
        """
        Other content types add no parameters.
        """
        self.assertEqual(parse_body("text/plain", b"a=1"), {})


class ClassifyTests(SynchronousTestCase):
    """
    Tests for L{classify}.
    """

    def test_kinds(self) -> None:
        """
        http and https URLs are URLs; bare names are local.
        """
        self.assertEqual(classify("http://example.com/h.py"), "url")
        self.assertEqual(classify("https://example.com/h.py"), "url")
        self.assertEqual(classify("hello.py"), "local")
        self.assertEqual(classify("dir/hello.py"), "local")

    def test_refused(self) -> None:
        """
        Other schemes, schemeless network paths, empty or control
        characters are 400.
        """
        for name in ("ftp://x/", "file:///etc/passwd", "javascript:x", "//host/x", "", "a\nb", "http:///x"):
            with self.assertRaises(HandlerLoadError, msg=name) as caught:
                classify(name)
            self.assertEqual(caught.exception.status, 400)


class BusyTests(SynchronousTestCase):
    """
    The runtime answers 503 with C{Retry-After} when no worker is free
    within --maxtime (fake workers and a L{Clock}).
    """

    def test_all_busy(self) -> None:
        """
        A request waiting longer than --maxtime for a worker gets 503.
        """
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport
        from twisted.web.server import Site

        from haikutx.config import Limits
        from haikutx.runtime.loader import HandlerSource
        from haikutx.runtime.pool import WorkerPool
        from haikutx.runtime.resource import HandlerResource
        from haikutx.testing import FakeSpawner

        class Loader:
            def load(self, name):
                from twisted.internet.defer import succeed

                return succeed(HandlerSource(url=name, source=b"res.end()"))

        clock = Clock()
        pool = WorkerPool(clock, size=1, max_requests=1, spawner=FakeSpawner())
        pool.startService()
        resource = HandlerResource(clock, pool, Loader(), Limits(max_time=2.0))
        channel = Site(resource, reactor=clock).buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /?x-haiku-handler=h.py HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        clock.advance(2)
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 503 "), response)
        self.assertIn(b"Retry-After: 2\r\n", response)
        self.assertIn(b"all workers are busy", response)
