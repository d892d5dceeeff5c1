"""
Tests for L{haikutx.net.http1}: the strict head parser and body framer,
with h11 as an independent oracle.
"""

from __future__ import annotations

import h11
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from haikutx.net import http1
from haikutx.net.http1 import (
    HOP_BY_HOP,
    BadMessage,
    BodyFramer,
    LastHead,
    end_to_end,
    head_end,
    parse_request_head,
    parse_response_head,
    reason,
)

GOOD = b"GET /a?b=1 HTTP/1.1\r\nHost: h\r\nX-A:  v  w \r\nAccept: */*\r\n\r\n"

#: Request heads RFC 9112 does not allow, and what each one tries.
BAD_REQUESTS = {
    "bare LF in a value": b"GET / HTTP/1.1\r\nHost: h\r\nX: a\nY: b\r\n\r\n",
    "bare LF line ends": b"GET / HTTP/1.1\nHost: h\r\n\r\n",
    "bare CR in a value": b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rY: b\r\n\r\n",
    "bare CR in the request line": b"GET /\r HTTP/1.1\r\nHost: h\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n",
    "tab fold": b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n\tb\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost : h\r\n\r\n",
    "no colon": b"GET / HTTP/1.1\r\nHost: h\r\nnocolon\r\n\r\n",
    "NUL in a value": b"GET / HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n\r\n",
    "control character": b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x01b\r\n\r\n",
    "DEL in a value": b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x7fb\r\n\r\n",
    "two Content-Length": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
    b"Content-Length: 6\r\n\r\n",
    "repeated equal Content-Length": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
    b"Content-Length: 5\r\n\r\n",
    "Content-Length list": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\n",
    "signed Content-Length": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\n",
    "hex Content-Length": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x5\r\n\r\n",
    "huge Content-Length": b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: "
    + b"9" * 30 + b"\r\n\r\n",
    "TE with Content-Length": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 5\r\n\r\n",
    "two Transfer-Encoding": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
    "chunked twice": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
    "chunked not last": b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "TE in HTTP/1.0": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
    "no Host": b"GET / HTTP/1.1\r\nX: y\r\n\r\n",
    "two Host": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "HTTP/2.0": b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
    "lower-case version": b"GET / http/1.1\r\nHost: h\r\n\r\n",
    "two spaces": b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
    "space in the target": b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
    "method not a token": b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n",
    "non-ASCII target": b"GET /\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n",
}

#: Chunked bodies whose framing is wrong.
BAD_CHUNKS = {
    "0x prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "plus sign": b"+5\r\nhello\r\n0\r\n\r\n",
    "minus sign": b"-5\r\nhello\r\n0\r\n\r\n",
    "leading space": b" 5\r\nhello\r\n0\r\n\r\n",
    "trailing space": b"5 \r\nhello\r\n0\r\n\r\n",
    "empty size": b"\r\nhello\r\n0\r\n\r\n",
    "overflow": b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n",
    "bare LF after size": b"5\nhello\r\n0\r\n\r\n",
    "data longer than size": b"5\r\nhello!\r\n0\r\n\r\n",
    "bare LF after data": b"5\r\nhello\n0\r\n\r\n",
    "bad extension": b"5;=x\r\nhello\r\n0\r\n\r\n",
    "bad trailer": b"5\r\nhello\r\n0\r\nnocolon\r\n\r\n",
    "obs-fold trailer": b"5\r\nhello\r\n0\r\nT: a\r\n b\r\n\r\n",
}


class RequestHeadTests(SynchronousTestCase):
    """
    L{parse_request_head} reads what RFC 9112 allows and nothing else.
    """

    def test_good(self) -> None:
        """
        A well-formed head parses to its method, target, version and fields
        (names lower-cased, values without surrounding white space).
        """
        head = parse_request_head(GOOD)
        self.assertEqual((head.method, head.target, head.version),
                         (b"GET", b"/a?b=1", b"HTTP/1.1"))
        self.assertEqual(head.headers,
                         ((b"host", b"h"), (b"x-a", b"v  w"), (b"accept", b"*/*")))
        self.assertEqual((head.content_length, head.chunked, head.keep_alive),
                         (None, False, True))

    def test_bad(self) -> None:
        """
        Every head of L{BAD_REQUESTS} is refused with 400.
        """
        for name, raw in BAD_REQUESTS.items():
            with self.subTest(name):
                with self.assertRaises(BadMessage) as caught:
                    end = head_end(raw)
                    parse_request_head(raw[:end] if end > 0 else raw)
                self.assertEqual(caught.exception.status, 400, name)

    def test_unknown_coding(self) -> None:
        """
        A transfer coding other than chunked is 501.
        """
        with self.assertRaises(BadMessage) as caught:
            parse_request_head(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n")
        self.assertEqual(caught.exception.status, 501)

    def test_bare_lf_seen_early(self) -> None:
        """
        L{head_end} refuses a bare LF before the head is complete, so a
        client that ends lines with LF alone is answered at once.
        """
        self.assertEqual(head_end(b"GET / HTTP/1.1\r\nHost"), -1)
        with self.assertRaises(BadMessage):
            head_end(b"GET / HTTP/1.1\nHost: h\n")
        self.assertEqual(head_end(GOOD + b"NEXT"), len(GOOD))

    def test_connection_tokens(self) -> None:
        """
        C{Connection} decides keep-alive per version, and the fields it
        names are not end-to-end.
        """
        head = parse_request_head(
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n"
            b"Keep-Alive: 5\r\nX-Kept: 2\r\n\r\n"
        )
        self.assertFalse(head.keep_alive)
        self.assertEqual(end_to_end(head), [(b"host", b"h"), (b"x-kept", b"2")])
        self.assertFalse(parse_request_head(b"GET / HTTP/1.0\r\n\r\n").keep_alive)
        self.assertTrue(
            parse_request_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
        )

    def test_leading_empty_lines(self) -> None:
        """
        Empty lines before the request line are skipped (RFC 9112 2.2).
        """
        self.assertEqual(parse_request_head(b"\r\n\r\n" + GOOD).method, b"GET")

    @given(
        st.sampled_from([b"GET", b"POST", b"PUT", b"M-SEARCH"]),
        st.text("abz/?=&%-._~", min_size=0, max_size=20),
        st.lists(
            st.tuples(
                st.text("abcXYZ-_!#", min_size=1, max_size=8),
                st.binary(max_size=12).map(
                    lambda b: bytes(c for c in b if c not in b"\r\n")
                ),
            ),
            max_size=6,
        ),
    )
    def test_h11_oracle(self, method: bytes, path: str, fields: list) -> None:
        """
        Whatever this parser accepts, h11 accepts with the same method,
        target and fields.
        """
        raw = method + b" /" + path.encode() + b" HTTP/1.1\r\nHost: h\r\n"
        for name, value in fields:
            if name.lower() in ("host", "content-length", "transfer-encoding"):
                continue
            raw += name.encode() + b": " + value + b"\r\n"
        raw += b"\r\n"
        try:
            ours = parse_request_head(raw)
        except BadMessage:
            return
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(raw)
        theirs = conn.next_event()
        self.assertEqual((theirs.method, theirs.target), (ours.method, ours.target))
        self.assertEqual([(n, v) for n, v in theirs.headers], list(ours.headers))


class ResponseHeadTests(SynchronousTestCase):
    """
    L{parse_response_head} reads an application's status line and fields.
    """

    def test_good(self) -> None:
        """
        The status, reason and framing are read; a missing reason is empty.
        """
        head = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual((head.status, head.reason, head.content_length), (200, b"OK", 5))
        self.assertEqual(parse_response_head(b"HTTP/1.0 204\r\n\r\n").reason, b"")

    def test_bad(self) -> None:
        """
        A malformed status line or framing is refused.
        """
        for raw in [
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\nb\r\n\r\n",
            b"ICY 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n",
        ]:
            with self.subTest(raw):
                self.assertRaises(BadMessage, parse_response_head, raw)

    def test_framing(self) -> None:
        """
        A response to HEAD, a 204 or a 304 has no body; one without length or
        chunked ends when the connection closes.
        """
        ok = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
        self.assertTrue(BodyFramer.for_response(ok, b"HEAD").done)
        self.assertEqual(BodyFramer.for_response(ok, b"GET").remaining, 9)
        bare = parse_response_head(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(BodyFramer.for_response(bare, b"GET").mode, "close")
        gzip = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
        self.assertEqual(BodyFramer.for_response(gzip, b"GET").mode, "close")


class BodyFramerTests(SynchronousTestCase):
    """
    L{BodyFramer} finds the end of a body and checks chunked framing.
    """

    def feed(self, framer: BodyFramer, pieces: list[bytes]) -> bytes:
        """
        Feed C{pieces} as a forwarder would (keeping what was not counted),
        and return what was counted as body.
        """
        pending, counted = b"", b""
        for piece in pieces:
            pending += piece
            end = framer.consume(pending)
            counted += pending[:end]
            pending = pending[end:]
        return counted + b"|" + pending

    def test_chunked_split_anywhere(self) -> None:
        """
        A chunked body is found complete however it is split, and the bytes
        after it are left.
        """
        body = b"5;ext=1;q=\"a b\"\r\nhello\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\nT: v\r\n\r\n"
        for cut in range(len(body)):
            framer = BodyFramer("chunked")
            self.assertEqual(self.feed(framer, [body[:cut], body[cut:] + b"NEXT"]),
                             body + b"|NEXT")
            self.assertTrue(framer.done)

    def test_incomplete_line_not_counted(self) -> None:
        """
        An incomplete chunk-size line is not counted until it is whole, so
        it is never forwarded before it is checked.
        """
        framer = BodyFramer("chunked")
        self.assertEqual(framer.consume(b"5\r\nhello\r\n0x"), 10)

    def test_bad_chunks(self) -> None:
        """
        Every body of L{BAD_CHUNKS} is refused, fed whole or byte by byte.
        """
        for name, body in BAD_CHUNKS.items():
            with self.subTest(name):
                self.assertRaises(BadMessage, self.feed, BodyFramer("chunked"), [body])
                self.assertRaises(BadMessage, self.feed, BodyFramer("chunked"),
                                  [body[i : i + 1] for i in range(len(body))])

    def test_length(self) -> None:
        """
        A Content-Length body ends after that many bytes.
        """
        framer = BodyFramer("length", 5)
        self.assertEqual(framer.consume(b"abc"), 3)
        self.assertEqual(framer.consume(b"deXY"), 2)
        self.assertTrue(framer.done)


class TablesTests(SynchronousTestCase):
    """
    The shared tables.
    """

    def test_reason(self) -> None:
        """
        Reason phrases come from one table.
        """
        self.assertEqual(reason(502), b"Bad Gateway")
        self.assertEqual(reason(431), b"Request Header Fields Too Large")
        self.assertEqual(reason(799), b"")

    def test_hop_by_hop(self) -> None:
        """
        The hop-by-hop set holds the RFC 9110 fields and the proxy ones.
        """
        self.assertLessEqual(
            {b"connection", b"keep-alive", b"te", b"transfer-encoding", b"upgrade",
             b"proxy-authorization"}, HOP_BY_HOP)
        self.assertNotIn(b"trailer", HOP_BY_HOP)


class FieldSectionTests(SynchronousTestCase):
    """
    A head's field section is checked by one regular expression over the
    whole section (the fast path); it accepts and reads exactly what the
    line-by-line check does.
    """

    @given(
        st.lists(
            st.binary(max_size=12)
            | st.sampled_from(
                [b"A: b", b"A:b", b"A: b ", b"A:\t", b"A:", b"a b: c", b" A: b", b"A : b",
                 b"A: b\rc", b"A: b\nc", b"A: \x7f", b"A: \x80\xff", b"A: b  c", b""]
            ),
            max_size=5,
        )
    )
    def test_same_as_line_by_line(self, lines: list[bytes]) -> None:
        section = b"".join(line + b"\r\n" for line in lines)
        try:
            expected = http1._fields(section.split(b"\r\n")[:-1])
        except BadMessage:
            self.assertRaises(BadMessage, http1._section, section)
        else:
            self.assertEqual(http1._section(section), expected)


class LastHeadTests(SynchronousTestCase):
    """
    L{LastHead} parses as its parser does, remembering only the last head
    it accepted.
    """

    def test_same_bytes(self) -> None:
        """
        The same bytes again give the same L{Head} without calling the
        parser; other bytes are parsed.
        """
        calls = []

        def parse(raw: bytes) -> http1.Head:
            calls.append(raw)
            return parse_request_head(raw)

        last = LastHead(parse)
        first = last(GOOD)
        self.assertIs(last(bytes(GOOD)), first)
        other = last(b"GET /other HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual((other.target, len(calls)), (b"/other", 2))
        self.assertEqual(last(GOOD), parse_request_head(GOOD))
        self.assertEqual(len(calls), 3)

    def test_refused(self) -> None:
        """
        A refused head is refused every time, and the head before it is
        still the one remembered.
        """
        last = LastHead(parse_response_head)
        good = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        head = last(good)
        bad = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
        for _ in range(2):
            self.assertRaises(BadMessage, last, bad)
        self.assertIs(last(good), head)

    def test_long_not_remembered(self) -> None:
        """
        A head longer than L{http1.REMEMBERED_HEAD} is parsed every time and
        not kept.
        """
        calls = []

        def parse(raw: bytes) -> http1.Head:
            calls.append(raw)
            return parse_request_head(raw)

        last = LastHead(parse)
        long = b"GET / HTTP/1.1\r\nHost: h\r\nX: %s\r\n\r\n" % (
            b"a" * http1.REMEMBERED_HEAD)
        self.assertEqual(last(long), last(long))
        self.assertEqual(len(calls), 2)
        self.assertIsNone(last._raw)
