"""
Requests/s through the runtime for a handler fetched by URL, with the
handler cache on (--cache-ttl 5) and in effect off (--cache-ttl 0 against an
origin that sends no validators: every request fetches the code again, as
haiku-http did).

    .venv/bin/python bench/runtime_cache_bench.py [--seconds 5] [--connections 4]

Needs wrk (apt-get install -y wrk). Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELLO = (ROOT / "samples" / "hello.py").read_bytes()

ORIGIN = """
import sys
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data
root = Resource()
root.putChild(b"hello.py", Data(open(sys.argv[2], "rb").read(), "text/plain"))
reactor.listenTCP(int(sys.argv[1]), Site(root), interface="127.0.0.1")
reactor.run()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 20.0) -> bytes:
    deadline = time.time() + timeout
    while True:
        try:
            return urllib.request.urlopen(url, timeout=2).read()
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


def wrk(url: str, seconds: int, connections: int) -> tuple[float, int]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", url],
        capture_output=True, text=True, timeout=seconds + 30,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, int(errors.group(1)) if errors else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    python = sys.executable
    twistd = str(Path(python).parent / "twistd")
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "hello.py"
        code.write_bytes(HELLO)
        origin_port = free_port()
        origin = subprocess.Popen([python, "-c", ORIGIN, str(origin_port), str(code)])
        try:
            origin_url = f"http://127.0.0.1:{origin_port}/"
            wait_for(origin_url + "hello.py")
            rows = []
            variants = (("cache on (--cache-ttl 5)", "5"), ("cache off (--cache-ttl 0)", "0"))
            for label, ttl in variants:
                port = free_port()
                server = subprocess.Popen(
                    [twistd, "-n", "--pidfile=", "haiku", "--port",
                     f"tcp:{port}:interface=127.0.0.1", "--sslport", "none",
                     "--state", tmp, "-r", "0", "-w", "8", "--allow", origin_url,
                     "--cache-ttl", ttl],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                try:
                    url = f"http://127.0.0.1:{port}/?x-haiku-handler={origin_url}hello.py"
                    assert wait_for(url) == b"Hello, world!\n"
                    rows.append((label, *wrk(url, args.seconds, args.connections)))
                finally:
                    server.send_signal(signal.SIGTERM)
                    server.wait(30)
        finally:
            origin.send_signal(signal.SIGTERM)
            origin.wait(30)
    base = rows[0][1]
    print(f"{'mode':28} {'req/s':>9} {'non-2xx':>8} {'vs cache on':>12}")
    for label, rate, errors in rows:
        print(f"{label:28} {rate:9.0f} {errors:8d} {rate / base:11.0%}")
    print(f"machine: {os.cpu_count()} CPUs, {os.uname().release}")


if __name__ == "__main__":
    main()
