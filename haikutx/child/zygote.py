# -*- test-case-name: haikutx.test.test_isolation -*-
"""
The zygote: one per worker slot, and the only party the server trusts about
that slot's processes.  It runs no handler code.

It prepares the kernel sandbox once, applies the layers common to all its
children to itself (L{haikutx.sandbox.slot}), imports what handlers need,
then forks one child at a time.  For each child it makes a socketpair: the
child gets one end as its fd 3 and nothing else of the zygote's; the
server gets the other end, passed over the zygote's own channel (its fd 3,
which no child keeps) with C{SCM_RIGHTS}, with the child's pid and a
pidfd of it (so that the server can kill it itself, safe from pid reuse,
even when the zygote is gone: a backstop to the parent-death signal).  The
zygote reports each child's end (exit status or signal) and forwards what
children write to their stdout and stderr (their fds 1 and 2, a pipe of
their own).

The server gives a child's channel at most C{--maxrequests} requests, then
closes it and tells the zygote to retire the child: the zygote kills it
(C{SIGKILL}: nothing is left to do in it) and forks the next.  The zygote
reports the end of every child the server did not retire, and of those it
killed with a request still to answer.  A child
never says it is fresh; a channel the zygote passed is fresh because the
zygote made it for a process it had just forked.

This module is the zygote's process: its start-up (L{main}) and each
child's first steps (L{_child}); its loop over its children is
L{haikutx.child.zygote_loop}'s, its set-up of the slot's layers
L{haikutx.child.slot_setup}'s, how it forks L{haikutx.child.forker}'s.

Standard library only (no Twisted): forking a small process is fast.
Everything a child would otherwise do first, and slowly, in each fresh
process (lazy imports, first calls through ctypes, a garbage collection
that touches every inherited object) is done once here before the first
fork; see L{haikutx.child.warmup}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from typing import Any

from haikutx.child import runner, warmup, wire
from haikutx.child.slot_setup import enter_egress, prepare_sandbox, run_group
from haikutx.child.zygote_loop import Zygote
from haikutx.sandbox._libc import PR_SET_PDEATHSIG, close_fds_except, libc

PR_SET_CHILD_SUBREAPER = 36

#: The zygote's channel to the server.
CONTROL = 3

#: A child's exit status when its zygote was gone before it started.
EXIT_SERVER_GONE = 3

#: A child's exit status when the sandbox could not be applied.
EXIT_SANDBOX_FAILED = 70

def _confiner(sandbox: Any, worker: runner.Worker) -> Any:
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
                if _signals_stay_in_slot(sandbox):
                    # What a handler leaves is reparented to this child,
                    # which reaps it (a zombie counts against --maxprocs).
                    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
                    worker.end_run_processes = _kill_all_i_may
        except Exception as e:
            os.write(2, f"sandbox could not be applied: {e}\n".encode())
            os._exit(EXIT_SANDBOX_FAILED)

    return confine


#: Whether each child runs as a uid of its slot's own (set by L{main}).
_OWN_UID = False

#: The worker each child serves with, made once by L{main} before the
#: first fork (each child gets its own copy; its event loop's descriptors
#: are made in the child, if it ever runs the loop).
_next_worker: runner.Worker | None = None


def _signals_stay_in_slot(sandbox: Any) -> bool:
    """
    Whether a stdio child may end its run's processes with C{kill(-1)}:
    it runs as its slot's own uid (not root, not a shared C{--user}), and
    Landlock scopes its signals to its own domain (ABI 6+), which its
    interpreters share: then C{kill(-1)} reaches those and nothing else.
    """
    return _OWN_UID and sandbox.landlock_abi >= 6 and os.getuid() != 0


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


def _child(sandbox: Any, channel: int, output: int, zygote: int) -> None:
    """
    In a freshly forked child, zygote code only: give it its own
    descriptors (0 C{/dev/null}, 1 and 2 its output pipe, 3 its channel)
    and nothing else, apply the per-child layers, then serve.  (C{SIGTERM}
    is at its default already: L{main} set it so in the zygote.)  Its
    C{/dev/null} is an open file of its own: one shared with the zygote
    would carry a handler's C{fcntl} flags to the next child.
    """
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != zygote:
        # The zygote died before the parent-death signal was set.
        os._exit(EXIT_SERVER_GONE)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.dup2(channel, runner.CHANNEL)
    keep = (0, 1, 2, runner.CHANNEL)
    if sandbox is None:
        close_fds_except(keep)
    else:
        try:
            sandbox.enter_child(keep, signal.SIGKILL)
        except Exception as e:
            os.write(2, f"sandbox could not be applied: {e}\n".encode())
            os._exit(EXIT_SANDBOX_FAILED)
    worker = _next_worker
    if worker is None:
        worker = runner.Worker(0, runner.CHANNEL)
        if sandbox is not None:
            worker.confine = _confiner(sandbox, worker)
    # (Else its confiner was made with it, in the zygote.)
    worker.run()
    sys.stdout.flush()
    os._exit(0)


def main(argv: list[str]) -> None:
    """
    Run a zygote: C{python -m haikutx.child.zygote OPTIONS_JSON}, with its
    channel to the server (a unix socket) as fd 3.
    """
    options = json.loads(argv[1]) if len(argv) > 1 else {}
    control = socket.socket(fileno=CONTROL)
    control.setblocking(True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    zygote = os.getpid()
    global _OWN_UID
    _OWN_UID = (
        os.geteuid() == 0
        and options.get("base_uid") is not None
        and not {"uid", "landlock"} & set(options.get("off", ()))
    )
    sandbox = prepare_sandbox(options)
    network = enter_egress(options, zygote) if sandbox is not None else "disabled"
    if sandbox is not None:
        if "ipc" in options.get("off", ()):
            sandbox.ipc = "turned off by name"
        else:
            sandbox.enter_ipc_namespace(per_child=options.get("ipc_per_child", True))
        report = sandbox.describe()
    else:
        report = {"layers": {"all": "disabled"}}
    report.setdefault("layers", {})["network"] = network
    if sandbox is not None:
        if "processes" in options.get("off", ()):
            processes = "turned off by name: a run's processes are bounded one by one"
        elif not options.get("exec_paths"):
            processes = "no stdio interpreters"
        else:
            processes = run_group(options)
        report["layers"]["processes"] = processes
    warmup.warm_up()
    if sandbox is not None:
        try:
            sandbox.enter_zygote()
        except Exception as e:
            os.write(2, f"sandbox could not be applied to the zygote: {e}\n".encode())
            os._exit(EXIT_SANDBOX_FAILED)
    control.sendall(wire.encode_json(wire.SANDBOX, report))
    global _next_worker
    _next_worker = runner.Worker(0, runner.CHANNEL)
    if sandbox is not None:
        _next_worker.confine = _confiner(sandbox, _next_worker)
    warmup.freeze()
    def become_child(channel: int, output: int) -> None:
        _child(sandbox, channel, output, zygote)

    Zygote(control, sandbox, become_child).serve()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
