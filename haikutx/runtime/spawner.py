# -*- test-case-name: haikutx.test.test_pool -*-
"""
How a worker slot's zygote is started (L{PythonWorkerSpawner}, the
L{IWorkerSpawner} of Python zygotes): its sandbox options, its channel to
the server, its egress channel, and its cgroup.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorProcess
from zope.interface import implementer

from haikutx.interfaces import IWorkerSpawner
from haikutx.runtime.channels import ChannelTransport
from haikutx.runtime.worker import CHILD_FDS, ZYGOTE_FD, WorkerProtocol, ZygoteChannel

#: The zygote's end of its egress channel (L{haikutx.runtime.egress}).
EGRESS_FD = 5

#: The port of the egress relay inside each zygote's network namespace.
EGRESS_PORT = 3128

#: First uid of the per-slot handler uids used as root without C{--user}:
#: each worker slot gets a uid of its own so RLIMIT_NPROC counts it alone.
SLOT_BASE_UID = 2_000_000_000

#: Tasks (threads) a handler process may have, with a per-slot uid.
MAX_HANDLER_THREADS = 64


def default_options() -> dict[str, Any]:
    """
    The zygote options a pool gets when its builder names none: every
    layer on, as C{twistd haiku} has them (a uid per slot as root, the
    installed stdio interpreters executable, 256 MiB, 6 CPU seconds).
    """
    from haikutx.languages import find_languages
    from haikutx.languages.builtin import sandbox_paths

    exec_paths, exec_read_paths = sandbox_paths(find_languages())
    return {
        "sandbox": True,
        "exec_paths": list(exec_paths),
        "exec_read_paths": list(exec_read_paths),
        "max_memory": 256 << 20,
        "cpu_seconds": 6,
        "user": None,
        "base_uid": SLOT_BASE_UID,
        "max_threads": MAX_HANDLER_THREADS,
        "max_procs": 32,
    }


@implementer(IWorkerSpawner)
class PythonWorkerSpawner:
    """
    Start worker slots as C{python -m haikutx.child}: a lean zygote (no
    Twisted) that prepares the kernel sandbox once and forks one sandboxed
    child at a time (L{haikutx.child.zygote}).  Its channel is a unix
    socket (its fd 3), adopted here as a L{ZygoteChannel}.

    Secure by default: without C{options}, every layer is on (including the
    network namespace whose only way out is the egress proxy, with the
    default rules: public addresses only); C{off} turns layers off by name
    (L{haikutx.sandbox.LAYERS}), and C{options={"sandbox": False}} all.

    @param reactor: the reactor that spawns processes (an
        L{IReactorProcess} and L{IReactorFDSet}).
    @param options: the zygote's options (JSON-able), over
        L{default_options}: C{sandbox} (bool), C{max_memory} (bytes),
        C{cpu_seconds}, C{user}, C{base_uid}, C{max_threads},
        C{exec_paths}, C{exec_read_paths}; each worker adds its C{slot}.
    @param executable: the Python interpreter.
    @param egress: the L{haikutx.net.addresses.EgressRules} of the egress
        proxy; C{None} for the default rules.
    @param off: names of layers to turn off (C{"network"}, C{"landlock"},
        C{"seccomp"}, C{"uid"}, C{"ipc"}, C{"processes"}: the cgroups).
    @param run_groups: put each slot's processes in a cgroup of its own
        (L{haikutx.sandbox.cgroup}), made when the first worker starts and
        removed by L{close}.
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        options: dict[str, Any] | None = None,
        executable: str = sys.executable,
        egress: Any = None,
        off: tuple[str, ...] = (),
        run_groups: bool = True,
    ) -> None:
        from haikutx.sandbox.slot import LAYERS

        unknown = set(off) - set(LAYERS)
        if unknown:
            raise ValueError(f"unknown sandbox layers: {', '.join(sorted(unknown))}")
        if egress is None:
            from haikutx.net.addresses import EgressRules

            egress = EgressRules()
        self._reactor = reactor
        self._egress = egress
        self._run_groups = run_groups
        self._cgroups: Any = None
        self._executable = executable
        self._options = {**default_options(), **(options or {})}
        self._options["off"] = sorted(set(off) | set(self._options.get("off", ())))
        package_root = str(Path(__file__).resolve().parents[2])
        self._env = {
            "PATH": os.defpath,
            "LANG": "C.UTF-8",
            "PYTHONPATH": package_root,
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }

    @property
    def options(self) -> dict[str, Any]:
        """
        The zygote options in force (a copy).
        """
        return dict(self._options)

    def spawn(self, protocol: WorkerProtocol, max_requests: int) -> None:
        options = dict(self._options, slot=protocol.slot)
        server_end, zygote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds: dict[int, Any] = dict(CHILD_FDS)
        child_fds[ZYGOTE_FD] = zygote_end.fileno()
        channel = None
        sandboxed = options.get("sandbox", True) and "network" not in options["off"]
        if self._egress is not None and sandboxed:
            from haikutx.runtime.egress_channel import make_egress_channel

            channel, stop = make_egress_channel(self._reactor, self._egress)
            child_fds[EGRESS_FD] = channel.fileno()
            options["egress"] = {"fd": EGRESS_FD, "port": EGRESS_PORT}
            protocol.ended.addBoth(lambda result: stop().addCallback(lambda _: result))
        if (
            self._run_groups
            and options.get("sandbox", True)
            and "processes" not in options["off"]
        ):
            self._add_run_group(protocol, options)
        try:
            self._reactor.spawnProcess(
                protocol,
                self._executable,
                [self._executable, "-m", "haikutx.child", json.dumps(options)],
                env=self._env,
                path="/",
                childFDs=child_fds,
            )
            channel_protocol = ZygoteChannel(self._reactor, protocol)
            channel_protocol.makeConnection(
                ChannelTransport(
                    self._reactor, server_end.detach(), channel_protocol, receive_fds=True
                )
            )
        finally:
            zygote_end.close()
            server_end.close()
            if channel is not None:
                channel.close()

    def _add_run_group(self, protocol: WorkerProtocol, options: dict[str, Any]) -> None:
        """
        Tell the zygote where its slot's cgroup goes, and give the worker
        the server's side of it (L{haikutx.runtime.rungroup.SlotGroup}).
        """
        from haikutx.runtime.rungroup import SlotGroup
        from haikutx.sandbox.cgroup import WORKER_TASKS, CgroupTree

        if self._cgroups is None:
            self._cgroups = CgroupTree.create()
        tree = self._cgroups
        options["cgroup"] = {"directories": tree.directories, "missing": tree.missing}
        if not tree.directories:
            return
        slot = SlotGroup(
            self._reactor,
            tree.slot(protocol.slot),
            int(options.get("max_procs", 32)) + WORKER_TASKS,
            int(options.get("max_memory", 256 << 20)),
        )
        protocol.run_group = slot

        def stop(result: Any) -> Any:
            slot.stop()
            return result

        protocol.ended.addBoth(stop)

    def close(self) -> None:
        """
        Remove the cgroups, once every worker has ended.
        """
        tree, self._cgroups = self._cgroups, None
        if tree is not None:
            tree.remove()
