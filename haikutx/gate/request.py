# -*- test-case-name: haikutx.test.test_gate -*-
"""
What the gate sends an application for a client's request: the rewritten
head, then the body, checked as it passes.
"""

from __future__ import annotations

from collections.abc import Callable

from haikutx.net.http1 import BadMessage, BodyFramer, Head, end_to_end, head_end, parse_request_head

#: Largest request head accepted, in bytes (larger: 431).
MAX_HEAD = 16384

#: Request headers that say who the client is: the gate drops what a client
#: sent and sets the C{X-Forwarded-*} ones itself.
CLIENT_IDENTITY = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
     b"x-real-ip"}
)


def take_request_head(
    buffer: bytearray, parse: Callable[[bytes], Head] = parse_request_head
) -> Head | None:
    """
    Take the request head at the start of C{buffer} (after the empty lines
    RFC 9112 2.2 allows before it) out of it, parsed.

    @param parse: the parser (a connection's L{LastHead}).

    @return: the head, or C{None} when it has not all arrived.
    @raise BadMessage: for a malformed head (400), or one larger than
        L{MAX_HEAD} (431).
    """
    while buffer[:2] == b"\r\n":
        del buffer[:2]
    end = head_end(buffer)
    if (len(buffer) if end < 0 else end) > MAX_HEAD:
        raise BadMessage(f"request head larger than {MAX_HEAD} bytes", 431)
    if end < 0:
        return None
    head = parse(bytes(buffer[:end]))
    del buffer[:end]
    return head


def forwarded_head(
    head: Head,
    target: bytes,
    port: int,
    peer: bytes,
    https: bool,
    gate_address: bytes,
    upgrade: bool,
) -> bytes:
    """
    The head sent to the application: the origin-form C{target}, the
    end-to-end fields but the client's identity claims, and the gate's own
    C{X-Forwarded-For}, C{-Proto} and C{-Host}.

    @param head: the client's request head.
    @param target: the request target for the application.
    @param port: the application's port (for a C{Host} the client did not
        send).
    @param peer: the client's address.
    @param https: whether the client connected with TLS.
    @param gate_address: C{host:port} the client connected to, the
        C{X-Forwarded-Host} of a request without C{Host}.
    @param upgrade: whether the request asks to switch protocols.
    """
    # An HTTP/1.0 client's request goes on as HTTP/1.0, so the answer is not
    # chunked (which such a client cannot read).
    out = [head.method, b" ", target, b" ", head.version, b"\r\n"]
    host = None
    # Without hop-by-hop fields (Transfer-Encoding aside) every field goes on.
    fields = end_to_end(head) if head.hop or head.chunked else head.headers
    for name, value in fields:
        if name in CLIENT_IDENTITY:
            continue
        if name == b"host":
            host = value
        out += [name, b": ", value, b"\r\n"]
    if host is None:
        out.append(b"host: localhost:%d\r\n" % port)
        host = gate_address
    if head.chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    if upgrade:
        out += [b"connection: upgrade\r\nupgrade: ", head.get(b"upgrade") or b"", b"\r\n"]
    elif head.version == b"HTTP/1.0":
        # Whatever the client wants, the application connection may serve
        # later requests (the pool).
        out.append(b"connection: keep-alive\r\n")
    out += [
        b"x-forwarded-for: ", peer,
        b"\r\nx-forwarded-proto: ", b"https" if https else b"http",
        b"\r\nx-forwarded-host: ", host, b"\r\n\r\n",
    ]
    return b"".join(out)


class RequestBody:
    """
    The body of the request being forwarded: what of the client's bytes is
    body, checked before it is passed on.

    @ivar done: the body is complete.
    """

    __slots__ = ("_framer", "_checked")

    def __init__(self, framer: BodyFramer) -> None:
        self._framer = framer
        self._checked = 0

    @property
    def done(self) -> bool:
        return self._framer.done

    def check(self, buffer: bytearray) -> None:
        """
        Check body bytes in C{buffer} without taking them (while the
        application connection is being opened).

        @raise BadMessage: for a malformed chunked body.
        """
        self._checked = self._framer.consume(buffer, self._checked)

    def take_checked(self, buffer: bytearray) -> bytes:
        """
        Remove and return from C{buffer} what L{check} checked.
        """
        checked, self._checked = self._checked, 0
        data = bytes(buffer[:checked])
        del buffer[:checked]
        return data

    def take(self, buffer: bytearray) -> bytes:
        """
        Remove and return from C{buffer} the body bytes it holds (whole,
        checked chunk lines only).

        @raise BadMessage: for a malformed chunked body.
        """
        end = self._framer.consume(buffer)
        data = bytes(buffer[:end])
        del buffer[:end]
        return data


#: The body of a request without one (no C{Content-Length}, or 0, and not
#: chunked): shared by all connections, as it holds no state (its framer is
#: done, so checking and taking leave it as it is).
NO_BODY = RequestBody(BodyFramer("none"))
