# -*- test-case-name: haikutx.test.test_console -*-
"""
Console capture: the bounded buffer of a handler's console text and the
encoding of that text into an HTTP header or trailer (SPEC §2.2).

Standard library only: the worker process imports it.
"""

from __future__ import annotations

from urllib.parse import quote

#: Console modes named by C{x-haiku-console}.
MODES = ("none", "body", "header", "trailer")

#: The response header (and trailer) carrying console text.
CONSOLE_HEADER = "x-haiku-console"

_LITERAL = "-_.!~*'()"


def console_mode(value: str | None) -> str:
    """
    The console mode named by C{value}; an unknown one is C{none}.
    """
    return value if value in MODES else "none"


def encode_console(text: str) -> str:
    """
    Percent-encode console text as JavaScript's C{encodeURIComponent} does,
    then turn every C{%20} back into a space.

    @param text: the console text.
    @return: the encoded text, safe in a header value.
    """
    return quote(text, safe=_LITERAL, encoding="utf-8").replace("%20", " ")


class ConsoleBuffer:
    """
    The most recent console bytes of one request.

    @ivar limit: bytes kept; 0 keeps all.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._data = bytearray()
        self.dropped = 0

    def append(self, text: str) -> None:
        """
        Add console text, dropping the oldest bytes beyond the limit.
        """
        self._data += text.encode("utf-8", "surrogateescape")
        if self.limit and len(self._data) > self.limit:
            excess = len(self._data) - self.limit
            del self._data[:excess]
            self.dropped += excess

    def text(self) -> str:
        """
        The kept console text (a multi-byte character cut by the limit is
        replaced).
        """
        return bytes(self._data).decode("utf-8", "replace")

    def __len__(self) -> int:
        return len(self._data)
