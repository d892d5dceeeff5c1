"""
Stdio handlers under load: C{samples/echo.sh} and C{samples/echo.js} served
by C{twistd -n haiku --serve}, and, when the npm package C{stackvana} is
installed, by its C{stack} CLI serving the same scripts. Same wrk load for
each (bounded run), requests per second and the ratio printed.

    .venv/bin/python bench/stdio_bench.py --seconds 5 --connections 4 \\
        [--stack /path/to/node_modules/.bin/stack]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, process: subprocess.Popen, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.args}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"port {port} never opened")


def wrk(port: int, seconds: int, connections: int) -> tuple[float, str]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
         f"http://127.0.0.1:{port}/some/path?c=3"],
        capture_output=True, text=True, check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, (f"{errors.group(1)} non-2xx" if errors else "all 2xx")


def run_server(argv: list[str], port: int, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_port(port, process)
        time.sleep(1.0)  # stack installs its routes 500 ms after listening
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--samples", nargs="+", default=["echo.sh", "echo.js"])
    parser.add_argument("--stack", help="path of stackvana's stack CLI")
    options = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rows = []
    for sample in options.samples:
        results = {}
        for maxrequests in ("1", "0"):
            port = free_port()
            server = run_server(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                 "-n", "--pidfile=", "haiku", "--serve", str(ROOT / "samples" / sample),
                 "--port", f"tcp:{port}:interface=127.0.0.1", "--sslport", "none",
                 "--workers", str(options.workers), "--maxrequests", maxrequests,
                 "--state", f"/tmp/haikutx-bench-{os.getpid()}"],
                port, ROOT, env,
            )
            try:
                results[f"haikutx -r {maxrequests}"] = wrk(port, options.seconds,
                                                           options.connections)
            finally:
                stop(server)
        if options.stack:
            port = free_port()
            # stack resolves the path under its cwd (an absolute path breaks).
            server = run_server([options.stack, "-p", str(port), "-h", "127.0.0.1", sample],
                                port, ROOT / "samples", dict(os.environ))
            try:
                results["stackvana stack"] = wrk(port, options.seconds, options.connections)
            finally:
                stop(server)
        for name, (rate, status) in results.items():
            rows.append((sample, name, rate, status))
        if "stackvana stack" in results:
            ratio = results["haikutx -r 1"][0] / results["stackvana stack"][0]
            print(f"{sample}: haikutx (-r 1) / stackvana = {ratio:.2f}")
    print("| script | server | requests/s | responses |")
    print("|---|---|---:|---|")
    for sample, name, rate, status in rows:
        print(f"| {sample} | {name} | {rate:.0f} | {status} |")


if __name__ == "__main__":
    main()
