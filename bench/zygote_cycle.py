"""
The cost of one child's life as its zygote sees it, without the server:
a driver plays the server on the zygote's channel (fd 3) and, per child,
takes the passed channel, sends one request for a hello handler, reads the
response, and retires the child.  Reports wall time per child and the CPU
of the zygote and its children per child (RUSAGE_CHILDREN once the zygote
has exited), for option variants.

    .venv/bin/python bench/zygote_cycle.py [--count 300]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def run(count: int, options: dict) -> tuple[float, float]:
    server, zygote = socket.socketpair()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = _start({zygote.fileno(): 3}, ["haikutx.child", json.dumps(options)], ROOT)
    zygote.close()
    fds: list[int] = []
    stream = frames(server, wire.FrameReader(), fds)
    served = 0
    start = None
    request = wire.encode_json(wire.REQUEST, HEAD) + wire.encode(wire.BODY_END)
    for kind, payload in stream:
        if kind != wire.CHILD:
            continue
        pid = json.loads(payload)["pid"]
        child = socket.socket(fileno=fds.pop(0))
        os.close(fds.pop(0))  # the child's pidfd
        if start is None:
            start = time.perf_counter()
        child.sendall(request)
        reader = wire.FrameReader()
        done = False
        while not done:
            for k, _ in reader.feed(child.recv(65536)):
                done = done or k in (wire.FINISH, wire.FAIL)
        child.close()
        served += 1
        if served == count:
            break
        server.sendall(wire.encode_json(wire.RETIRE, {"pid": pid}))
    wall = (time.perf_counter() - start) / (count - 1)
    server.close()
    process.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / count
    return wall * 1000, cpu * 1000


def run_old(count: int, options: dict, root: Path) -> tuple[float, float]:
    """
    The same cycle with the zygote of before this change (READY on fd 4,
    requests on fd 3, the child leaves by itself after its quota of 1).
    """
    to_zygote_r, to_zygote_w = os.pipe()
    from_zygote_r, from_zygote_w = os.pipe()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)

    process = _start(
        {to_zygote_r: 3, from_zygote_w: 4}, ["haikutx.child", "1", json.dumps(options)], root
    )
    os.close(to_zygote_r)
    os.close(from_zygote_w)
    reader = wire.FrameReader()
    request = wire.encode_json(wire.REQUEST, HEAD) + wire.encode(wire.BODY_END)
    served = 0
    start = None
    while served < count:
        data = os.read(from_zygote_r, 65536)
        if not data:
            break
        for kind, _ in reader.feed(data):
            if kind == wire.READY:
                if start is None:
                    start = time.perf_counter()
                os.write(to_zygote_w, request)
            elif kind in (wire.FINISH, wire.FAIL):
                served += 1
    wall = (time.perf_counter() - start) / (count - 1)
    os.close(to_zygote_w)
    process.wait()
    os.close(from_zygote_r)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / count
    return wall * 1000, cpu * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--old", help="a source tree with the zygote of before")
    options = parser.parse_args()
    count = options.count
    base = {"slot": 0, "base_uid": 2_000_000_000, "max_threads": 64}
    variants = {
        "all layers, IPC namespace per child": lambda: run(count, dict(base)),
        "all layers, IPC namespace per zygote": lambda: run(
            count, dict(base, ipc_per_child=False)),
        "no sandbox": lambda: run(count, {"sandbox": False}),
    }
    if options.old:
        variants["before: all layers"] = lambda: run_old(count, dict(base), Path(options.old))
        variants["before: no sandbox"] = lambda: run_old(
            count, {"sandbox": False}, Path(options.old))
    for _ in range(options.rounds):
        for name, measure in variants.items():
            wall, cpu = measure()
            print(f"{name:40} {wall:6.3f} ms wall/child  {cpu:6.3f} ms CPU/child", flush=True)


if __name__ == "__main__":
    main()
