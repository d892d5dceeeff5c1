"""
Benchmark of the job runner against raw Twisted, as ratios measured in the
same run:

1. raw twisted.web hello world, C{wrk} with 1 and 16 connections;
2. C{POST /} of C{{"command": "echo", "args": "foo"}} to a real
   C{twistd -n haiku --jobs} (SQLite store, fresh state directory), C{wrk}
   with 1 and 16 connections: jobs accepted per second (each 202 follows
   the commit that holds the job);
3. submit and poll: 8 clients (another process, keep-alive connections),
   each POSTs a job then GETs it every 2 ms until it is C{"finished"}:
   jobs per second and time from POST to seen finished.  Run twice unless
   C{--maxrunning} is given: with the runner's default C{--maxrunning}
   (2 × CPUs: with more clients than that, jobs wait for a slot, in
   order), and with C{--maxrunning} equal to the clients, so that no job
   waits for a slot (as with http-runner, which runs every job at once).

Each POST and submit-and-poll run also prints the CPU time of the server
and its job launcher per job, and that of the jobs themselves (the
launcher's reaped children: the command and, before the launcher ran as the
jobs' user, the C{setpriv} in front of it).

A fresh server for each measurement. Run from the repository root:

    /work/venv/bin/python bench/jobs_bench.py [--seconds 5] [--clients 8] [--user root]

Needs C{wrk}. Bounded: every wait has a time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime_bench import RAW_SITE, free_port, parse_wrk, stop  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BODY = json.dumps({"command": "echo", "args": "foo"})

POST_LUA = f"""
wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""

# The submit-and-poll client, run in its own process so that its work is
# not the server's: asyncio, one keep-alive connection per client.
POLL_CLIENT = r'''
import asyncio, json, sys, time

HOST, PORT, CLIENTS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
SECONDS, INTERVAL = float(sys.argv[4]), float(sys.argv[5])
BODY = b'{"command": "echo", "args": "foo"}'

async def exchange(reader, writer, head, body=b""):
    writer.write(head + body)
    status = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return int(status.split()[1]), await reader.readexactly(length)

async def client(deadline, times, errors):
    reader, writer = await asyncio.open_connection(HOST, PORT)
    post = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(BODY)
    )
    while time.monotonic() < deadline:
        start = time.monotonic()
        status, body = await exchange(reader, writer, post, BODY)
        if status != 202:
            errors.append(status)
            continue
        job_id = json.loads(body)["id"]
        get = b"GET /" + job_id.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        for _ in range(5000):
            status, body = await exchange(reader, writer, get)
            if b'"state": "finished"' in body:
                times.append(time.monotonic() - start)
                break
            await asyncio.sleep(INTERVAL)
        else:
            errors.append("never finished")
    writer.close()

async def main():
    times, errors = [], []
    start = time.monotonic()
    await asyncio.gather(*(client(start + SECONDS, times, errors) for _ in range(CLIENTS)))
    elapsed = time.monotonic() - start
    print(json.dumps({"jobs": len(times), "elapsed": elapsed, "times": times, "errors": errors}))

asyncio.run(main())
'''


def wait_up(url: str, process: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited ({process.returncode})")
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} never answered")


def job_runner(tmp: Path, port: int, extra: list[str]) -> subprocess.Popen:
    state = Path(tempfile.mkdtemp(dir=tmp)) / "state"
    return subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
         "-n", "--pidfile=", "haiku", "--jobs", f"tcp:{port}:interface=127.0.0.1",
         "--port", "none", "--sslport", "none", "--state", str(state),
         "--whitelist", "echo", *extra],
        cwd=tmp, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def cpu_seconds(pid: int) -> tuple[float, float]:
    """
    The CPU time (user + system) of C{pid} and of its live job launcher, and
    that of the launcher's reaped children (the jobs), in seconds.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = jobs = 0.0
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(c) for c in (task / "children").read_text().split()]
    for one in pids:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            if one != pid and b"launcher" not in Path(f"/proc/{one}/cmdline").read_bytes():
                continue
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
        if one != pid:
            jobs += (int(fields[13]) + int(fields[14])) / ticks
    return total, jobs


def wrk(url: str, seconds: int, connections: int, script: Path | None = None):
    argv = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s",
            "--timeout", "10s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True,
                         timeout=seconds + 60).stdout
    return parse_wrk(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--interval", type=float, default=0.002, help="poll interval, s")
    parser.add_argument("--maxrunning", default=None, help="--maxrunning of the runner")
    parser.add_argument("--user", default=None, help="--user of the runner (root: no switch)")
    options = parser.parse_args()
    extra = ["--maxrunning", options.maxrunning] if options.maxrunning else []
    if options.user:
        extra += ["--user", options.user]
    results = {}
    with tempfile.TemporaryDirectory(prefix="jobs-bench-") as name:
        tmp = Path(name)
        raw_site = tmp / "raw_site.py"
        raw_site.write_text(RAW_SITE)
        post_lua = tmp / "post.lua"
        post_lua.write_text(POST_LUA)
        poll = tmp / "poll.py"
        poll.write_text(POLL_CLIENT)

        for connections in (1, 16):
            port = free_port()
            process = subprocess.Popen([sys.executable, str(raw_site), str(port)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_up(f"http://127.0.0.1:{port}/", process)
                run = wrk(f"http://127.0.0.1:{port}/", options.seconds, connections)
            finally:
                stop(process)
            results[f"raw c{connections}"] = run
            print(f"raw Twisted hello c{connections}: {run.rate:,.0f}/s "
                  f"p50 {run.p50:.2f} ms {run.errors or ''}", flush=True)

        for connections in (1, 16):
            port = free_port()
            process = job_runner(tmp, port, extra)
            try:
                wait_up(f"http://127.0.0.1:{port}/" + "0" * 40, process)
                before = cpu_seconds(process.pid)
                run = wrk(f"http://127.0.0.1:{port}/", options.seconds, connections, post_lua)
                time.sleep(0.5)
                after = cpu_seconds(process.pid)
                cpu, jobs_cpu = after[0] - before[0], after[1] - before[1]
            finally:
                stop(process)
            results[f"post c{connections}"] = run
            raw = results[f"raw c{connections}"]
            accepted = run.rate * options.seconds
            print(f"POST -> 202 c{connections}: {run.rate:,.0f}/s p50 {run.p50:.2f} ms "
                  f"= {100 * run.rate / raw.rate:.1f} % of raw Twisted {run.errors or ''}"
                  f"(server + launcher CPU {1000 * cpu / max(accepted, 1):.2f} ms, "
                  f"jobs {1000 * jobs_cpu / max(accepted, 1):.2f} ms per accepted job)",
                  flush=True)

        caps = [("--maxrunning " + options.maxrunning, [])] if options.maxrunning else [
            ("default --maxrunning", []),
            (f"--maxrunning {options.clients}", ["--maxrunning", str(options.clients)]),
        ]
        for cap, more in caps:
            poll_extra = extra + more
            port = free_port()
            process = job_runner(tmp, port, poll_extra)
            try:
                wait_up(f"http://127.0.0.1:{port}/" + "0" * 40, process)
                before = cpu_seconds(process.pid)
                out = subprocess.run(
                    [sys.executable, str(poll), "127.0.0.1", str(port), str(options.clients),
                     str(options.seconds), str(options.interval)],
                    capture_output=True, text=True, check=True, timeout=options.seconds + 120,
                ).stdout
                time.sleep(0.5)
                after = cpu_seconds(process.pid)
                cpu, jobs_cpu = after[0] - before[0], after[1] - before[1]
            finally:
                stop(process)
            polled = json.loads(out)
            times = sorted(polled["times"])
            rate = polled["jobs"] / polled["elapsed"]
            p50 = statistics.median(times) * 1000 if times else float("nan")
            p90 = times[int(len(times) * 0.9)] * 1000 if times else float("nan")
            print(f"submit and poll, {options.clients} clients, {cap}: {rate:,.0f} jobs/s, "
                  f"p50 {p50:.1f} ms, p90 {p90:.1f} ms, errors {len(polled['errors'])} "
                  f"(server + launcher CPU {1000 * cpu / max(polled['jobs'], 1):.2f} ms, "
                  f"jobs {1000 * jobs_cpu / max(polled['jobs'], 1):.2f} ms per job)",
                  flush=True)


if __name__ == "__main__":
    main()
