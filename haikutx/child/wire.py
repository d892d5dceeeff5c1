# -*- test-case-name: haikutx.test.test_wire -*-
"""
The framing between the server and a worker process.

A frame is a 4-byte big-endian length, then one byte naming its kind, then
the payload (length counts the kind byte and the payload).  Control frames
travel on their own file descriptors (the server writes the worker's fd 3
and reads its fd 4), never on the handler's stdout or stderr, so nothing a
handler prints can forge one.

This module is imported by the worker process, which must stay lean: it uses
the standard library only.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Iterator

_HEADER = struct.Struct(">IB")

#: Largest frame accepted; larger ones are a protocol error.
MAX_FRAME = 16 * 1024 * 1024

#: Body bytes carried by one data frame.
CHUNK = 64 * 1024

# Server to worker.
REQUEST = ord("R")  #: JSON: the request head, the handler and its limits.
BODY = ord("B")  #: bytes: a piece of the request body.
BODY_END = ord("E")  #: empty: the request body is complete.
CHALLENGE = ord("C")  #: bytes: a heartbeat challenge to echo.
RETIRE = ord("Q")  #: empty: exit now, idle; the zygote forks a fresh process.

# Worker to server.
READY = ord("Y")  #: JSON: the worker is ready for a request ({"pid": ...}).
HEAD = ord("H")  #: JSON: response status and headers.
DATA = ord("D")  #: bytes: a piece of the response body.
FINISH = ord("F")  #: JSON: the response is complete ({"trailers": [...]}).
FAIL = ord("X")  #: JSON: the runtime answers instead ({"status", "message"}).
ANSWER = ord("A")  #: bytes: the echoed heartbeat challenge.
CONSOLE = ord("L")  #: text: a console line, sent only with --debug.
SANDBOX = ord("S")  #: JSON: the zygote's sandbox layers, sent once at start.


class FrameError(Exception):
    """
    The peer sent something that is not a frame.
    """


def encode(kind: int, payload: bytes = b"") -> bytes:
    """
    Encode one frame.

    @param kind: the frame kind, one of this module's constants.
    @param payload: the frame's payload.
    @return: the frame's bytes.
    """
    return _HEADER.pack(len(payload) + 1, kind) + payload


def encode_json(kind: int, value: Any) -> bytes:
    """
    Encode one frame whose payload is C{value} as compact JSON.
    """
    return encode(kind, json.dumps(value, separators=(",", ":")).encode("utf-8"))


class FrameReader:
    """
    Split a byte stream into frames.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """
        Add received bytes and yield every complete frame.

        @param data: bytes from the peer.
        @return: an iterator of C{(kind, payload)} pairs.
        @raise FrameError: for a frame too large or empty.
        """
        buffer = self._buffer
        buffer += data
        offset = 0
        size = len(buffer)
        while size - offset >= 5:
            length, kind = _HEADER.unpack_from(buffer, offset)
            if length < 1 or length > MAX_FRAME:
                raise FrameError(f"bad frame length {length}")
            end = offset + 4 + length
            if end > size:
                break
            yield kind, bytes(buffer[offset + 5 : end])
            offset = end
        del buffer[:offset]
