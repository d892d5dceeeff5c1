"""
Tests for L{haikutx.runtime.frames}: a C{REQUEST} frame made of a request's
part and its handler's, encoded once.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from haikutx.child import wire
from haikutx.runtime import frames
from haikutx.runtime.frames import RequestFrames
from haikutx.runtime.loader import HandlerSource

REQUEST = {
    "method": "GET", "url": "/?x=1", "headers": [["Host", "x"], ["X-É", "\u00e9"]],
    "remote_addr": "127.0.0.1", "protocol": "HTTP/1.1", "console": "none",
    "max_console": 4096, "debug": False, "body_length": 0, "language": "python",
}


def _decoded(frame: bytes) -> dict:
    [(kind, payload)] = list(wire.FrameReader().feed(frame))
    assert kind == wire.REQUEST
    return json.loads(payload)


class RequestFramesTests(SynchronousTestCase):
    """
    Tests for L{RequestFrames}.
    """

    def test_members(self) -> None:
        """
        The frame holds the request's members and the handler's (its URL,
        its code as text, undecodable bytes escaped as the child reads
        them, its command line), as one JSON object.
        """
        source = "res.end('h\u00e9llo \"quoted\" \\\\ {}')\n".encode() + b"\xff"
        handler = HandlerSource(url="h.py", source=source)
        decoded = _decoded(RequestFrames().frame(dict(REQUEST), handler, ["sh", "-c", "x"]))
        self.assertEqual(
            decoded,
            dict(
                REQUEST, handler_url="h.py",
                source=source.decode("utf-8", "surrogateescape"), argv=["sh", "-c", "x"],
            ),
        )
        self.assertEqual(
            decoded["source"].encode("utf-8", "surrogateescape"), source
        )

    def test_handler_part_once(self) -> None:
        """
        A handler's part is encoded once for all its requests; again when
        its code or its command line changes; a handler too large to keep
        is encoded for each request, and still right.
        """
        encoded = []
        real = frames._encode

        def counting(value):
            if "source" in value:
                encoded.append(value["source"])
            return real(value)

        self.patch(frames, "_encode", counting)
        made = RequestFrames()
        handler = HandlerSource(url="h.py", source=b"one\n")
        for _ in range(3):
            self.assertEqual(_decoded(made.frame(dict(REQUEST), handler, None))["source"], "one\n")
        self.assertEqual(encoded, ["one\n"])
        changed = HandlerSource(url="h.py", source=b"two\n")
        self.assertEqual(_decoded(made.frame(dict(REQUEST), changed, None))["source"], "two\n")
        self.assertEqual(_decoded(made.frame(dict(REQUEST), changed, ["x"]))["argv"], ["x"])
        self.assertEqual(len(encoded), 3)
        large = HandlerSource(url="big.py", source=b"x" * (frames.KEPT_SIZE + 1))
        for _ in range(2):
            self.assertEqual(
                len(_decoded(made.frame(dict(REQUEST), large, None))["source"]),
                frames.KEPT_SIZE + 1,
            )
        self.assertEqual(len(encoded), 5)

    def test_bounded(self) -> None:
        """
        At most L{frames.KEPT} handlers' parts are kept.
        """
        made = RequestFrames()
        for i in range(frames.KEPT * 3):
            handler = HandlerSource(url=f"h{i}.py", source=b"x\n")
            self.assertEqual(_decoded(made.frame(dict(REQUEST), handler, None))["handler_url"],
                             f"h{i}.py")
            self.assertLessEqual(len(made._parts), frames.KEPT)


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


class EncodeTests(SynchronousTestCase):
    """
    The frames' JSON is the standard library encoder's, byte for byte.
    """

    @given(st.dictionaries(st.text(), _VALUES))
    def test_as_json(self, value: dict) -> None:
        """
        Any value (text beyond ASCII, numbers, booleans, C{None}, lists and
        objects) is encoded as C{json.dumps} with compact separators does.
        """
        self.assertEqual(
            frames._encode(value), json.dumps(value, separators=(",", ":")).encode("ascii")
        )

    def test_not_json(self) -> None:
        """
        A value JSON cannot hold is refused with C{TypeError}, as by the
        encoder.
        """
        self.assertRaises(TypeError, frames._encode, {"x": object()})
