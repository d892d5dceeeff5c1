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
    each child runs in a group of its own beneath the slot's
    (C{slot<N>/g<M>}), so that killing what one child left can never touch
    the next child, which the zygote forks at once.  Groups are reused
    once their child has ended and they are empty (making a memory cgroup
    costs about 0.5 ms; joining one 0.2 ms).

    @param reactor: the reactor that watches the memory notifications.
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
        self._free: list[int] = []
        self._groups: list[RunGroup] = []
        self._watches: list[_Readable] = []
        self._owners: dict[int, tuple[Any, Any]] = {}
        self._by_pid: dict[int, int] = {}
        self._broken = False

    def _new_group(self) -> int:
        number = len(self._groups)
        group = RunGroup.create(
            self.group.directories, f"g{number}", self._max_tasks, self._max_memory
        )
        self._groups.append(group)
        try:
            events = group.oom_notifier()
        except OSError:
            events = None
        if events is not None:
            watch = _Readable(events, lambda: self._out_of_memory(number))
            self._watches.append(watch)
            self._reactor.addReader(watch)
        return number

    def _empty_group(self) -> int:
        """
        A free group that its former processes have all left (killed ones
        count against its task limit until they are reaped), or a new one.
        A group still charged for a task is killed again and left for
        later.  One read of C{pids.current} (0.02 ms) tells an empty
        group; listing C{cgroup.procs} costs 0.08 ms.
        """
        for number in list(self._free):
            group = self._groups[number]
            tasks = group.tasks()
            if tasks == 0 or (tasks is None and not group.pids()):
                self._free.remove(number)
                return number
            group.kill()
        return self._new_group()

    def admit(self, worker: Any, child: Any) -> None:
        """
        Put a new child in a group of its own, before its first request.
        """
        if self._broken:
            return
        try:
            number = self._empty_group()
            self._groups[number].join(child.pid)
        except OSError as e:
            self._broken = True
            self.log.warn(
                "worker {worker_pid}: its slot's cgroup cannot be used ({reason}): "
                "its processes are not bounded together",
                worker_pid=worker.pid,
                reason=str(e),
            )
            return
        self._owners[number] = (worker, child)
        self._by_pid[child.pid] = number

    def child_ended(self, pid: int, leftovers: bool = True) -> None:
        """
        A child has ended: kill what its handlers left; its group is free.

        @param leftovers: whether its handlers may have started processes
            (L{haikutx.runtime.worker.WorkerProtocol.retire} knows when
            they cannot have: then the group is not listed and killed,
            three reads of C{cgroup.procs} on the reactor thread; it is
            checked empty before it is used again).
        """
        number = self._by_pid.pop(pid, None)
        if number is None:
            return
        self._owners.pop(number, None)
        if leftovers:
            self._groups[number].kill()
        self._free.append(number)

    def _out_of_memory(self, number: int) -> None:
        group = self._groups[number]
        owner = self._owners.get(number)
        if owner is not None:
            limit = group.memory_limit()
            size = f" of {limit >> 20} MiB" if limit else ""
            worker, child = owner
            worker.kill_child(
                child, f"was killed: its processes together exceeded the memory limit{size}"
            )
        group.kill()

    def stop(self) -> None:
        """
        The slot's zygote has ended: stop watching, kill what is left.
        """
        for watch in self._watches:
            self._reactor.removeReader(watch)
            os.close(watch.fileno())
        self._watches = []
        for group in self._groups:
            group.kill()
        self.group.kill()
