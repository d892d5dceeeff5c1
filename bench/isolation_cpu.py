"""
CPU per request of C{-r 1} and C{-r 0}, against raw Twisted, for one or
more source trees (to compare a change with the code before it in one
run), and where it goes: the server process itself, its zygotes, and
their children (the request children, reaped and live, and the egress
relays), from C{/proc/PID/stat} (utime + stime of every live process, plus
cutime + cstime, which hold the reaped children's), with the page faults
(minflt + cminflt) split the same way.  CPU per request moves less with
other load on the machine than requests/s does.

Run from the repository root with the project venv::

    .venv/bin/python bench/isolation_cpu.py [--seconds 5] [--connections 16] \\
        [--requests 1,0] [--root OTHER_TREE ...]

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

import attr

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runtime_bench as rb  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")

#: The parts of a server's process tree.
PARTS = ("server", "zygotes", "children")


@attr.frozen
class Usage:
    """
    CPU seconds and page faults of one process, itself and its reaped
    children apart.
    """

    ppid: int
    name: str
    cpu: float
    faults: int
    reaped_cpu: float
    reaped_faults: int


def _stat(pid: int) -> Usage | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    name, rest = text.split("(", 1)[1].rsplit(")", 1)
    fields = rest.split()
    minflt, cminflt = int(fields[7]), int(fields[8])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return Usage(int(fields[1]), name, (utime + stime) / _TICK, minflt,
                 (cutime + cstime) / _TICK, cminflt)


def split_usage(root: int) -> dict[str, tuple[float, int]]:
    """
    CPU seconds and page faults used so far by the server C{root}, its
    zygotes (its children) and theirs (reaped ones included).
    """
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            usage = _stat(int(name))
            if usage is not None:
                table[int(name)] = usage
    parts = dict.fromkeys(PARTS, (0.0, 0))

    def add(part: str, cpu: float, faults: int) -> None:
        old = parts[part]
        parts[part] = (old[0] + cpu, old[1] + faults)

    server = table.get(root)
    if server is None:
        return parts
    add("server", server.cpu, server.faults)
    zygotes = {pid for pid, usage in table.items() if usage.ppid == root}
    for pid in zygotes:
        usage = table[pid]
        add("zygotes", usage.cpu, usage.faults)
        add("children", usage.reaped_cpu, usage.reaped_faults)
    for usage in table.values():
        if usage.ppid in zygotes and usage.name == "haiku-forker":
            # A zygote's forker does the zygote's forking.
            add("zygotes", usage.cpu, usage.faults)
        elif usage.ppid in zygotes:
            # Live children: their own children (a stdio handler's) are
            # not counted; hello has none.
            add("children", usage.cpu + usage.reaped_cpu, usage.faults + usage.reaped_faults)
    return parts


@attr.frozen
class Result:
    """
    One measured run: requests/s, p50 in ms, and per request the CPU ms
    and page faults of each part of L{PARTS}.
    """

    rate: float
    p50: float
    cpu: dict[str, float]
    faults: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.cpu.values())


def measure(name: str, argv: list[str], cwd: Path, port: int, seconds: int,
            connections: int, env: dict[str, str]) -> Result:
    """
    Start a server, warm it up, run wrk; requests/s, and the CPU ms and
    page faults per request of each part of the server's tree.
    """
    process = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(20):
            if rb.wait_ready(port, process) != rb.BODY:
                raise SystemExit(f"{name}: wrong body")
        before = split_usage(process.pid)
        run = rb.wrk(port, seconds, connections)
        after = split_usage(process.pid)
        if run.errors:
            raise SystemExit(f"{name}: {run.errors}")
        count = max(run.requests, 1)
        return Result(
            run.rate,
            run.p50,
            {p: (after[p][0] - before[p][0]) * 1000 / count for p in PARTS},
            {p: (after[p][1] - before[p][1]) / count for p in PARTS},
        )
    finally:
        rb.stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", default="1,0",
                        help="the -r values to measure, comma-separated")
    parser.add_argument("--root", action="append", default=[],
                        help="another source tree to measure (repeatable)")
    options = parser.parse_args()
    roots = [rb.ROOT] + [Path(r).resolve() for r in options.root]
    twistd = Path(sys.executable).parent / "twistd"
    rows: dict[str, list[Result]] = {}
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
            print(f"round {round_ + 1} raw Twisted: {result.rate:.0f} req/s "
                  f"{result.total:.3f} ms CPU/request", flush=True)
            for root in roots:
                env = dict(os.environ, PYTHONPATH=str(root))
                for requests in options.requests.split(","):
                    state = Path(tempfile.mkdtemp(prefix="state-", dir=tmp))
                    port = rb.free_port()
                    argv = [str(twistd), "-n", "--pidfile=", "haiku",
                            "--port", f"tcp:{port}:interface=127.0.0.1", "--sslport", "none",
                            "--state", str(state), "--handlers", str(handlers),
                            "-w", str(options.workers), "-r", requests,
                            *rb.queue_options(Path(root), options.connections)]
                    name = f"{root} -r {requests}"
                    result = measure(name, argv, root, port, options.seconds,
                                     options.connections, env)
                    rows.setdefault(name, []).append(result)
                    split = " / ".join(f"{result.cpu[p]:.2f}" for p in PARTS)
                    faults = " / ".join(f"{result.faults[p]:.0f}" for p in PARTS)
                    print(f"round {round_ + 1} {name}: {result.rate:.0f} req/s "
                          f"p50 {result.p50:.2f} ms, CPU ms/request {split} = "
                          f"{result.total:.2f}, faults/request {faults}", flush=True)
    raw = rows["raw Twisted"]
    print()
    print(f"c{options.connections}, -w {options.workers}")
    print("| server | round | requests/s | × raw | p50 ms | CPU ms/request: "
          "server / zygotes / children / total | faults/request: server / zygotes / children |")
    print("|---|---:|---:|---:|---:|---|---|")
    for name, results in rows.items():
        for index, result in enumerate(results):
            base = raw[index]
            split = " / ".join(f"{result.cpu[p]:.2f}" for p in PARTS)
            faults = " / ".join(f"{result.faults[p]:.0f}" for p in PARTS)
            print(f"| {name} | {index + 1} | {result.rate:,.0f} | "
                  f"{result.rate / base.rate:.3f} | {result.p50:.2f} | "
                  f"{split} / **{result.total:.2f}** | {faults} |")


if __name__ == "__main__":
    main()
