"""
The cost of one child's life as its zygote sees it, without the server:
a driver plays the server on the zygote's channel (fd 3) and, per child,
takes the passed channel, sends one request for a hello handler, reads the
response, and retires the child.  Reports wall time per child and the CPU
of the zygote and its children per child (RUSAGE_CHILDREN once the zygote
has exited), for option variants.

    .venv/bin/python bench/zygote_cycle.py [--count 300] [--base OTHER_TREE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from haikutx.child import wire  # noqa: E402

HEAD = {"method": "GET", "url": "/", "headers": [], "handler_url": "hello.py",
        "source": "res.end('Hello, world!\\n')\n", "language": "python"}


def _start(fds: dict[int, int], argv: list[str], root: Path) -> subprocess.Popen:
    """
    Start C{python -m ARGV} with each descriptor of C{fds} at its number.
    """
    moves = "; ".join(f"os.dup2({a}, {b})" for a, b in fds.items())
    code = (
        f"import os, sys; {moves}; "
        "os.execv(sys.executable, [sys.executable, '-m'] + sys.argv[1:])"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv], pass_fds=tuple(fds), cwd=root,
        env=dict(os.environ, PYTHONPATH=str(root)),
    )


def frames(sock: socket.socket, reader: wire.FrameReader, fds: list[int]):
    while True:
        data, got, _, _ = socket.recv_fds(sock, 65536, 4)
        fds.extend(got)
        if not data:
            return
        yield from reader.feed(data)


def _stat(pid: int) -> tuple[int, int, int, int]:
    """
    A process's own and its reaped children's CPU (clock ticks) and minor
    faults, from C{/proc/PID/stat}: (cpu, children's cpu, faults, children's
    faults).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    minflt, cminflt = int(fields[7]), int(fields[8])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return utime + stime, cutime + cstime, minflt, cminflt


def _forkers(zygote: int) -> list[int]:
    """
    The zygote's forker, if it has one (a live child named C{haiku-forker},
    whose CPU and faults are the zygote's: they are not in the zygote's
    own figures, nor in its reaped children's).
    """
    try:
        with open(f"/proc/{zygote}/task/{zygote}/children") as f:
            pids = [int(pid) for pid in f.read().split()]
    except OSError:
        return []
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "haiku-forker":
                    found.append(pid)
        except OSError:
            pass
    return found


def _zygote_stat(pid: int, forkers: list[int]) -> tuple[int, int, int, int]:
    """
    L{_stat} of the zygote, its forker's own CPU and faults added to its.
    """
    cpu, children_cpu, faults, children_faults = _stat(pid)
    for forker in forkers:
        extra = _stat(forker)
        cpu, faults = cpu + extra[0], faults + extra[2]
    return cpu, children_cpu, faults, children_faults


def _zygote_stat_at(parts: dict[int, tuple[int, int, int, int]],
                    forkers: list[int]) -> tuple[int, int, int, int]:
    """
    L{_zygote_stat} from figures read earlier (C{parts}, by pid; the
    zygote's first).
    """
    zygote = next(iter(parts))
    cpu, children_cpu, faults, children_faults = parts[zygote]
    for forker in forkers:
        cpu, faults = cpu + parts[forker][0], faults + parts[forker][2]
    return cpu, children_cpu, faults, children_faults


def run(count: int, options: dict, root: Path = ROOT) -> dict[str, float]:
    """
    Serve C{count} children from a zygote of the tree at C{root}: wall time,
    CPU and page faults per child, the zygote's and its children's apart,
    counted from the first child on (the zygote's start-up excluded), and
    the zygote's anonymous memory.
    """
    server, zygote = socket.socketpair()
    process = _start({zygote.fileno(): 3}, ["haikutx.child", json.dumps(options)], root)
    zygote.close()
    fds: list[int] = []
    stream = frames(server, wire.FrameReader(), fds)
    served = 0
    start = None
    first = memory = None
    first_parts: dict[int, tuple[int, int, int, int]] = {}
    forkers: list[int] = []
    request = wire.encode_json(wire.REQUEST, HEAD) + wire.encode(wire.BODY_END)
    for kind, payload in stream:
        if kind != wire.CHILD:
            continue
        pid = json.loads(payload)["pid"]
        child = socket.socket(fileno=fds.pop(0))
        os.close(fds.pop(0))  # the child's pidfd
        if start is None:
            start = time.perf_counter()
            forkers = _forkers(process.pid)
            first_parts = {pid: _stat(pid) for pid in [process.pid, *forkers]}
            with open(f"/proc/{process.pid}/smaps_rollup") as f:
                memory = {
                    line.split(":")[0]: int(line.split()[1])
                    for line in f if line.startswith(("Rss:", "Anonymous:"))
                }
        child.sendall(request)
        reader = wire.FrameReader()
        done = False
        while not done:
            for k, _ in reader.feed(child.recv(65536)):
                done = done or k in (wire.FINISH, wire.FAIL)
        child.close()
        served += 1
        if served == count + 1:
            break
        server.sendall(wire.encode_json(wire.RETIRE, {"pid": pid}))
    wall = (time.perf_counter() - start) / count
    # Every child but the last has been retired; wait for their reaping.
    time.sleep(0.2)
    # (A child just forked bears the forker's name for a moment.)
    forkers = [pid for pid in _forkers(process.pid) if pid in forkers]
    first = _zygote_stat_at(first_parts, forkers)
    last = _zygote_stat(process.pid, forkers)
    server.close()
    process.wait()
    tick = os.sysconf("SC_CLK_TCK")
    delta = [b - a for a, b in zip(first, last, strict=True)]
    return {
        "wall": wall * 1000,
        "zygote_cpu": delta[0] / tick / count * 1000,
        "child_cpu": delta[1] / tick / count * 1000,
        "zygote_faults": delta[2] / count,
        "child_faults": delta[3] / count,
        "rss_kb": memory["Rss"],
        "anon_kb": memory["Anonymous"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--base", help="another source tree to run alternately (A/B)")
    parser.add_argument("--quick", action="store_true", help="the all-layers variant only")
    options = parser.parse_args()
    count = options.count
    base = {"slot": 0, "base_uid": 2_000_000_000, "max_threads": 64}
    variants = {"all layers, IPC namespace per child": dict(base)}
    if not options.quick:
        variants["all layers, IPC namespace per zygote"] = dict(base, ipc_per_child=False)
        variants["no sandbox"] = {"sandbox": False}
    trees = {"": ROOT}
    if options.base:
        trees = {"this: ": ROOT, "base: ": Path(options.base).resolve()}
    for _ in range(options.rounds):
        for name, settings in variants.items():
            for label, root in trees.items():
                r = run(count, settings, root)
                print(
                    f"{label}{name:38} {r['wall']:6.3f} ms wall/child  CPU/child "
                    f"{r['zygote_cpu'] + r['child_cpu']:6.3f} ms (zygote {r['zygote_cpu']:.3f}"
                    f" + child {r['child_cpu']:.3f})  faults/child zygote "
                    f"{r['zygote_faults']:.0f} + child {r['child_faults']:.0f}  "
                    f"zygote RSS {r['rss_kb']} kB, anonymous {r['anon_kb']} kB",
                    flush=True,
                )


if __name__ == "__main__":
    main()
