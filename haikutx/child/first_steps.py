# -*- test-case-name: haikutx.test.test_isolation -*-
"""
A zygote's child's first steps (L{become_child}): its own descriptors, the
per-child layers of its sandbox, then the worker every child starts from
(L{ChildStart}, made once in the zygote before its first fork).

Imported by the zygote after it has forked its egress relay, so that the
relay, a fork of the zygote that only copies bytes, does not hold (and
later copy) the pages of what children need: the worker, asyncio and the
rest of the warm-up.

Standard library only (the zygote imports it).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from haikutx.child import runner
from haikutx.sandbox._libc import PR_SET_PDEATHSIG, close_fds_except, libc

PR_SET_CHILD_SUBREAPER = 36

#: A child's exit status when its zygote was gone before it started.
EXIT_SERVER_GONE = 3

#: The exit status of a child, or a zygote, whose sandbox could not be
#: applied.
EXIT_SANDBOX_FAILED = 70


def _signals_stay_in_slot(sandbox: Any, own_uid: bool) -> bool:
    """
    Whether a stdio child may end its run's processes with C{kill(-1)}:
    it runs as its slot's own uid (not root, not a shared C{--user}), and
    Landlock scopes its signals to its own domain (ABI 6+), which its
    interpreters share: then C{kill(-1)} reaches those and nothing else.
    """
    return own_uid and sandbox.landlock_abi >= 6 and os.getuid() != 0


def _kill_all_i_may(wait: float = 0.5) -> None:
    """
    Kill every process this stdio child may signal (see
    L{_signals_stay_in_slot}): what its handlers left running; then reap
    them (this child is their subreaper), waiting at most C{wait} seconds.
    """
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    deadline = time.monotonic() + wait
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.001)


def _confiner(sandbox: Any, worker: runner.Worker, own_uid: bool) -> Any:
    """
    The function a child calls when it learns what it will run: the last
    layer for Python handlers, or for the stdio runner and its
    interpreters.
    """

    def confine(kind: str) -> None:
        try:
            if kind == "python":
                sandbox.confine_python()
            else:
                sandbox.confine_stdio()
                worker.exec_sandbox = sandbox.confine_interpreter
                if _signals_stay_in_slot(sandbox, own_uid):
                    # What a handler leaves is reparented to this child,
                    # which reaps it (a zombie counts against --maxprocs).
                    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
                    worker.end_run_processes = _kill_all_i_may
        except Exception as e:
            os.write(2, f"sandbox could not be applied: {e}\n".encode())
            os._exit(EXIT_SANDBOX_FAILED)

    return confine


class ChildStart:
    """
    What each child of a zygote starts from: the slot's sandbox and the
    worker made once, in the zygote, before the first fork (each child
    gets its own copy; its event loop's descriptors are made in the child,
    if it ever runs the loop).

    @ivar worker: the worker, with its confiner when there is a sandbox.
    """

    def __init__(self, sandbox: Any, zygote: int, own_uid: bool) -> None:
        """
        @param sandbox: the slot's sandbox (L{haikutx.sandbox.SlotSandbox}),
            or C{None}.
        @param zygote: the zygote's pid (a child whose parent it is not
            has lost its zygote).
        @param own_uid: whether each child runs as a uid of its slot's own.
        """
        self.sandbox = sandbox
        self.zygote = zygote
        self.worker = runner.Worker(0, runner.CHANNEL)
        if sandbox is not None:
            self.worker.confine = _confiner(sandbox, self.worker, own_uid)

    def become_child(self, channel: int, output: int) -> None:
        """
        In a freshly forked child, zygote code only: give it its own
        descriptors (0 C{/dev/null}, 1 and 2 its output pipe, 3 its
        channel) and nothing else, apply the per-child layers, then serve;
        never returns.  (C{SIGTERM} is at its default already: the zygote
        set it so.)  Its C{/dev/null} is an open file of its own: one
        shared with the zygote would carry a handler's C{fcntl} flags to
        the next child.
        """
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != self.zygote:
            # The zygote died before the parent-death signal was set.
            os._exit(EXIT_SERVER_GONE)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.dup2(channel, runner.CHANNEL)
        keep = (0, 1, 2, runner.CHANNEL)
        sandbox = self.sandbox
        if sandbox is None:
            close_fds_except(keep)
        else:
            try:
                sandbox.enter_child(keep, signal.SIGKILL)
            except Exception as e:
                os.write(2, f"sandbox could not be applied: {e}\n".encode())
                os._exit(EXIT_SANDBOX_FAILED)
        self.worker.run()
        sys.stdout.flush()
        os._exit(0)
