"""
Runtime throughput: the C{samples/hello.py} handler served by haikutx with
C{-r 1} (a fresh sandboxed child per request) and C{-r 0} (a worker process
serves requests until it dies), against a raw twisted.web hello-world site
as the baseline. For each connection count a fresh server is started,
checked for the right body, warmed up with 20 sequential requests, driven
by wrk (one bounded run), checked again, then stopped with SIGTERM (a fresh
server per run, so that one run cannot spoil the next). Prints requests/s,
p50 and p99 side by side, with ratios to the raw Twisted site, errors
(non-2xx responses and socket errors), and the CPU time per request of the
server's process and of its worker processes (from C{/proc}, before and
after the wrk run: the steadier figure on a shared machine).

Run from the repository root with the project venv::

    .venv/bin/python bench/runtime_bench.py [--seconds 5] [--connections 1,4,16]

Needs C{wrk} (Debian: C{apt-get install -y wrk}).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import attr

ROOT = Path(__file__).resolve().parent.parent
BODY = b"Hello, world!\n"
PATH = "/?x-haiku-handler=hello.py"

RAW_SITE = """
import sys
from twisted.internet import reactor, endpoints
from twisted.web import resource, server

class Hello(resource.Resource):
    isLeaf = True
    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return b"Hello, world!\\n"

endpoints.serverFromString(
    reactor, "tcp:%s:interface=127.0.0.1" % sys.argv[1]
).listen(server.Site(Hello()))
reactor.run()
"""


@attr.frozen
class Run:
    """
    One wrk run against one server.

    @ivar rate: requests per second.
    @ivar p50: median latency in ms.
    @ivar p99: 99th percentile latency in ms.
    @ivar requests: requests completed.
    @ivar errors: human-readable errors ("" when none).
    @ivar server_us: CPU time of the server's own process per request, in µs.
    @ivar workers_us: CPU time of the server's descendants (zygotes, their
        children, reaped or not, egress relays) per request, in µs.
    """

    rate: float
    p50: float
    p99: float
    requests: int
    errors: str
    server_us: float = 0.0
    workers_us: float = 0.0


_TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command's closing parenthesis: state, ppid, ...
    return text[text.rindex(")") + 2 :].split()


def cpu_ticks(root: int) -> tuple[int, int]:
    """
    CPU ticks (user + system) of process C{root} itself, and of all its
    live descendants and of the children it and they reaped.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError):
                continue
    fields = _stat(root)
    own = int(fields[11]) + int(fields[12])
    # The children it reaped itself count with its descendants.
    rest, todo = int(fields[13]) + int(fields[14]), list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            f = _stat(pid)
        except OSError:
            continue
        rest += sum(int(f[i]) for i in (11, 12, 13, 14))
    return own, rest


def queue_options(root: Path, connections: int) -> list[str]:
    """
    C{--maxqueue} for a benchmark's one client, so that its excess requests
    wait instead of getting 429 (the fair-share policy is measured by
    C{tenants_bench}); nothing for a tree older than that option.
    """
    if "maxqueue" not in (root / "haikutx" / "tap.py").read_text():
        return []
    return ["--maxqueue", str(2 * connections)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, process: subprocess.Popen, seconds: float = 30) -> bytes:
    """
    Wait until C{GET PATH} answers; return the body of the first answer.
    """
    deadline = time.monotonic() + seconds
    url = f"http://127.0.0.1:{port}{PATH}"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited ({process.returncode}): {process.args}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"port {port} never answered")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def parse_wrk(out: str) -> Run:
    """
    Parse the output of C{wrk --latency}.
    """
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = []
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors.append(f"{non2xx.group(1)} non-2xx")
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if socket_errors:
        names = ("connect", "read", "write", "timeout")
        errors.extend(
            f"{count} {name}"
            for name, count in zip(names, socket_errors.groups(), strict=True)
            if count != "0"
        )
    return Run(rate, p50, p99, requests, ", ".join(errors))


def wrk(port: int, seconds: int, connections: int) -> Run:
    threads = min(2, connections)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
         "--timeout", "10s", "--latency", f"http://127.0.0.1:{port}{PATH}"],
        capture_output=True, text=True, check=True,
    ).stdout
    return parse_wrk(out)


def after_run(port: int) -> str:
    """
    Check that the server still answers after a wrk run ("" when it does).

    wrk closes its connections at the end of a run, some with requests still
    queued for a worker; a server that mishandles that stops answering.
    """
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{PATH}", timeout=15) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        return f"then answers {e.code}"
    except OSError as e:
        return f"then fails: {e}"
    return "" if body == BODY else f"then answers {body!r}"


def bench_level(
    name: str, argv: list[str], port: int, seconds: int, count: int,
    env: dict[str, str],
) -> Run:
    """
    Start a fresh server, check its answer, warm it up, run wrk once with
    C{count} connections, check that it still answers, stop it.
    """
    process = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        body = wait_ready(port, process)
        if body != BODY:
            raise SystemExit(f"{name}: wrong body {body!r}")
        # Warm-up, sequential so that no request is left queued at its end.
        for _ in range(20):
            wait_ready(port, process)
        before = cpu_ticks(process.pid)
        run = wrk(port, seconds, count)
        after = cpu_ticks(process.pid)
        if process.poll() is not None:
            raise SystemExit(f"{name}: server died during the run")
        run = attr.evolve(
            run,
            server_us=(after[0] - before[0]) * _TICK_US / max(run.requests, 1),
            workers_us=(after[1] - before[1]) * _TICK_US / max(run.requests, 1),
        )
        after = after_run(port)
        if after:
            run = attr.evolve(run, errors=", ".join(filter(None, [run.errors, after])))
        print(f"  {name:<14} c={count:<3} {run.rate:9.1f} req/s  "
              f"p50 {run.p50:7.2f} ms  p99 {run.p99:7.2f} ms  "
              f"CPU/req server {run.server_us:6.0f} us, workers {run.workers_us:6.0f} us  "
              f"{run.errors or 'no errors'}", flush=True)
        return run
    finally:
        stop(process)


def bench_server(
    name: str, argv: list[str], port: int, seconds: int, connections: list[int],
    env: dict[str, str],
) -> dict[int, Run]:
    return {
        count: bench_level(name, argv, port, seconds, count, env) for count in connections
    }


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "-"


def table(results: dict[str, dict[int, Run]], connections: list[int]) -> str:
    raw = results["raw Twisted"]
    lines = [
        "| server | conns | requests/s | × raw | p50 ms | × raw | p99 ms | × raw "
        "| server µs/req | workers µs/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, runs in results.items():
        for count in connections:
            run, base = runs[count], raw[count]
            lines.append(
                f"| {name} | {count} | {run.rate:,.0f} | {ratio(run.rate, base.rate)} "
                f"| {run.p50:.2f} | {ratio(run.p50, base.p50)} "
                f"| {run.p99:.2f} | {ratio(run.p99, base.p99)} "
                f"| {run.server_us:.0f} | {run.workers_us:.0f} "
                f"| {run.errors or 'none'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--connections", default="1,4,16",
                        help="comma-separated wrk connection counts")
    parser.add_argument("--workers", type=int, default=8, help="haikutx -w")
    options = parser.parse_args()
    connections = [int(c) for c in options.connections.split(",")]
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    venv_bin = Path(sys.executable).parent
    twistd = venv_bin / "twistd"
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    results: dict[str, dict[int, Run]] = {}
    with tempfile.TemporaryDirectory(prefix="runtime-bench-") as tmp:
        handlers = Path(tmp, "handlers")
        handlers.mkdir()
        shutil.copy(ROOT / "samples" / "hello.py", handlers / "hello.py")
        raw_site = Path(tmp, "raw_site.py")
        raw_site.write_text(RAW_SITE)

        port = free_port()
        print("raw Twisted", flush=True)
        results["raw Twisted"] = bench_server(
            "raw Twisted", [sys.executable, str(raw_site), str(port)], port,
            options.seconds, connections, env,
        )
        for requests in ("1", "0"):
            name = f"haikutx -r {requests}"
            state = Path(tmp, f"state-r{requests}")
            state.mkdir()
            port = free_port()
            argv = [
                str(twistd), "-n", "--pidfile=", "haiku",
                "--port", f"tcp:{port}:interface=127.0.0.1", "--sslport", "none",
                "--state", str(state), "--handlers", str(handlers),
                "-w", str(options.workers), "-r", requests,
                *queue_options(ROOT, max(connections)),
            ]
            print(name, flush=True)
            results[name] = bench_server(
                name, argv, port, options.seconds, connections, env,
            )

    print()
    print(table(results, connections))


if __name__ == "__main__":
    main()
