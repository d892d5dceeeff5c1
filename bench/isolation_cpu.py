"""
CPU per request of C{-r 1} and C{-r 0}, against raw Twisted, for one or
more source trees (to compare a change with the code before it in one
run): the whole process tree of each server (server, zygotes, children,
relays) is charged, from C{/proc/PID/stat} (utime + stime of every live
process, plus cutime + cstime, which hold the reaped children's), so the
figure moves less with other load on the machine than requests/s does.

Run from the repository root with the project venv::

    .venv/bin/python bench/isolation_cpu.py [--seconds 5] [--connections 4] \\
        [--root OTHER_TREE ...]

Needs C{wrk}.  Each tree is measured in turn, raw Twisted first, and the
whole sequence is repeated C{--rounds} times (interleaved, so that a change
of load hits every tree alike).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runtime_bench as rb  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + stime + cutime + cstime) / _TICK


def own_cpu(pid: int) -> float:
    """
    CPU seconds of C{pid} itself (the server, without its processes).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu(root: int) -> float:
    """
    CPU seconds used by C{root} and its descendants, reaped ones included.
    """
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            entry = _stat(int(name))
            if entry is not None:
                parents[int(name)], cpu[int(name)] = entry
    total = 0.0
    for pid in cpu:
        walk = pid
        while walk not in (0, 1) and walk != root:
            walk = parents.get(walk, 0)
        if walk == root:
            total += cpu[pid]
    return total


def measure(name: str, argv: list[str], cwd: Path, port: int, seconds: int,
            connections: int, env: dict[str, str]) -> tuple[float, float, float]:
    """
    Start a server, warm it up, run wrk; requests/s, CPU ms per request of
    the whole tree, and of the server process alone.
    """
    process = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(20):
            if rb.wait_ready(port, process) != rb.BODY:
                raise SystemExit(f"{name}: wrong body")
        before, server_before = tree_cpu(process.pid), own_cpu(process.pid)
        run = rb.wrk(port, seconds, connections)
        used = tree_cpu(process.pid) - before
        server = own_cpu(process.pid) - server_before
        if run.errors:
            raise SystemExit(f"{name}: {run.errors}")
        count = max(run.requests, 1)
        return run.rate, used * 1000 / count, server * 1000 / count
    finally:
        rb.stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--root", action="append", default=[],
                        help="another source tree to measure (repeatable)")
    options = parser.parse_args()
    roots = [rb.ROOT] + [Path(r).resolve() for r in options.root]
    twistd = Path(sys.executable).parent / "twistd"
    rows: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="isolation-cpu-") as tmp:
        handlers = Path(tmp, "handlers")
        handlers.mkdir()
        shutil.copy(rb.ROOT / "samples" / "hello.py", handlers / "hello.py")
        raw_site = Path(tmp, "raw_site.py")
        raw_site.write_text(rb.RAW_SITE)
        for round_ in range(options.rounds):
            port = rb.free_port()
            env = dict(os.environ, PYTHONPATH=str(rb.ROOT))
            result = measure("raw", [sys.executable, str(raw_site), str(port)], rb.ROOT,
                             port, options.seconds, options.connections, env)
            rows.setdefault("raw Twisted", []).append(result)
            print(f"round {round_ + 1} raw Twisted: {result[0]:.0f} req/s "
                  f"{result[1]:.3f} ms CPU/request", flush=True)
            for root in roots:
                env = dict(os.environ, PYTHONPATH=str(root))
                for requests in ("1", "0"):
                    state = Path(tempfile.mkdtemp(prefix="state-", dir=tmp))
                    port = rb.free_port()
                    argv = [str(twistd), "-n", "--pidfile=", "haiku",
                            "--port", f"tcp:{port}:interface=127.0.0.1", "--sslport", "none",
                            "--state", str(state), "--handlers", str(handlers),
                            "-w", str(options.workers), "-r", requests]
                    name = f"{root} -r {requests}"
                    result = measure(name, argv, root, port, options.seconds,
                                     options.connections, env)
                    rows.setdefault(name, []).append(result)
                    print(f"round {round_ + 1} {name}: {result[0]:.0f} req/s "
                          f"{result[1]:.3f} ms CPU/request, server {result[2]:.3f}",
                          flush=True)
    raw = rows["raw Twisted"]
    print()
    print("| server | round | requests/s | × raw | CPU ms/request | × raw "
          "| server process CPU ms/request |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, results in rows.items():
        for index, (rate, cpu, server) in enumerate(results):
            base_rate, base_cpu, _ = raw[index]
            print(f"| {name} | {index + 1} | {rate:,.0f} | {rate / base_rate:.3f} "
                  f"| {cpu:.3f} | {cpu / base_cpu:.1f} | {server:.3f} |")


if __name__ == "__main__":
    main()
