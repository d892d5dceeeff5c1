# -*- test-case-name: haikutx.test.test_dates -*-
"""
The C{Date} header's value (L{http_date}), formatted once a second rather
than for every response: the one clock of the servers that answer HTTP
themselves (the job API's channel, the runtime's requests).
"""

from __future__ import annotations

from collections.abc import Callable
from time import time

from twisted.web.http import datetimeToString


class HTTPDate:
    """
    The current time as an HTTP date (twisted.web's C{datetimeToString}),
    formatted again only when the second changes.

    @param clock: the wall clock, in seconds since the epoch.
    """

    __slots__ = ("_clock", "_second", "_text")

    def __init__(self, clock: Callable[[], float] = time) -> None:
        self._clock = clock
        self._second = -1
        self._text = b""

    def __call__(self) -> bytes:
        second = int(self._clock())
        if second != self._second:
            self._second = second
            self._text = datetimeToString(second)
        return self._text


#: The process's C{Date}: C{http_date()} is the value for a response now.
http_date = HTTPDate()
