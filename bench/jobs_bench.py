"""
Benchmark of the job runner: jobs accepted per second and time to
completion of C{echo foo}, against a real C{twistd -n haiku --jobs}.

    .venv/bin/python bench/jobs_bench.py [--jobs 500] [--concurrency 20] [--latency 50]

Starts twistd on a free loopback port with a temporary state directory,
measures, stops it. Bounded: every wait has a time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.web.client import Agent, HTTPConnectionPool

ROOT = Path(__file__).resolve().parents[1]
BODY = json.dumps({"command": "echo", "args": "foo"}).encode()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def wait_up(reactor, http, url: str) -> None:
    for _ in range(300):
        try:
            response = await http.get(url + "0" * 40)
            await response.content()
            return
        except Exception:
            await task.deferLater(reactor, 0.05)
    raise SystemExit("server did not start within 15 s")


async def accepted_per_second(reactor, http, url: str, total: int, concurrency: int) -> tuple[float, list[str]]:
    ids: list[str] = []
    remaining = iter(range(total))

    async def client() -> None:
        for _ in remaining:
            response = await http.post(url, data=BODY)
            job = await response.json()
            assert response.code == 202, job
            ids.append(job["id"])

    start = time.perf_counter()
    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(client()) for _ in range(concurrency)]
    )
    return total / (time.perf_counter() - start), ids


async def wait_all(reactor, http, url: str, ids: list[str]) -> float:
    start = time.perf_counter()
    for job_id in ids:
        for _ in range(6000):
            response = await http.get(url + job_id)
            if (await response.json())["state"] == "finished":
                break
            await task.deferLater(reactor, 0.005)
    return time.perf_counter() - start


async def completion_times(reactor, http, url: str, count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        response = await http.post(url, data=BODY)
        job = await response.json()
        for _ in range(2000):
            response = await http.get(url + job["id"])
            if (await response.json())["state"] == "finished":
                break
            await task.deferLater(reactor, 0.002)
        times.append(time.perf_counter() - start)
    return times


async def main(reactor, options) -> None:
    state = Path(tempfile.mkdtemp(prefix="haikutx-bench-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    process = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "haiku", "--jobs", f"tcp:{port}:interface=127.0.0.1",
         "--port", "none", "--sslport", "none", "--state", str(state / "state"),
         "--whitelist", "echo", "--maxjobs", str(options.jobs + options.latency + 10)],
        cwd=state, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = options.concurrency
    http = HTTPClient(Agent(reactor, pool=pool))
    try:
        await wait_up(reactor, http, url)
        rate, ids = await accepted_per_second(reactor, http, url, options.jobs, options.concurrency)
        drain = await wait_all(reactor, http, url, ids)
        times = await completion_times(reactor, http, url, options.latency)
        times.sort()
        print(f"accepted: {options.jobs} jobs, concurrency {options.concurrency}: {rate:.0f} jobs/s")
        print(f"all {options.jobs} finished {drain:.2f}s after the last was accepted")
        print(
            f"echo foo, POST to finished (polling every 2 ms), n={len(times)}: "
            f"median {statistics.median(times) * 1000:.1f} ms, "
            f"p90 {times[int(len(times) * 0.9) - 1] * 1000:.1f} ms"
        )
    finally:
        await pool.closeCachedConnections()
        process.terminate()
        process.wait(20)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--latency", type=int, default=50)
    options = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, options)))
