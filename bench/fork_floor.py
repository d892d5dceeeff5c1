"""
The floor of a fresh process per request on this machine: how fast a
server can be that forks one process per request from a Python image and
does nothing else, measured against raw Twisted in the same run.

The floor server (L{FLOOR_SITE}) is one process with a blocking loop on
C{epoll}: it reads each request head itself, forks a child with the raw
C{clone} system call (as the zygote's forker does: no at-fork work), and
the child writes the hello answer on the connection and exits; the server
reaps it (its pidfd) and reads the connection's next request.  No sandbox,
no Twisted, no channel, no handler: what is left is forking the image,
the child's first steps, and tearing it down.

It runs with two images (C{--images}):

- C{bare}: the interpreter alone (nothing imported beyond start-up);
- C{zygote}: what a haikutx zygote holds when it forks: its imports, its
  warm-up and its frozen heap (L{haikutx.child.warmup}).

and, in the same run, beside haikutx C{-r 1} itself (C{-w 4}, the hello
handler; C{--no-haikutx} to leave it out).  CPU per request counts every
process of each server's tree: the reaped children's too.

So the ratio of C{zygote}'s floor to raw Twisted bounds what C{-r 1} can
reach with that image, and C{-r 1}'s CPU per request beside the floor's
shows what the rest costs.  Run from the repository root::

    /work/venv/bin/python bench/fork_floor.py [--seconds 5] [--connections 16,1] [--rounds 2]

Needs C{wrk}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runtime_bench as rb  # noqa: E402

FLOOR_SITE = r'''
import ctypes, gc, os, select, signal, socket, sys

port, image = int(sys.argv[1]), sys.argv[2]
if image == "zygote":
    from haikutx.child import runner, warmup, zygote
    warmup.warm_up()
    zygote._next_worker = runner.Worker(0, runner.CHANNEL)
    warmup.freeze()
else:
    gc.collect()
    gc.freeze()

_syscall = ctypes.PyDLL(None, use_errno=True).syscall
_syscall.restype = ctypes.c_long
CLONE = {"x86_64": 56, "aarch64": 220}[os.uname().machine]
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n\r\n"
          b"Hello, world!\n")

listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(1024)
listener.setblocking(False)
poll = select.epoll()
poll.register(listener.fileno(), select.EPOLLIN)
connections = {}   # fd: [socket, buffered bytes, pid of the child answering or 0]
children = {}      # pidfd: (connection fd, pid)


def answer(fd):
    entry = connections.get(fd)
    if entry is None or entry[2] or b"\r\n\r\n" not in entry[1]:
        return
    entry[1] = entry[1].split(b"\r\n\r\n", 1)[1]
    pid = _syscall(CLONE, signal.SIGCHLD, 0, 0, 0, 0)
    if pid == 0:
        try:
            os.write(fd, ANSWER)
        finally:
            os._exit(0)
    if pid < 0:
        raise OSError(ctypes.get_errno(), "clone")
    pidfd = os.pidfd_open(pid)
    children[pidfd] = (fd, pid)
    entry[2] = pid
    poll.register(pidfd, select.EPOLLIN)


while True:
    for fd, _ in poll.poll():
        if fd == listener.fileno():
            while True:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    break
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                connections[conn.fileno()] = [conn, b"", 0]
                poll.register(conn.fileno(), select.EPOLLIN)
        elif fd in children:
            conn_fd, pid = children.pop(fd)
            poll.unregister(fd)
            os.close(fd)
            os.waitpid(pid, 0)
            if conn_fd in connections:
                connections[conn_fd][2] = 0
                answer(conn_fd)
        elif fd in connections:
            entry = connections[fd]
            try:
                data = entry[0].recv(65536)
            except ConnectionError:
                data = b""
            if not data:
                poll.unregister(fd)
                del connections[fd]
                entry[0].close()
                continue
            entry[1] += data
            answer(fd)
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", default="16,1")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", default="bare,zygote")
    parser.add_argument("--no-haikutx", action="store_true", help="leave out haikutx -r 1")
    options = parser.parse_args()
    connections = [int(c) for c in options.connections.split(",")]
    env = dict(os.environ, PYTHONPATH=str(rb.ROOT))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fork-floor-") as tmp:
        raw_site = Path(tmp, "raw_site.py")
        raw_site.write_text(rb.RAW_SITE)
        floor_site = Path(tmp, "floor_site.py")
        floor_site.write_text(FLOOR_SITE)
        handlers = Path(tmp, "handlers")
        handlers.mkdir()
        shutil.copy(rb.ROOT / "samples" / "hello.py", handlers / "hello.py")
        twistd = Path(sys.executable).parent / "twistd"
        for round_number in range(1, options.rounds + 1):
            servers = [("raw Twisted", [sys.executable, str(raw_site)])]
            servers += [
                (f"floor, {image} image", [sys.executable, str(floor_site)], image)
                for image in options.images.split(",")
            ]
            for count in connections:
                base = None
                for name, argv, *image in servers:
                    port = rb.free_port()
                    run = rb.bench_level(
                        name, [*argv, str(port), *image], port, options.seconds, count, env
                    )
                    base = base or run.rate
                    rows.append(_row(name, count, round_number, run, base))
                if not options.no_haikutx:
                    state = Path(tempfile.mkdtemp(dir=tmp))
                    port = rb.free_port()
                    argv = [
                        str(twistd), "-n", "--pidfile=", "haiku",
                        "--port", f"tcp:{port}:interface=127.0.0.1", "--sslport", "none",
                        "--state", str(state), "--handlers", str(handlers),
                        "-w", "4", "-r", "1", "--maxqueue", str(2 * max(connections)),
                    ]
                    run = rb.bench_level("haikutx -r 1", argv, port, options.seconds, count, env)
                    rows.append(_row("haikutx -r 1", count, round_number, run, base))
    print()
    print("| server | connections | round | requests/s | × raw | p50 ms "
          "| CPU ms/request | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    print("\n".join(rows))


def _row(name: str, count: int, round_number: int, run: rb.Run, base: float) -> str:
    cpu = (run.server_us + run.workers_us) / 1000
    return (
        f"| {name} | {count} | {round_number} | {run.rate:,.0f} | "
        f"{run.rate / base:.3f} | {run.p50:.2f} | {cpu:.3f} | {run.errors or 'none'} |"
    )


if __name__ == "__main__":
    main()
