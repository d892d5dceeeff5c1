# -*- test-case-name: haikutx.test.test_logs -*-
"""
Log observers for twistd's own C{--logger} option.

    twistd -n --logger haikutx.logs.json haiku ...

writes every log event as one line of JSON on standard output, in
twisted.logger's JSON form (L{twisted.logger.eventAsJSON}), for log shippers:
each line loads back with L{twisted.logger.eventFromJSON}.

    twistd -n --logger haikutx.logs.text haiku ...

writes the lines twistd's own text observer writes (C{textFileLogObserver}'s)
on standard output, each event's time formatted once a second (L{text}).
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    eventAsJSON,
    formatEventAsClassicLogText,
    formatTime,
)


def json(out_file: IO[str] | None = None) -> ILogObserver:
    """
    A log observer writing one JSON event per line.

    twistd calls it with no argument, before it redirects standard output
    into the log, so the events go to the real standard output.

    @param out_file: where the lines go (default: standard output).
    @return: the observer.
    """
    stream = sys.stdout if out_file is None else out_file
    return FileLogObserver(stream, lambda event: eventAsJSON(event) + "\n")


class _SecondTime:
    """
    twisted.logger's C{formatTime} (its default, RFC 3339 format, to the
    second), made once for each second: what it gives depends on the
    second and the local time's offset then, both the same for every
    event within one second.
    """

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = ""

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(when)
        second = int(when)
        if when - second >= 0.999999 or when < 0:
            # Rounded to the next second by datetime (to the microsecond),
            # or before the epoch: not this second's text.
            return formatTime(when)
        if second != self._second:
            self._text = formatTime(when)
            self._second = second
        return self._text


def text(out_file: IO[str] | None = None) -> ILogObserver:
    """
    A log observer writing the text lines of twistd's own observer
    (C{textFileLogObserver}, C{formatEventAsClassicLogText}), each event's
    time formatted once a second rather than for each event: the runtime
    logs an event per request, and twisted.logger's C{formatTime} costs as
    much as the rest of its line.

    @param out_file: where the lines go (default: standard output).
    @return: the observer.
    """
    stream = sys.stdout if out_file is None else out_file
    second_time = _SecondTime()
    return FileLogObserver(
        stream, lambda event: formatEventAsClassicLogText(event, formatTime=second_time)
    )
