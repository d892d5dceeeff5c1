"""
Many tenants, one pool: one handler floods the runtime with slow requests
(C{--flood} connections, each request sleeping C{--sleep} seconds, sent
again as soon as it is answered, Retry-After ignored) while a victim
handler's C{hello} requests are sent one at a time. Prints the victim's
latencies (p50, p99, max) and statuses, and the flooder's statuses and 429
rate, for C{-r 0} and C{-r 1}.

Then, with C{--single}, the single-tenant path: C{hello} through wrk with
C{--connections} connections and C{-r 0}, alternating between the trees
given, to show what the fairness layer costs.

The servers are started from a source tree (C{--tree}, repeatable: the
current one by default), so that the same script measures a checkout of
an older commit ("before") and this one ("after")::

    git archive main | tar -x -C /tmp/tenant-before
    /work/venv/bin/python bench/tenants_bench.py --tree /tmp/tenant-before --tree .

Needs C{h11} (the test suite's) and, for C{--single}, C{wrk}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import h11

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from runtime_bench import RAW_SITE, wrk  # noqa: E402

FLOOD = "import asyncio\nawait asyncio.sleep({sleep})\nres.end('slept')\n"
HELLO = "res.end('Hello, world!\\n')\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """
    A C{twistd haiku} from one source tree, on a free port.
    """

    def __init__(self, tree: Path, handlers: Path, state: Path, options: list[str]) -> None:
        self.tree = tree
        self.port = free_port()
        twistd = Path(sys.executable).parent / "twistd"
        self.argv = [
            str(twistd), "-n", "--pidfile=", "haiku",
            "--port", f"tcp:{self.port}:interface=127.0.0.1", "--sslport", "none",
            "--state", str(state), "--handlers", str(handlers), *options,
        ]
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.process = subprocess.Popen(
            self.argv, cwd=tree, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def wait_ready(self, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        url = f"http://127.0.0.1:{self.port}/?x-haiku-handler=hello.py"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited ({self.process.returncode}): {self.argv}")
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    if response.read() == b"Hello, world!\n":
                        return
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"port {self.port} never answered")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def request(port: int, handler: str, timeout: float) -> tuple[int, float]:
    """
    One GET of C{handler} on a new connection; its status (0 for a
    failure or a timeout) and how long it took.
    """
    started = time.monotonic()
    try:
        return await asyncio.wait_for(_get(port, handler), timeout), time.monotonic() - started
    except (TimeoutError, OSError, h11.ProtocolError):
        return 0, time.monotonic() - started


async def _get(port: int, handler: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        client = h11.Connection(h11.CLIENT)
        writer.write(client.send(h11.Request(
            method="GET", target=f"/?x-haiku-handler={handler}",
            headers=[("Host", "127.0.0.1"), ("Connection", "close")],
        )))
        writer.write(client.send(h11.EndOfMessage()))
        status = 0
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await reader.read(65536))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status
    finally:
        writer.close()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def counts(statuses: list[int]) -> str:
    found: dict[int, int] = {}
    for status in statuses:
        found[status] = found.get(status, 0) + 1
    return ", ".join(f"{n}×{s or 'failed'}" for s, n in sorted(found.items()))


async def flood_run(port: int, connections: int, seconds: float, timeout: float) -> dict:
    """
    Flood with C{connections} clients, wait a second for the queue to
    fill, then send victim requests one at a time for C{seconds}.
    """
    stop = asyncio.Event()
    flooded: list[int] = []

    async def flooder() -> None:
        while not stop.is_set():
            status, _ = await request(port, "flood.py", timeout)
            flooded.append(status)

    tasks = [asyncio.ensure_future(flooder()) for _ in range(connections)]
    await asyncio.sleep(1.0)
    latencies: list[float] = []
    statuses: list[int] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, took = await request(port, "hello.py", timeout)
        statuses.append(status)
        latencies.append(took)
    stop.set()
    await asyncio.wait(tasks, timeout=timeout + 5)
    for task in tasks:
        task.cancel()
    return {
        "victim": len(statuses),
        "victim_ok": statuses.count(200),
        "victim_statuses": counts(statuses),
        "p50": percentile(latencies, 0.50) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "max": max(latencies) * 1000,
        "flood": len(flooded),
        "flood_statuses": counts(flooded),
        "flood_429": flooded.count(429) / len(flooded) if flooded else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", type=Path,
                        help="source tree to start the server from (repeatable)")
    parser.add_argument("--workers", type=int, default=4, help="-w of the flood runs")
    parser.add_argument("--flood", type=int, default=32, help="flooding connections")
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds a flood request takes")
    parser.add_argument("--seconds", type=float, default=8.0, help="victim requests for this long")
    parser.add_argument("--requests", default="0,1", help="-r values of the flood runs")
    parser.add_argument("--single", type=int, default=0,
                        help="wrk rounds per tree of the single-tenant run (0: none)")
    parser.add_argument("--single-workers", type=int, default=8, help="-w of the wrk runs")
    parser.add_argument("--variant", action="append", default=[],
                        help="LABEL=OPTIONS: also run the single-tenant test on the last "
                        "tree with these extra options (repeatable)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--wrk-seconds", type=int, default=5, help="length of one wrk run")
    options = parser.parse_args()
    trees = [t.resolve() for t in (options.tree or [BENCH.parent])]

    with tempfile.TemporaryDirectory(prefix="tenants-bench-") as tmp:
        handlers = Path(tmp, "handlers")
        handlers.mkdir()
        (handlers / "flood.py").write_text(FLOOD.format(sleep=options.sleep))
        (handlers / "hello.py").write_text(HELLO)
        rows = []
        for tree in trees:
            for requests in options.requests.split(","):
                state = Path(tempfile.mkdtemp(dir=tmp))
                server = Server(tree, handlers, state, ["-w", str(options.workers), "-r", requests])
                try:
                    server.wait_ready()
                    result = asyncio.run(
                        flood_run(server.port, options.flood, options.seconds, 30.0)
                    )
                finally:
                    server.stop()
                result.update(tree=tree.name, r=requests)
                rows.append(result)
                print(
                    f"{tree.name} -r {requests}: victim {result['victim']} requests "
                    f"({result['victim_statuses']}), p50 {result['p50']:.0f} ms, "
                    f"p99 {result['p99']:.0f} ms, max {result['max']:.0f} ms; flooder "
                    f"{result['flood']} answers ({result['flood_statuses']}), "
                    f"429 rate {result['flood_429']:.0%}",
                    flush=True,
                )
        print()
        print("| tree | -r | victim requests | victim statuses | p50 ms | p99 ms | max ms "
              "| flooder answers | flooder statuses | 429 rate |")
        print("|---|---|---:|---|---:|---:|---:|---:|---|---:|")
        for row in rows:
            print(
                f"| {row['tree']} | {row['r']} | {row['victim']} | {row['victim_statuses']} "
                f"| {row['p50']:.0f} | {row['p99']:.0f} | {row['max']:.0f} | {row['flood']} "
                f"| {row['flood_statuses']} | {row['flood_429']:.0%} |"
            )

        if options.single:
            if shutil.which("wrk") is None:
                raise SystemExit("wrk not found: apt-get install -y wrk")
            variants = [(tree.name, tree, []) for tree in trees]
            for variant in options.variant:
                label, _, extra = variant.partition("=")
                variants.append((label, trees[-1], extra.split()))
            rates: dict[str, list[float]] = {label: [] for label, _, _ in variants}
            rates["raw Twisted"] = []
            costs: dict[str, list[float]] = {label: [] for label, _, _ in variants}
            raw_site = Path(tmp, "raw_site.py")
            raw_site.write_text(RAW_SITE)
            for round_ in range(options.single):
                port = free_port()
                raw = subprocess.Popen(
                    [sys.executable, str(raw_site), str(port)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                try:
                    wait_answers(port, raw)
                    run = wrk(port, options.wrk_seconds, options.connections)
                finally:
                    raw.terminate()
                    raw.wait()
                rates["raw Twisted"].append(run.rate)
                print(f"raw Twisted round {round_ + 1}: {run.rate:.0f} req/s", flush=True)
                for label, tree, extra in variants:
                    state = Path(tempfile.mkdtemp(dir=tmp))
                    server = Server(
                        tree, handlers, state,
                        ["-w", str(options.single_workers), "-r", "0", *extra],
                    )
                    try:
                        server.wait_ready()
                        for _ in range(20):
                            server.wait_ready()
                        cpu = cpu_seconds(server.process.pid)
                        run = wrk(server.port, options.wrk_seconds, options.connections)
                        cpu = cpu_seconds(server.process.pid) - cpu
                    finally:
                        server.stop()
                    rates[label].append(run.rate)
                    costs[label].append(cpu / run.requests * 1e6)
                    print(f"{label} round {round_ + 1}: {run.rate:.0f} req/s, "
                          f"p50 {run.p50:.2f} ms, p99 {run.p99:.2f} ms, "
                          f"server CPU {costs[label][-1]:.0f} us/request, "
                          f"{run.errors or 'no errors'}", flush=True)
            print()
            print(f"-r 0 -w {options.single_workers} hello, wrk -c{options.connections}:")
            for name, values in rates.items():
                print(f"  {name}: median {median(values):.0f} req/s "
                      f"of {', '.join(f'{v:.0f}' for v in values)}")
            for name, values in costs.items():
                print(f"  {name}: server CPU median {median(values):.0f} us/request "
                      f"of {', '.join(f'{v:.0f}' for v in values)}")


def wait_answers(port: int, process: subprocess.Popen, seconds: float = 30) -> None:
    """
    Wait (bounded) until the raw Twisted site answers.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the raw Twisted site never answered")


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def cpu_seconds(pid: int) -> float:
    """
    CPU time (user and system) the process C{pid} used so far.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
