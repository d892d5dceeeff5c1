# -*- test-case-name: haikutx.test.test_http1 -*-
"""
The one strict HTTP/1.1 message-head parser (RFC 9112) of haikutx, used by
every part that reads HTTP bytes itself: the gate (requests from clients,
responses from applications), the egress proxy (handlers' proxy requests)
and the outbound C{CONNECT} tunnel (a proxy's answer).

What is refused, with L{BadMessage} (a 400 for a request):

  - a bare CR or LF anywhere in the head (only CRLF ends a line);
  - obs-fold (a header line that starts with white space), white space
    between a field name and its colon, a name that is not a token, a
    control character other than HTAB in a value;
  - a request line that is not C{token SP target SP HTTP/1.x} with a
    visible-ASCII target; a status line that is not
    C{HTTP/1.x SP 3DIGIT SP reason};
  - more than one C{Content-Length} (even with equal values), a list value,
    a value that is not digits or larger than L{MAX_CONTENT_LENGTH};
  - C{Transfer-Encoding} together with C{Content-Length}, more than one
    C{Transfer-Encoding}, C{chunked} not last or given twice, or any
    C{Transfer-Encoding} in an HTTP/1.0 message; a coding other than
    C{chunked} is 501 in a request;
  - an HTTP/1.1 request without exactly one C{Host};
  - in a chunked body (L{BodyFramer}): a chunk size that is not 1 to 16
    hexadecimal digits (C{0x5}, C{+5}, C{ 5}, C{5 }), a malformed chunk
    extension, chunk data not followed by CRLF, a malformed trailer line.

h11 was measured against this parser before choosing
(C{bench/http1_bench.py}, results in C{bench/RESULTS.md}): it costs about
five times as much per exchange, more than the gate's whole budget per
request, and it is not strict enough for a front door: h11 0.16 accepts
bare LF line ends, unfolds obs-fold, accepts C{Transfer-Encoding} with
C{Content-Length} (choosing chunked), C{Content-Length: 5, 5}, and
C{Transfer-Encoding} in HTTP/1.0. The tests use h11 as an oracle the
other way: what this parser accepts, h11 reads the same.

It also holds the two tables every product shares: L{HOP_BY_HOP}, the
headers that belong to one connection, and L{reason}, the reason phrases.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from typing import NamedTuple

#: The largest C{Content-Length} accepted (larger: 400).
MAX_CONTENT_LENGTH = 2**62
#: The longest chunk-size line or trailer line of a chunked body, in bytes.
MAX_CHUNK_LINE = 4096
#: The longest trailer section of a chunked body, in bytes.
MAX_TRAILERS = 16384

#: Headers that belong to one connection, never forwarded as they came
#: (RFC 9110 7.6.1, and the proxy-only ones; C{Trailer} is end-to-end): a
#: forwarder frames the message itself and says so with its own
#: C{Connection} and C{Transfer-Encoding}.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"transfer-encoding",
        b"upgrade",
    }
)

_TCHAR = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
_TOKEN = _TCHAR + rb"+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?")
_VALUE = rb"(?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _VALUE + rb")[ \t]*")
#: A whole field section, each line ending with CRLF: checked in one match.
_FIELD_SECTION = re.compile(rb"(?:" + _TOKEN + rb":[ \t]*" + _VALUE + rb"[ \t]*\r\n)*")
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_SIZE = re.compile(
    rb"([0-9A-Fa-f]{1,16})"
    rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED
    + rb"))?)*"
)
_DIGITS = re.compile(rb"[0-9]{1,19}")
_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_NO_TOKENS: frozenset[bytes] = frozenset()


def reason(status: int) -> bytes:
    """
    The reason phrase of C{status}, from the standard library's table (the
    one table of haikutx).

    @return: for example C{b"Bad Gateway"}; C{b""} for an unknown status.
    """
    return _REASONS.get(status, b"")


class BadMessage(ValueError):
    """
    A message head or body framing breaks RFC 9112.

    @ivar status: the status to answer a client with (400, or 501 for a
        transfer coding that is not C{chunked}).
    @ivar reason: one line saying what is wrong.
    """

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Head(NamedTuple):
    """
    A parsed request or response head (an immutable value; a named tuple
    rather than an attrs class because the gate builds two per request).

    @ivar version: C{b"HTTP/1.0"} or C{b"HTTP/1.1"}.
    @ivar headers: the fields in order, names lower-cased, values without
        surrounding white space.
    @ivar content_length: the C{Content-Length}, or C{None}.
    @ivar chunked: whether the body is chunked.
    @ivar connection: the lower-cased tokens of C{Connection}.
    @ivar hop: whether a field other than C{Transfer-Encoding} is
        hop-by-hop (L{HOP_BY_HOP} or named by C{Connection}), so that a
        forwarder cannot pass the fields on as they are.
    @ivar method: a request's method (C{b""} for a response).
    @ivar target: a request's target (C{b""} for a response).
    @ivar status: a response's status (0 for a request).
    @ivar reason: a response's reason phrase.
    """

    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    content_length: int | None
    chunked: bool
    connection: frozenset[bytes]
    hop: bool = False
    method: bytes = b""
    target: bytes = b""
    status: int = 0
    reason: bytes = b""

    @property
    def keep_alive(self) -> bool:
        """
        Whether the sender is willing to keep the connection open after this
        message (HTTP/1.1 unless C{close}; HTTP/1.0 only with
        C{keep-alive}).
        """
        if self.version == b"HTTP/1.0":
            return b"keep-alive" in self.connection
        return b"close" not in self.connection

    def get(self, name: bytes) -> bytes | None:
        """
        The value of the first field called C{name} (lower case), or
        C{None}.
        """
        for field, value in self.headers:
            if field == name:
                return value
        return None


def head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """
    Where the head that starts at C{start} ends.

    @return: the index just past the blank line that ends the head, or -1
        when it has not all arrived.
    @raise BadMessage: for a bare LF already visible (so a client that ends
        its lines with LF alone is answered at once, not left waiting).
    """
    end = buffer.find(b"\r\n\r\n", start)
    if end < 0:
        if buffer.count(b"\n", start) != buffer.count(b"\r\n", start):
            raise BadMessage("bare LF in the head")
        return -1
    return end + 4


def _fields(lines: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    fields = []
    match = _FIELD.fullmatch
    for line in lines:
        found = match(line)
        if found is None:
            if line[:1] in (b" ", b"\t"):
                raise BadMessage("obs-fold (a header line starting with white space)")
            if b"\r" in line or b"\n" in line:
                raise BadMessage("bare CR or LF in the head")
            raise BadMessage(f"malformed header line {line[:60]!r}")
        name, value = found.groups()
        fields.append((name.lower(), value))
    return fields


def _section(text: bytes) -> list[tuple[bytes, bytes]]:
    """
    The fields of a field section C{text} (each line ending with CRLF),
    checked by one regular expression; L{_fields} names what is wrong.
    """
    if _FIELD_SECTION.fullmatch(text) is None:
        _fields(text.split(b"\r\n")[:-1])
        raise BadMessage("malformed header section")
    fields = []
    for line in text.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.strip(b" \t")))
    return fields


def _tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    found: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip(b" \t").lower()
            if token:
                found.add(token)
    return frozenset(found)


def _framing(
    fields: list[tuple[bytes, bytes]], version: bytes, request: bool
) -> tuple[int | None, bool, frozenset[bytes], bool, int]:
    length: int | None = None
    codings: list[bytes] | None = None
    connection = []
    hop = False
    hosts = 0
    for name, value in fields:
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if length is not None:
                raise BadMessage("more than one Content-Length")
            if _DIGITS.fullmatch(value) is None or int(value) > MAX_CONTENT_LENGTH:
                raise BadMessage(f"bad Content-Length {value[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            if codings is not None:
                raise BadMessage("more than one Transfer-Encoding")
            codings = [c.strip(b" \t").lower() for c in value.split(b",")]
        elif name in HOP_BY_HOP:
            hop = True
            if name == b"connection":
                connection.append(value)
    tokens = _tokens(connection) if connection else _NO_TOKENS
    chunked = False
    if codings is not None:
        if length is not None:
            raise BadMessage("both Transfer-Encoding and Content-Length")
        if version == b"HTTP/1.0":
            raise BadMessage("Transfer-Encoding in an HTTP/1.0 message")
        if codings.count(b"chunked") > 1 or b"chunked" in codings[:-1]:
            raise BadMessage("chunked is not the last transfer coding, exactly once")
        if codings != [b"chunked"]:
            if request:
                raise BadMessage(
                    f"transfer coding {b', '.join(codings)[:40]!r} is not supported", 501
                )
            if codings[-1] != b"chunked":
                # A response without chunked last is read until close.
                return None, False, tokens, True, hosts
            hop = True
        chunked = True
    return length, chunked, tokens, hop, hosts


def _start_line(head: bytes | bytearray) -> tuple[bytes, bytes]:
    """
    Split a head (with or without its final blank line) into its first line
    and its field section, each field line ending with CRLF.
    """
    text = bytes(head)
    text = text[:-2] if text.endswith(b"\r\n\r\n") else text + b"\r\n"
    end = text.find(b"\r\n")
    return text[:end], text[end + 2 :]


def parse_request_head(head: bytes | bytearray, require_host: bool = True) -> Head:
    """
    Parse a request head (with or without its final blank line; empty lines
    before the request line are skipped, RFC 9112 2.2).

    @param require_host: refuse an HTTP/1.1 request without exactly one
        C{Host} (a proxy that takes its destination from the target passes
        C{False}: it still refuses two).
    @raise BadMessage: for anything RFC 9112 does not allow (see the module
        docstring).
    """
    text = bytes(head)
    while text.startswith(b"\r\n"):
        text = text[2:]
    if not text:
        raise BadMessage("empty request")
    line, section = _start_line(text)
    first = _REQUEST_LINE.fullmatch(line)
    if first is None:
        if b"\r" in line or b"\n" in line:
            raise BadMessage("bare CR or LF in the head")
        raise BadMessage(f"malformed request line {line[:80]!r}")
    method, target, minor = first.groups()
    version = b"HTTP/1.1" if minor == b"1" else b"HTTP/1.0"
    fields = _section(section)
    length, chunked, connection, hop, hosts = _framing(fields, version, True)
    if hosts > 1 or (not hosts and require_host and version == b"HTTP/1.1"):
        raise BadMessage("an HTTP/1.1 request needs exactly one Host")
    return Head(version, tuple(fields), length, chunked, connection, hop, method, target)


def parse_response_head(head: bytes | bytearray) -> Head:
    """
    Parse a response head (with or without its final blank line).

    @raise BadMessage: for anything RFC 9112 does not allow.
    """
    line, section = _start_line(head)
    first = _STATUS_LINE.fullmatch(line)
    if first is None:
        raise BadMessage(f"malformed status line {line[:80]!r}")
    minor, status, phrase = first.groups()
    version = b"HTTP/1.1" if minor == b"1" else b"HTTP/1.0"
    fields = _section(section)
    length, chunked, connection, hop, _ = _framing(fields, version, False)
    return Head(
        version, tuple(fields), length, chunked, connection, hop, b"", b"", int(status),
        phrase or b"",
    )


#: Longest head L{LastHead} remembers, in bytes.
REMEMBERED_HEAD = 4096


class LastHead:
    """
    A head parser (L{parse_request_head}, L{parse_response_head}) that
    remembers the last head it parsed: the same bytes again, as one
    connection sends them request after request (a poller, a benchmark, an
    application's identical answers within one second of C{Date}), give the
    same L{Head} without parsing again. A head is a function of its bytes
    alone, so nothing is less strict; a head that is refused is not
    remembered, nor one longer than L{REMEMBERED_HEAD} (an idle connection
    holds no more than that).
    """

    __slots__ = ("_parse", "_raw", "_head")

    def __init__(self, parse: Callable[[bytes], Head]) -> None:
        self._parse = parse
        self._raw: bytes | None = None
        self._head: Head | None = None

    def __call__(self, raw: bytes) -> Head:
        """
        Parse C{raw} (as the parser does).

        @raise BadMessage: as the parser does.
        """
        if raw == self._raw:
            return self._head  # type: ignore[return-value]
        head = self._parse(raw)
        if len(raw) <= REMEMBERED_HEAD:
            self._raw, self._head = raw, head
        return head


def end_to_end(head: Head) -> list[tuple[bytes, bytes]]:
    """
    The fields of C{head} a forwarder passes on: all but L{HOP_BY_HOP} and
    those the C{Connection} header names.
    """
    drop = HOP_BY_HOP | head.connection if head.connection else HOP_BY_HOP
    return [(name, value) for name, value in head.headers if name not in drop]


class BodyFramer:
    """
    Finds where one message body ends in a stream of bytes without keeping
    the body, and checks a chunked body's framing as it goes.

    L{consume} says how many bytes of a buffer are body: only whole,
    checked chunk-size lines are counted, so a forwarder that passes on
    exactly what L{consume} counted never passes on a malformed chunk line.

    @ivar done: the body is complete.
    """

    __slots__ = ("mode", "remaining", "done", "_state", "_trailers")

    def __init__(self, mode: str, length: int = 0) -> None:
        """
        @param mode: C{"none"} (no body), C{"length"}, C{"chunked"} or
            C{"close"} (until the connection closes).
        @param length: for C{"length"}, the C{Content-Length}.
        """
        self.mode = mode
        self.remaining = length
        self.done = mode == "none" or (mode == "length" and length == 0)
        self._state = "size"
        self._trailers = 0

    @classmethod
    def for_request(cls, head: Head) -> BodyFramer:
        """
        The framer of a request's body (none when it declares none).
        """
        if head.chunked:
            return cls("chunked")
        return cls("length", head.content_length or 0)

    @classmethod
    def for_response(cls, head: Head, method: bytes) -> BodyFramer:
        """
        The framer of a response's body to a request made with C{method}.
        """
        if method == b"HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
            return cls("none")
        if head.chunked:
            return cls("chunked")
        if head.content_length is not None:
            return cls("length", head.content_length)
        return cls("close")

    def consume(self, data: bytes | bytearray, start: int = 0) -> int:
        """
        Account for C{data[start:]}.

        @return: the index in C{data} just past the last byte counted as
            body; a chunked body's incomplete line is not counted (pass it
            again with more data).
        @raise BadMessage: for a malformed chunked body.
        """
        if self.done:
            return start
        if self.mode == "length":
            take = min(self.remaining, len(data) - start)
            self.remaining -= take
            if not self.remaining:
                self.done = True
            return start + take
        if self.mode == "close":
            return len(data)
        return self._chunked(data, start)

    def _chunked(self, data: bytes | bytearray, i: int) -> int:
        n = len(data)
        while i < n and not self.done:
            state = self._state
            if state == "data":
                take = min(self.remaining, n - i)
                i += take
                self.remaining -= take
                if not self.remaining:
                    self._state = "crlf"
                continue
            if state == "crlf":
                if n - i < 2:
                    if data[i : i + 1] != b"\r":
                        raise BadMessage("chunk data not followed by CRLF")
                    return i
                if data[i : i + 2] != b"\r\n":
                    raise BadMessage("chunk data not followed by CRLF")
                i += 2
                self._state = "size"
                continue
            j = data.find(b"\r\n", i)
            if j < 0:
                if n - i > MAX_CHUNK_LINE:
                    raise BadMessage("chunk line too long")
                if data.find(b"\n", i) >= 0 or data.find(b"\r", i, n - 1) >= 0:
                    raise BadMessage("bare CR or LF in a chunk line")
                return i
            line = bytes(data[i:j])
            if j - i > MAX_CHUNK_LINE:
                raise BadMessage("chunk line too long")
            if state == "size":
                found = _CHUNK_SIZE.fullmatch(line)
                if found is None:
                    raise BadMessage(f"bad chunk size line {line[:40]!r}")
                size = int(found.group(1), 16)
                if size:
                    self.remaining, self._state = size, "data"
                else:
                    self._state = "trailer"
            elif not line:
                self.done = True
            else:
                self._trailers += j - i + 2
                if self._trailers > MAX_TRAILERS:
                    raise BadMessage("trailer section too large")
                _fields([line])
            i = j + 2
        return i


def simple_response(
    status: int,
    body: bytes,
    content_type: bytes = b"text/plain; charset=utf-8",
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> bytes:
    """
    A complete C{Connection: close} response, for an answer a forwarder
    gives itself (an error, a redirect).
    """
    out = [
        b"HTTP/1.1 %d %s\r\n" % (status, reason(status)),
        b"Content-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n"
        % (content_type, len(body)),
    ]
    for name, value in headers:
        out.append(b"%s: %s\r\n" % (name, value))
    out.append(b"\r\n")
    out.append(body)
    return b"".join(out)
