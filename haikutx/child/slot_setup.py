# -*- test-case-name: haikutx.test.test_isolation -*-
"""
What a zygote sets up once for its slot, as root, before its warm-up: its
sandbox (L{prepare_sandbox}), its cgroup for stdio runs (L{run_group}) and
its network namespace with the relay to the server's egress proxy
(L{enter_egress}).  Each returns, or yields, what the start-up report says
of its layer.

Standard library only (the zygote imports it).
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

from haikutx.sandbox._libc import PR_SET_PDEATHSIG, close_fds_except, libc


def prepare_sandbox(options: dict[str, Any]) -> Any:
    """
    Prepare this slot's sandbox (L{haikutx.sandbox.SlotSandbox}), or
    C{None} when disabled.
    """
    if not options.get("sandbox", True):
        return None
    from haikutx.sandbox import ResourceLimits, SandboxPolicy, identity_for, prepare_slot

    off = tuple(options.get("off", ()))
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
        # Shell handlers send what they do not want to /dev/null.
        write_paths=("/dev/null",) if options.get("exec_paths") else (),
    )
    return prepare_slot(
        policy,
        exec_paths=tuple(options.get("exec_paths", ())),
        exec_read_paths=tuple(options.get("exec_read_paths", ())),
        off=off,
    )


def run_group(options: dict[str, Any]) -> str:
    """
    Make (or empty) this slot's cgroup (L{haikutx.sandbox.cgroup.RunGroup}),
    as root, before the zygote enters its sandbox: the server puts each
    child in a group of its own beneath it, before the child's first
    request, so every process a handler starts is in it, at most
    C{max_procs} tasks (besides the child's own) and C{max_memory}
    together, and killed with the run.

    @return: how that layer stands, for the start-up report.
    """
    from haikutx.sandbox.cgroup import CONTROLLERS, RunGroup

    settings = options.get("cgroup") or {}
    parents = settings.get("directories") or {}
    missing = dict(settings.get("missing") or {})
    if not parents:
        reasons = "; ".join(missing.values()) or "no cgroups were set up by the server"
        return (
            f"unavailable: {reasons}: the processes of a stdio handler are bounded one "
            "by one (RLIMIT_NPROC, RLIMIT_AS), and one that leaves the run's process "
            "group may outlive its run"
        )
    max_procs = int(options.get("max_procs", 32))
    max_memory = int(options.get("max_memory", 256 << 20))
    try:
        group = RunGroup.create(parents, f"slot{options.get('slot', 0)}", None, None)
    except OSError as e:
        return f"unavailable: cannot create this slot's cgroup: {e}"
    have = [c for c in CONTROLLERS if c in group.directories]
    text = (
        f"active: cgroup v1 {' and '.join(have)}: at most {max_procs} tasks and "
        f"{max_memory >> 20} MiB together per run; every process ends with its run"
    )
    if missing:
        text = "partial: " + text[len("active: "):] + "; missing: " + "; ".join(missing.values())
    return text


def enter_egress(options: dict[str, Any], zygote: int) -> str:
    """
    Move this zygote (and so its children) into a network namespace of its
    own whose only way out is the server's egress proxy, reached through a
    relay on 127.0.0.1 inside the namespace; handlers get C{HTTP_PROXY} and
    C{HTTPS_PROXY} naming it.

    @return: how the network layer stands, for the start-up report.
    """
    egress = options.get("egress")
    if "network" in options.get("off", ()):
        return "turned off by name: handlers reach what this machine reaches"
    if not egress:
        return "disabled"
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
