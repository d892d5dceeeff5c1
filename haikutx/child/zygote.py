# -*- test-case-name: haikutx.test.test_runtime -*-
"""
The zygote: one per worker slot.  It prepares the kernel sandbox once,
imports what handlers need, then forks a sandboxed child that serves
requests on fds 3 and 4 (L{haikutx.child.runner.Worker}).  When that child
exits after its last request, the zygote forks the next one at once, so a
fresh process per request costs a fork, not an interpreter start.

When a child dies abnormally (a signal, a crash), the zygote ends the same
way, so the server sees the cause and starts a new zygote: a child that
died in the middle of a frame never leaves the channel half-written.

Standard library only (no Twisted): forking a small process is fast.
Everything a child would otherwise do first, and slowly, in each fresh
process (lazy imports, first calls through ctypes, a garbage collection
that touches every inherited object) is done once here before the first
fork; see L{_warm_up}.
"""

from __future__ import annotations

import asyncio
import gc
import json
import linecache
import os
import signal
import sys
from typing import Any

from haikutx.child import wire
from haikutx.child import runner
from haikutx.sandbox._libc import PR_SET_PDEATHSIG, close_fds_except, libc

PR_SET_CHILD_SUBREAPER = 36

#: A child's exit status when the server closed fd 3: the zygote stops.
EXIT_SERVER_GONE = 3

#: A child's exit status when the sandbox could not be applied.
EXIT_SANDBOX_FAILED = 70

_KEEP_FDS = (0, 1, 2, runner.CONTROL_IN, runner.CONTROL_OUT)


def _prepare(options: dict[str, Any]) -> Any:
    """
    Prepare the sandboxes of this slot's children, or C{None} when disabled:
    one for Python handlers (no exec) and, when stdio interpreters are
    installed, one for the interpreter processes (exec of those alone).

    @return: C{(python, stdio)} prepared sandboxes (C{stdio} may be C{None}).
    """
    if not options.get("sandbox", True):
        return None
    from haikutx.sandbox import ResourceLimits, SandboxPolicy, identity_for, prepare

    identity = identity_for(options.get("user"), options.get("slot", 0), options.get("base_uid"))
    limits = ResourceLimits(
        address_space=int(options.get("max_memory", 256 << 20)),
        cpu_seconds=int(options.get("cpu_seconds", 6)),
    )
    egress = options.get("egress")
    policy = SandboxPolicy(
        limits=limits,
        identity=identity,
        connect_ports=(int(egress["port"]),) if egress else None,
        max_threads=options.get("max_threads") if options.get("base_uid") is not None else None,
    )
    python = prepare(policy)
    stdio = None
    if options.get("exec_paths"):
        # RLIMIT_NPROC counts every task of the uid, and another server on
        # this machine has the same per-slot uids: with a pids cgroup, that
        # bounds a run exactly, and RLIMIT_NPROC only backs it up.
        max_procs = int(options.get("max_procs", 32))
        if "pids" in ((options.get("cgroup") or {}).get("directories") or {}):
            max_procs = max(max_procs, int(options.get("max_threads") or 0))
        stdio = prepare(
            SandboxPolicy(
                limits=limits,
                identity=identity,
                connect_ports=policy.connect_ports,
                max_threads=max_procs if options.get("base_uid") is not None else None,
                allow_exec=True,
                allow_processes=True,
                exec_paths=tuple(options["exec_paths"]),
                extra_read_paths=tuple(options.get("exec_read_paths", ())),
                write_paths=("/dev/null",),
            )
        )
    return python, stdio


def _run_group(options: dict[str, Any]) -> tuple[Any, str]:
    """
    Make this slot's cgroup (L{haikutx.sandbox.cgroup.RunGroup}), which
    holds every process a stdio handler starts: at most C{max_procs}
    tasks, C{max_memory} together.

    @return: the group (or C{None}) and how that layer stands, for the
        start-up report.
    """
    from haikutx.sandbox.cgroup import CONTROLLERS, RunGroup

    settings = options.get("cgroup") or {}
    parents = settings.get("directories") or {}
    missing = dict(settings.get("missing") or {})
    if not parents:
        reasons = "; ".join(missing.values()) or "cgroups are not set up by the server"
        return None, (
            f"unavailable: {reasons}: processes a stdio handler starts are bounded by "
            "RLIMIT_NPROC and RLIMIT_AS each, and those that leave its process group "
            "may outlive its run"
        )
    max_procs = int(options.get("max_procs", 32))
    max_memory = int(options.get("max_memory", 256 << 20))
    try:
        group = RunGroup.create(parents, f"slot{options.get('slot', 0)}", max_procs, max_memory)
    except OSError as e:
        return None, f"unavailable: cannot create this slot's cgroup: {e}"
    have = [c for c in CONTROLLERS if c in group.directories]
    text = (
        f"active: cgroup v1 {' and '.join(have)}: at most {max_procs} tasks and "
        f"{max_memory >> 20} MiB together per run; every process ends with its run"
    )
    if missing:
        text = "partial: " + text[len("active: "):] + "; missing: " + "; ".join(missing.values())
    return group, text


def _enter_egress(options: dict[str, Any], zygote: int) -> str:
    """
    Move this zygote (and so its children) into a network namespace of its
    own whose only way out is the server's egress proxy, reached through a
    relay on 127.0.0.1 inside the namespace; handlers get C{HTTP_PROXY} and
    C{HTTPS_PROXY} naming it.

    @return: how the network layer stands, for the start-up report.
    """
    egress = options.get("egress")
    if not egress:
        return "disabled"
    import socket

    from haikutx.sandbox import EgressRelay, enter_network_namespace

    channel = socket.socket(fileno=int(egress["fd"]))
    try:
        kind = enter_network_namespace()
    except OSError as e:
        channel.close()
        return f"unavailable: cannot create a network namespace ({e})"
    relay = EgressRelay(channel, int(egress["port"]))
    pid = os.fork()
    if pid == 0:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != zygote:
            os._exit(0)
        close_fds_except({relay.fileno(), channel.fileno()})
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        relay.serve_forever()
        os._exit(0)
    os.environ.update(relay.proxy_environ())
    relay.close()
    return f"active: {kind} namespace, egress through the server's proxy"


def _confiner(sandboxes: Any, worker: runner.Worker, group: Any = None) -> Any:
    """
    The function a child calls when it learns what it will run: it applies
    the Python sandbox to itself, or arranges for each stdio interpreter
    it starts to apply the exec sandbox before C{exec}.
    """
    python, stdio = sandboxes

    def confine(kind: str) -> None:
        try:
            if kind == "python":
                keep = tuple(int(fd) for fd in os.listdir("/proc/self/fd"))
                python.apply(keep_fds=keep, parent_death_signal=signal.SIGKILL)
            elif stdio is not None:
                worker.exec_sandbox = lambda: stdio.apply((0, 1, 2), signal.SIGKILL)
                worker.run_group = group
            else:
                worker.exec_sandbox = lambda: python.apply((0, 1, 2), signal.SIGKILL)
        except Exception as e:
            os.write(2, f"sandbox could not be applied: {e}\n".encode())
            os._exit(EXIT_SANDBOX_FAILED)

    return confine


def _child(sandboxes: Any, max_requests: int, zygote: int, group: Any = None) -> None:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != zygote:
        # The zygote died before the parent-death signal was set.
        os._exit(EXIT_SERVER_GONE)
    keep = set(_KEEP_FDS)
    if sandboxes is not None:
        keep |= {s.ruleset_fd for s in sandboxes if s is not None and s.ruleset_fd >= 0}
    close_fds_except(keep)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    worker = runner.Worker(max_requests)
    if sandboxes is not None:
        worker.confine = _confiner(sandboxes, worker, group)
    worker.run()
    sys.stdout.flush()
    os._exit(EXIT_SERVER_GONE if worker.server_gone else 0)


def _warm_up() -> None:
    """
    Do once, before the first fork, what every child would otherwise do
    for the first time: import what is imported lazily, make the first
    calls through ctypes and asyncio, compile a handler.  Then collect the
    garbage and freeze what is left (L{gc.freeze}), so that no child's
    collection walks, and so copies, the pages it inherited.

    Measured on a 2-core VM: a child's first event loop costs 2.7 ms cold
    and 0.2 ms warm; a full collection in a child 19 ms unfrozen, 0.3 ms
    frozen.
    """
    # The zygote has no parent-death signal: setting none is a no-op call
    # that readies the ctypes function each child calls first.
    libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
    asyncio.new_event_loop().close()
    runner.CodeCache().compile("<warm-up>", b"res.end(req.method)\n")
    linecache.cache.pop("<warm-up>", None)
    json.loads(json.dumps({"warm": [1, 2.0, None, True]}))
    gc.collect()
    gc.freeze()


def _end_like(status: int) -> None:
    """
    End this process the way the child with C{status} ended.
    """
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            signal.signal(number, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # SIGKILL and SIGSTOP cannot be caught: nothing to reset
        os.kill(os.getpid(), number)
        os._exit(128 + number)
    os._exit(os.waitstatus_to_exitcode(status))


def main(argv: list[str]) -> None:
    """
    Run a zygote: C{python -m haikutx.child.zygote MAX_REQUESTS OPTIONS_JSON}.
    """
    max_requests = int(argv[1]) if len(argv) > 1 else 1
    options = json.loads(argv[2]) if len(argv) > 2 else {}
    os.set_blocking(runner.CONTROL_OUT, True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    zygote = os.getpid()
    sandbox = _prepare(options)
    network = _enter_egress(options, zygote) if sandbox is not None else "disabled"
    report = sandbox[0].describe() if sandbox is not None else {"layers": {"all": "disabled"}}
    group = None
    if sandbox is not None:
        report["stdio"] = sandbox[1].describe()["layers"] if sandbox[1] else "no interpreters"
        if sandbox[1] is not None:
            group, report["stdio"]["processes"] = _run_group(options)
            # Processes a handler left are reparented here, not to init,
            # and reaped below.
            libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    report.setdefault("layers", {})["network"] = network
    os.write(runner.CONTROL_OUT, wire.encode_json(wire.SANDBOX, report))
    _warm_up()
    while True:
        pid = os.fork()
        if pid == 0:
            _child(sandbox, max_requests, zygote, group)
        while True:
            try:
                ended, status = os.waitpid(-1, 0)
            except InterruptedError:
                continue
            except ChildProcessError:
                os._exit(EXIT_SERVER_GONE)
            if ended == pid:
                break
        if group is not None:
            group.kill(wait=0.05)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            continue
        _end_like(status)


if __name__ == "__main__":
    main(sys.argv)
