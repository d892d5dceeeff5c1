"""
What the runtime holds in memory at idle, by process role: for each
C{--workers} count, start C{twistd -n haiku -r 1}, serve 20 hello requests,
wait a moment, then sum each process's proportional set size
(C{/proc/PID/smaps_rollup}'s C{Pss}) by what it is: the server, the
zygotes, their forkers, their egress relays, and the children waiting for
the next request.

Run from the repository root with the project venv, as root::

    .venv/bin/python bench/idle_memory.py [--workers 1,4,8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runtime_bench as rb  # noqa: E402

ROLES = ("server", "zygotes", "forkers", "relays", "waiting children")


def _field(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return sorted(out)


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def roles(server: int) -> dict[str, list[int]]:
    """
    The server's processes by role.
    """
    found: dict[str, list[int]] = defaultdict(list)
    found["server"].append(server)
    for zygote in _children(server):
        found["zygotes"].append(zygote)
        kids = _children(zygote)
        forkers = [k for k in kids if _comm(k) == "haiku-forker"]
        found["forkers"] += forkers
        first_forker = forkers[0] if forkers else None
        for kid in kids:
            if kid in forkers:
                continue
            # The relay is forked before the forker; children after it.
            if first_forker is not None and kid < first_forker:
                found["relays"].append(kid)
            else:
                found["waiting children"].append(kid)
    return found


def measure(
    workers: int, handlers: Path, state: Path, env: dict[str, str]
) -> dict[str, tuple[int, int]]:
    port = rb.free_port()
    twistd = Path(sys.executable).parent / "twistd"
    process = subprocess.Popen(
        [str(twistd), "-n", "--pidfile=", "haiku",
         "--port", f"tcp:{port}:interface=127.0.0.1", "--sslport", "none",
         "--state", str(state), "--handlers", str(handlers), "-w", str(workers), "-r", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        rb.wait_ready(port, process)
        for _ in range(20):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{rb.PATH}", timeout=5) as r:
                r.read()
        time.sleep(2)
        result = {}
        for role, pids in roles(process.pid).items():
            result[role] = (len(pids), sum(_field(pid, "Pss") for pid in pids))
        return result
    finally:
        rb.stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,4,8")
    options = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=str(rb.ROOT))
    rows = []
    with tempfile.TemporaryDirectory(prefix="idle-memory-") as tmp:
        handlers = Path(tmp, "handlers")
        handlers.mkdir()
        shutil.copy(rb.ROOT / "samples" / "hello.py", handlers / "hello.py")
        for workers in (int(w) for w in options.workers.split(",")):
            state = Path(tmp, f"state-{workers}")
            state.mkdir()
            rows.append((workers, measure(workers, handlers, state, env)))
    print("| `-w` | " + " | ".join(ROLES) + " | total |")
    print("|---:|" + "---:|" * (len(ROLES) + 1))
    for workers, result in rows:
        cells = []
        for role in ROLES:
            count, kb = result.get(role, (0, 0))
            cells.append(f"{kb / 1024:.1f} MB ({count})")
        total = sum(kb for _, kb in result.values()) / 1024
        print(f"| {workers} | " + " | ".join(cells) + f" | **{total:.1f} MB** |")


if __name__ == "__main__":
    main()
