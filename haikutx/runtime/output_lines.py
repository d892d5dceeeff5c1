# -*- test-case-name: haikutx.test.test_pool -*-
"""
What a worker slot's processes write, logged a line at a time: the
zygote's standard output and error, and each child's output as its zygote
forwards it (C{OUTPUT} frames), a partial line kept until its end comes (or
the child's does).
"""

from __future__ import annotations

from typing import Any


class OutputLines:
    """
    Log the lines a slot's zygote and children write, as C{info} events of
    the slot's logger.

    @param log: the slot's logger (bound to it).
    @param worker: the slot (its C{pid} is the zygote's, in each event).
    """

    def __init__(self, log: Any, worker: Any) -> None:
        self.log = log
        self._worker = worker
        self._zygote: dict[int, bytes] = {1: b"", 2: b""}
        self._children: dict[int, bytes] = {}

    def zygote_wrote(self, fd: int, data: bytes) -> None:
        """
        The zygote wrote C{data} to its stdout (1) or stderr (2).
        """
        if fd not in self._zygote:
            return
        lines = (self._zygote[fd] + data).split(b"\n")
        self._zygote[fd] = lines.pop()
        for line in lines:
            self.log.info(
                "worker {worker_pid} {stream}: {line}",
                worker_pid=self._worker.pid,
                stream="stdout" if fd == 1 else "stderr",
                line=line.decode("utf-8", "replace"),
            )

    def child_wrote(self, pid: int, data: bytes, live: bool) -> None:
        """
        Child C{pid} wrote C{data}; C{live} if its end is still to come
        (else its partial line is logged now).
        """
        lines = (self._children.get(pid, b"") + data).split(b"\n")
        rest = lines.pop()
        if rest and live:
            self._children[pid] = rest
        else:
            # A retired child's end is not reported: keep no partial line.
            self._children.pop(pid, None)
            if rest:
                lines.append(rest)
        for line in lines:
            self.log.info(
                "worker {worker_pid} process {child_pid} {stream}: {line}",
                worker_pid=self._worker.pid,
                child_pid=pid,
                stream="output",
                line=line.decode("utf-8", "replace"),
            )

    def child_ended(self, pid: int) -> None:
        """
        Child C{pid} has ended: log its partial line, if any.
        """
        rest = self._children.pop(pid, b"")
        if rest:
            self.child_wrote(pid, rest + b"\n", False)
