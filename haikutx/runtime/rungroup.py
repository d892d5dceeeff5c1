# -*- test-case-name: haikutx.test.test_stdio -*-
"""
The server's side of a worker slot's cgroup (L{haikutx.sandbox.cgroup}):
each child its zygote forks joins the slot's group before its first
request, so every process its handlers start is born in it; what is left
in the group is killed when the child ends; and when the group's processes
together reach their memory limit, the child is killed with all of them,
the cause named.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from haikutx.sandbox.cgroup import RunGroup


@implementer(IReadDescriptor)
class _Readable:
    """
    An eventfd in the reactor: C{callback} runs when it becomes readable.
    """

    def __init__(self, fd: int, callback: Any) -> None:
        self._fd = fd
        self._callback = callback

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return
        except OSError:
            pass
        self._callback()

    def connectionLost(self, reason: Any) -> None:
        pass

    def logPrefix(self) -> str:
        return "RunGroup"


class SlotGroup:
    """
    One slot's cgroup, driven by its L{haikutx.runtime.worker.WorkerProtocol}:
    each child gets a group of its own beneath the slot's
    (C{slot<N>/child<pid>}), so that killing what one child left can never
    touch the next child, which the zygote forks at once.

    @param reactor: the reactor that watches the memory notification.
    @param group: the slot's group (made by its zygote).
    @param max_tasks: tasks a child's group may hold at once.
    @param max_memory: memory a child's group may use, in bytes.
    """

    log = Logger()

    def __init__(
        self, reactor: Any, group: RunGroup, max_tasks: int, max_memory: int | None
    ) -> None:
        self._reactor = reactor
        self.group = group
        self._max_tasks = max_tasks
        self._max_memory = max_memory
        self._children: dict[int, tuple[RunGroup, _Readable | None]] = {}
        self._retries: dict[tuple[str, ...], tuple[RunGroup, Any]] = {}
        self._broken = False

    def admit(self, worker: Any, child: Any) -> None:
        """
        Put a new child in a group of its own, before its first request.
        """
        if self._broken:
            return
        try:
            group = RunGroup.create(
                self.group.directories, f"child{child.pid}", self._max_tasks, self._max_memory
            )
            group.join(child.pid)
        except OSError as e:
            self._broken = True
            self.log.warn(
                "worker {worker_pid}: its slot's cgroup cannot be used ({reason}): "
                "its processes are not bounded together",
                worker_pid=worker.pid,
                reason=str(e),
            )
            return
        watch = None
        try:
            events = group.oom_notifier()
        except OSError:
            events = None
        if events is not None:
            watch = _Readable(events, lambda: self._out_of_memory(worker, child, group))
            self._reactor.addReader(watch)
        self._children[child.pid] = (group, watch)

    def child_ended(self, pid: int) -> None:
        """
        A child has ended: kill what its handlers left, remove its group.
        """
        entry = self._children.pop(pid, None)
        if entry is None:
            return
        group, watch = entry
        if watch is not None:
            self._reactor.removeReader(watch)
            os.close(watch.fileno())
        group.kill()
        self._remove(group, 20)

    def _remove(self, group: RunGroup, tries: int) -> None:
        self._retries.pop(tuple(group.directories.values()), None)
        try:
            for directory in group.directories.values():
                if os.path.isdir(directory):
                    os.rmdir(directory)
        except OSError:
            # Its last processes are still exiting: try again shortly.
            group.kill()
            if tries > 0:
                self._retries[tuple(group.directories.values())] = (
                    group, self._reactor.callLater(0.05, self._remove, group, tries - 1)
                )

    def _out_of_memory(self, worker: Any, child: Any, group: RunGroup) -> None:
        limit = group.memory_limit()
        size = f" of {limit >> 20} MiB" if limit else ""
        worker.kill_child(
            child, f"was killed: its processes together exceeded the memory limit{size}"
        )
        group.kill()

    def stop(self) -> None:
        """
        The slot's zygote has ended: end every child's group.
        """
        for pid in list(self._children):
            self.child_ended(pid)
        for group, call in list(self._retries.values()):
            call.cancel()
            group.remove()
        self._retries.clear()
        self.group.kill()
