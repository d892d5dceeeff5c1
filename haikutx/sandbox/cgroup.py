# -*- test-case-name: haikutx.test.test_cgroup -*-
"""
Control groups (cgroup v1) that hold every process a stdio handler starts:
the C{pids} controller bounds how many tasks (processes and threads) a
run has at once (C{--maxprocs}), the C{memory} controller bounds their
memory together (C{--maxmemory}), and listing a group finds every process
a run left behind, including those that called C{setsid} or forked twice,
so that all of them end with the run.

The layout, beneath this process's own cgroup in each hierarchy (so that
whatever limits the server's own cgroup has still hold)::

    <hierarchy>/<own cgroup>/haikutx-<server pid>-<n>/slot<N>/g<M>

(C{n} counts the pools of one server process, which may run several.)

The server makes the top directory (L{CgroupTree}); each worker slot's
zygote makes and limits its slot's group (L{RunGroup}) before it enters
its sandbox; the server puts each child the zygote forks in its slot's
group before the child's first request (so everything the child starts is
born in it), kills what is left in it when the child ends, and watches its
memory.  Processes never leave a group by themselves: the group's files
are root's, and the sandbox writes no files.

Standard library only: the zygote and the worker import this.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

#: The controllers a run group needs.
CONTROLLERS = ("pids", "memory")

#: Tasks of a worker's own in its slot's group, beyond C{--maxprocs}: its
#: main thread (it watches its interpreters through pidfds, with no thread:
#: L{haikutx.child.stdio.watch_interpreters}).
WORKER_TASKS = 1

#: Rounds of listing and killing before L{RunGroup.kill} gives up (each
#: round kills every task listed; a task killed cannot fork any more).
KILL_ROUNDS = 50

_PREFIX = "haikutx-"

#: Numbers the trees made by this process (a process may run several pools).
_TREES = itertools.count()


def hierarchies(
    mounts: str = "/proc/self/mounts", own: str = "/proc/self/cgroup"
) -> tuple[dict[str, str], dict[str, str]]:
    """
    Find this process's own cgroup directory in the cgroup v1 hierarchy of
    each controller of L{CONTROLLERS}.

    @param mounts: the mount table to read.
    @param own: this process's cgroup memberships.
    @return: C{(found, missing)}: the directory of each usable controller,
        and for each missing one why it cannot be used.
    """
    mounted: dict[str, str] = {}
    missing: dict[str, str] = {}
    try:
        with open(mounts) as f:
            lines = f.read().splitlines()
    except OSError as e:
        lines = []
        missing["all"] = f"cannot read {mounts}: {e.strerror}"
    for line in lines:
        parts = line.split()
        if len(parts) < 4 or parts[2] != "cgroup":
            continue
        options = parts[3].split(",")
        for controller in CONTROLLERS:
            if controller in options:
                if "ro" in options:
                    missing.setdefault(controller, f"cgroup v1 {controller} is mounted read-only")
                else:
                    mounted.setdefault(controller, parts[1])
    paths: dict[str, str] = {}
    try:
        with open(own) as f:
            for line in f.read().splitlines():
                number, names, path = line.split(":", 2)
                for name in names.split(","):
                    paths[name] = path
    except (OSError, ValueError):
        pass
    found: dict[str, str] = {}
    for controller in CONTROLLERS:
        if controller not in mounted:
            missing.setdefault(controller, f"no cgroup v1 {controller} hierarchy is mounted")
            continue
        directory = os.path.join(mounted[controller], paths.get(controller, "/").lstrip("/"))
        if not os.access(directory, os.W_OK):
            missing[controller] = f"cannot create cgroups in {directory} (not root?)"
            continue
        missing.pop(controller, None)
        found[controller] = directory.rstrip("/")
    return found, missing


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode("ascii"))
    finally:
        os.close(fd)


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            data = os.read(fd, 65536)
            if not data:
                return b"".join(chunks).decode("ascii", "replace")
            chunks.append(data)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class RunGroup:
    """
    One group of processes, a directory in each controller's hierarchy:
    the processes of one worker slot's runs.

    @ivar directories: the group's directory for each controller.
    """

    directories: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(
        cls, parents: dict[str, str], name: str, max_tasks: int | None, max_memory: int | None
    ) -> RunGroup:
        """
        Make (or take over) the group C{name} beneath C{parents} and set its
        limits.  Processes a former holder of the group left are killed.

        @param parents: a directory for each controller.
        @param name: the group's name, for instance C{slot0}.
        @param max_tasks: C{pids.max}: tasks at once, or C{None} for none.
        @param max_memory: C{memory.limit_in_bytes} (and the memory+swap
            limit where swap is accounted), or C{None} for none.
        @raise OSError: if a directory or a limit cannot be written.
        """
        directories = {}
        for controller, parent in parents.items():
            directory = os.path.join(parent, name)
            try:
                os.mkdir(directory, 0o755)
            except FileExistsError:
                pass
            directories[controller] = directory
        group = cls(directories)
        group.kill()
        if "pids" in directories and max_tasks is not None:
            _write(os.path.join(directories["pids"], "pids.max"), str(max_tasks))
        if "memory" in directories and max_memory is not None:
            memory = directories["memory"]
            limit = os.path.join(memory, "memory.limit_in_bytes")
            swap = os.path.join(memory, "memory.memsw.limit_in_bytes")
            if os.path.exists(swap) and int(_read(limit)) > max_memory:
                # memory+swap must stay at least memory: lower memory first.
                _write(limit, str(max_memory))
                _write(swap, str(max_memory))
            else:
                if os.path.exists(swap):
                    _write(swap, str(max_memory))
                _write(limit, str(max_memory))
        return group

    @property
    def controllers(self) -> tuple[str, ...]:
        """
        The controllers this group has a directory in.
        """
        return tuple(self.directories)

    def join(self, pid: int = 0) -> None:
        """
        Move a process into the group (C{0}: the calling process); its
        children are born in it.  Called as root.

        @raise OSError: if the kernel refuses (for instance C{EAGAIN} when
            the group is full).
        """
        text = str(pid or os.getpid())
        for directory in self.directories.values():
            _write(os.path.join(directory, "cgroup.procs"), text)

    def pids(self) -> set[int]:
        """
        The processes in the group now.
        """
        for directory in self.directories.values():
            try:
                return {int(p) for p in _read(os.path.join(directory, "cgroup.procs")).split()}
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return set()
                raise
        return set()

    def tasks(self) -> int | None:
        """
        The tasks the group is charged for now (C{pids.current}), exited
        ones not yet reaped included; C{None} without a C{pids} controller.
        """
        return self._read_int("pids", "pids.current")

    def kill(self, keep: Iterable[int] = (), wait: float = 0.0) -> bool:
        """
        Kill every process in the group (with C{SIGKILL}) but C{keep}.
        Each pid read from the group is opened as a pidfd and signalled only
        if it is still listed after that, so a pid reused by a process
        outside the group is never signalled.

        @param keep: pids to spare (the caller).
        @param wait: seconds to wait, at most, for the killed processes to
            be gone (0: do not wait; in the reactor).
        @return: whether the group is empty (but for C{keep}).
        """
        spare = set(keep)
        signalled: set[int] = set()
        deadline = None
        for _ in range(KILL_ROUNDS * 4):
            listed = self.pids() - spare
            if not listed:
                return True
            fresh = listed - signalled
            if not fresh:
                # Only processes that are dying: wait for them, briefly.
                if deadline is None:
                    deadline = time.monotonic() + wait
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.001)
                continue
            handles = {}
            for pid in fresh:
                try:
                    handles[pid] = os.pidfd_open(pid)
                except OSError:
                    pass  # gone already
            try:
                still = self.pids()
                for pid, handle in handles.items():
                    if pid in still:
                        try:
                            signal.pidfd_send_signal(handle, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                        signalled.add(pid)
            finally:
                for handle in handles.values():
                    os.close(handle)
        return not (self.pids() - spare)

    def oom_kills(self) -> int:
        """
        How many processes of the group the kernel killed for exceeding
        its memory limit, so far (0 without a memory controller).
        """
        directory = self.directories.get("memory")
        if directory is None:
            return 0
        try:
            text = _read(os.path.join(directory, "memory.oom_control"))
        except OSError:
            return 0
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
        return 0

    def memory_limit(self) -> int | None:
        """
        The group's memory limit in bytes, or C{None} without one.
        """
        return self._read_int("memory", "memory.limit_in_bytes")

    def _read_int(self, controller: str, name: str) -> int | None:
        """
        The integer in the group's file C{name} of C{controller}, or
        C{None} without that controller (or when it cannot be read).
        """
        directory = self.directories.get(controller)
        if directory is None:
            return None
        try:
            return int(_read(os.path.join(directory, name)))
        except (OSError, ValueError):
            return None

    def oom_notifier(self) -> int | None:
        """
        An eventfd that becomes readable when the group's processes
        together reach their memory limit (C{cgroup.event_control} on
        C{memory.oom_control}); closing it ends the notification.

        @return: the eventfd (non-blocking, close-on-exec), or C{None}
            without a memory controller.
        @raise OSError: if the kernel refuses.
        """
        directory = self.directories.get("memory")
        if directory is None:
            return None
        events = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            control = os.open(
                os.path.join(directory, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC
            )
            try:
                _write(os.path.join(directory, "cgroup.event_control"), f"{events} {control}")
            finally:
                os.close(control)
        except BaseException:
            os.close(events)
            raise
        return events

    def remove(self) -> None:
        """
        Kill what is left and remove the group's directories, and the
        groups beneath it first.
        """
        for controller, directory in self.directories.items():
            for path in _subgroups(directory):
                RunGroup({controller: path}).remove()
        self.kill(wait=0.5)
        for directory in self.directories.values():
            _rmdir(directory)


def _subgroups(directory: str) -> list[str]:
    """
    The paths of the groups directly beneath C{directory} (none when it
    is gone).
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    paths = (os.path.join(directory, name) for name in names)
    return [path for path in paths if os.path.isdir(path)]


def _rmdir(directory: str) -> None:
    # A cgroup whose last process is still exiting cannot be removed yet.
    for _ in range(KILL_ROUNDS):
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
        time.sleep(0.002)


@dataclass(frozen=True)
class CgroupTree:
    """
    The server's own top group in each hierarchy, parent of its slots'
    L{RunGroup}s.

    @ivar directories: the top directory for each controller.
    @ivar missing: for each controller of L{CONTROLLERS} that cannot be
        used, why.
    """

    directories: dict[str, str]
    missing: dict[str, str]

    @classmethod
    def create(
        cls,
        pid: int | None = None,
        found: tuple[dict[str, str], dict[str, str]] | None = None,
    ) -> CgroupTree:
        """
        Make a top group C{haikutx-<pid>-<n>} of its own in each usable
        hierarchy, removing first the empty top groups of servers that are
        gone.

        @param pid: the server's pid (default: this process's).
        @param found: from L{hierarchies} (default: look now).
        """
        pid = os.getpid() if pid is None else pid
        available, missing = hierarchies() if found is None else found
        directories = {}
        name = f"{_PREFIX}{pid}-{next(_TREES)}"
        for controller, parent in available.items():
            _sweep(parent)
            directory = os.path.join(parent, name)
            try:
                os.mkdir(directory, 0o755)
            except FileExistsError:
                pass
            except OSError as e:
                missing[controller] = f"cannot create a cgroup in {parent}: {e.strerror}"
                continue
            directories[controller] = directory
        return cls(directories, dict(missing))

    def complete(self) -> bool:
        """
        Whether every controller of L{CONTROLLERS} is usable.
        """
        return all(c in self.directories for c in CONTROLLERS)

    def slot(self, number: int) -> RunGroup:
        """
        The group of worker slot C{number} (made by its zygote).
        """
        return RunGroup({c: os.path.join(d, f"slot{number}") for c, d in self.directories.items()})

    def remove(self) -> None:
        """
        Kill every process left in every slot and remove the groups.
        """
        for directory in self.directories.values():
            if not os.path.isdir(directory):
                continue
            for path in _subgroups(directory):
                RunGroup({"any": path}).remove()
            _rmdir(directory)


def _sweep(parent: str) -> None:
    """
    Remove the top groups of servers that are gone (empty ones only: a
    group that still holds processes is left for its owner).
    """
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        owner = name[len(_PREFIX):].split("-", 1)[0]
        if not name.startswith(_PREFIX) or not owner.isdigit():
            continue
        pid = int(owner)
        if os.path.exists(f"/proc/{pid}"):
            continue
        top = os.path.join(parent, name)
        try:
            for slot in os.listdir(top):
                path = os.path.join(top, slot)
                if os.path.isdir(path):
                    for name in os.listdir(path):
                        if os.path.isdir(os.path.join(path, name)):
                            os.rmdir(os.path.join(path, name))
                    os.rmdir(path)
            os.rmdir(top)
        except OSError:
            pass
