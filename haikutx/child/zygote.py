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

This module is the zygote's process: its start-up (L{main}).  Each
child's first steps are L{haikutx.child.first_steps}'s (imported once the
egress relay is forked, so that the relay stays small); its loop over its
children is L{haikutx.child.zygote_loop}'s, its set-up of the slot's
layers L{haikutx.child.slot_setup}'s, how it forks L{haikutx.child.forker}'s.

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

from haikutx.child import wire
from haikutx.child.slot_setup import enter_egress, prepare_sandbox, run_group

#: The zygote's channel to the server.
CONTROL = 3


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
    own_uid = (
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
    # Only now, the egress relay forked: what children need (the relay
    # would hold a copy of every page of it).
    from haikutx.child import warmup
    from haikutx.child.first_steps import EXIT_SANDBOX_FAILED, ChildStart
    from haikutx.child.zygote_loop import Zygote

    warmup.warm_up()
    if sandbox is not None:
        try:
            sandbox.enter_zygote()
        except Exception as e:
            os.write(2, f"sandbox could not be applied to the zygote: {e}\n".encode())
            os._exit(EXIT_SANDBOX_FAILED)
    control.sendall(wire.encode_json(wire.SANDBOX, report))
    start = ChildStart(sandbox, zygote, own_uid)
    warmup.freeze()
    Zygote(control, sandbox, start.become_child).serve()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
