# -*- test-case-name: haikutx.test.test_logs -*-
"""
Log observers for twistd's own C{--logger} option.

    twistd -n --logger haikutx.logs.json haiku ...

writes every log event as one line of JSON on standard output, in
twisted.logger's JSON form (L{twisted.logger.eventAsJSON}), for log shippers:
each line loads back with L{twisted.logger.eventFromJSON}.
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import FileLogObserver, ILogObserver, eventAsJSON


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
