# -*- test-case-name: haikutx.test.test_wire -*-
"""
The framing between the server, the zygotes and their children.

A frame is a 4-byte big-endian length, then one byte naming its kind, then
the payload (length counts the kind byte and the payload).

Each zygote has a channel to the server (its fd 3, a unix socket), which no
child keeps: on it the zygote reports its sandbox, each child it forks (the
child's pid, with the server's end of a socketpair made for that child
alone, passed with C{SCM_RIGHTS}), each child's end, and what children
write to their stdout and stderr.  Each child has its own channel (its fd
3), on which it gets requests and answers them.  The server trusts only the
zygote, which runs no handler code, about which processes exist and whether
they are fresh: a frame of the zygote's kinds on a child's channel is a
protocol error, and nothing a handler prints can forge a frame.

This module is imported by the worker process, which must stay lean: it uses
the standard library only.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

_HEADER = struct.Struct(">IB")

#: Largest frame accepted; larger ones are a protocol error.
MAX_FRAME = 16 * 1024 * 1024

#: Largest response head (L{HEAD}), trailers (L{FINISH}) or failure
#: (L{FAIL}) payload the server takes; a larger one gets the child killed (a frame of a million
#: tiny headers would hold the server's loop for seconds).
MAX_HEAD = 256 * 1024

#: Body bytes carried by one data frame.
CHUNK = 64 * 1024

# Server to child.
REQUEST = ord("R")  #: JSON: the request head, the handler and its limits.
BODY = ord("B")  #: bytes: a piece of the request body.
BODY_END = ord("E")  #: empty: the request body is complete.
CHALLENGE = ord("C")  #: bytes: a heartbeat challenge to echo.

# Child to server.
HEAD = ord("H")  #: JSON: response status and headers.
DATA = ord("D")  #: bytes: a piece of the response body.
FINISH = ord("F")  #: JSON: the response is complete ({"trailers": [...]}).
FAIL = ord("X")  #: JSON: the runtime answers instead ({"status", "message"}).
ANSWER = ord("A")  #: bytes: the echoed heartbeat challenge.
CONSOLE = ord("L")  #: text: a console line, sent only with --debug.

#: The frames a child may send; any other is a protocol error.
CHILD_SENDS = frozenset((HEAD, DATA, FINISH, FAIL, ANSWER, CONSOLE))

# Zygote to server.
SANDBOX = ord("S")  #: JSON: the zygote's sandbox layers, sent once at start.
CHILD = ord("N")  #: JSON {"pid"}, with the server's end of the child's channel
#: and a pidfd of the child (two descriptors, in that order).
ENDED = ord("Z")  #: JSON {"pid", "code", "signal"}: a child has ended (reaped).
OUTPUT = ord("O")  #: 4-byte pid, then bytes a child wrote to its stdout or stderr.

# Server to zygote.
RETIRE = ord("Q")  #: JSON {"pid", "report"}: kill that child now, fork the next;
#: report its end (L{ENDED}) only with C{"report": true}.

#: Kept for readers of old logs: a child used to announce itself; no frame
#: of this kind is accepted from anyone now.
READY = ord("Y")


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


#: One compact encoder for every frame (C{json.dumps} with separators
#: makes a new one per call).
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def encode_json(kind: int, value: Any) -> bytes:
    """
    Encode one frame whose payload is C{value} as compact JSON.
    """
    payload = _ENCODE(value).encode("utf-8")
    return _HEADER.pack(len(payload) + 1, kind) + payload


#: The payload of a L{FINISH} frame without trailers, and that frame.
NO_TRAILERS = b'{"trailers":[]}'
FINISH_NO_TRAILERS = encode(FINISH, NO_TRAILERS)


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
