# -*- test-case-name: haikutx.test.test_frames -*-
"""
The C{REQUEST} frame a child is sent (L{haikutx.child.wire}), its handler's
part encoded once per handler.

The frame's JSON object holds the request (method, URL, headers, ...) and
the handler (its URL, its code, the command line that runs it).  The
handler's part is the same for every request of that handler, and its code
the largest member: decoding and escaping it for each request costs in
proportion to its size (5 us for hello, 25 us for 10 KB of code).  Here it
is encoded once and joined to each request's part: the same JSON object,
members in another order.
"""

from __future__ import annotations

import json
from json.encoder import c_make_encoder, encode_basestring_ascii
from typing import Any

from haikutx.child import wire
from haikutx.runtime.loader import HandlerSource

#: Handlers whose part is kept, at most, and the largest part kept (bytes):
#: a bound on the memory held (a larger handler is encoded per request).
KEPT = 64
KEPT_SIZE = 64 * 1024


#: Compact JSON, as ASCII text.
_ENCODER = json.JSONEncoder(separators=(",", ":"))
_ENCODE = _ENCODER.encode

#: The same encoder's C part, made once (C{JSONEncoder.encode} makes it
#: anew at each call, half the cost of a request's head), without the
#: check for circular values (a head holds none).
_C_ENCODE = (
    c_make_encoder(
        None, _ENCODER.default, encode_basestring_ascii, None, ":", ",", False, False, True
    )
    if c_make_encoder is not None
    else None
)


def _encode(value: Any) -> bytes:
    if _C_ENCODE is None:
        return _ENCODE(value).encode("ascii")
    return "".join(_C_ENCODE(value, 0)).encode("ascii")


class RequestFrames:
    """
    Make C{REQUEST} frames, remembering the handler part of the few
    handlers served last (by URL, checked against the code: by identity
    first, a handler the loader keeps being the same object each time).
    """

    def __init__(self) -> None:
        self._parts: dict[tuple[str, Any], tuple[bytes, bytes]] = {}

    def frame(self, request: dict[str, Any], handler: HandlerSource, argv: Any) -> bytes:
        """
        The C{REQUEST} frame of C{request} (its head's members, which name
        none of the handler's) for C{handler}, run by C{argv}.
        """
        part = self._part(handler, argv)
        payload = _encode(request)
        return wire.encode(wire.REQUEST, payload[:-1] + b"," + part + b"}")

    def _part(self, handler: HandlerSource, argv: Any) -> bytes:
        """
        The handler's members, encoded (a JSON object's members, without
        its braces).
        """
        key = (handler.url, tuple(argv) if isinstance(argv, list) else argv)
        source = handler.source
        known = self._parts.get(key)
        if known is not None and (known[0] is source or known[0] == source):
            return known[1]
        part = _encode(
            {
                "handler_url": handler.url,
                "source": source.decode("utf-8", "surrogateescape"),
                "argv": argv,
            }
        )[1:-1]
        if len(part) <= KEPT_SIZE:
            if len(self._parts) >= KEPT:
                self._parts.clear()
            self._parts[key] = (source, part)
        return part
