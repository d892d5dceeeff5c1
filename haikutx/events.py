# -*- test-case-name: haikutx.test.test_logs -*-
"""
Log events made cheaply, for those emitted for every request or job: the
runtime's one per request (L{haikutx.runtime.resource}) and, with
C{--maxrequests 1}, one per recycle (L{haikutx.runtime.pool}); the job
runner's per job (L{haikutx.jobs.running}, L{haikutx.jobs.ends}).

Each is the event C{Logger.emit} would make, with its text made by the
caller (no field left for an observer to format: a log format's fields
cost a text observer several times as much) and given to the logger's
observer directly: C{emit} checks its (constant) level against every level,
sorted anew, on each call.  Its system (what a text log shows for an event
without one: its namespace and level) is given too, made once per logger
and level.  Every field stays in the event for structured logs.

Its format has no fields, so the event comes flattened already (an empty
C{log_flattened}, as L{twisted.logger.eventAsJSON} would make it): a text
observer then reads the text as it is, not through C{string.Formatter},
written in Python.
"""

from __future__ import annotations

from time import time
from typing import Any

from twisted.logger import Logger, LogLevel


def literal(text: str) -> str:
    """
    C{text} as a log format that formats to itself (its braces doubled).
    """
    if "{" in text or "}" in text:
        return text.replace("{", "{{").replace("}", "}}")
    return text


class EventEmitter:
    """
    Emit events of one level, with text made by the caller, through one
    logger.

    @param log: the logger (bound once: a class's L{Logger} makes a new one
        at each attribute access).
    @param level: the events' level.
    """

    def __init__(self, log: Logger, level: LogLevel) -> None:
        self._log = log
        self._level = level
        self._system = f"{log.namespace}#{level.name}"

    def __call__(self, text: str, fields: dict[str, Any]) -> None:
        """
        Emit one event whose text is C{text} (any braces in it are kept as
        they are) and whose other fields are C{fields} (a new dict, which
        becomes the event).
        """
        log = self._log
        fields["log_logger"] = log
        fields["log_level"] = self._level
        fields["log_namespace"] = log.namespace
        fields["log_source"] = log.source
        fields["log_format"] = literal(text)
        fields["log_flattened"] = {}
        fields["log_time"] = time()
        fields["log_system"] = self._system
        log.observer(fields)
