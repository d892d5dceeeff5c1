"""
The runtime's own cost per request, without sockets, HTTP parsing or
worker processes: C{HandlerResource.render} on real C{twisted.web}
requests (a C{DummyChannel}), a real L{WorkerPool} of fake workers that
answer when told, a loader that has the handler in memory, and log events
formatted to C{/dev/null}. Sixteen requests are kept in flight, as
C{wrk -c16} does, over eight workers: each answer sends the next request.

Prints the CPU time per request (the best of C{--repeat} runs of
C{--requests} requests: the minimum is what the code costs, the rest is
the machine's other load), alternating between the source trees given, so
that two versions of the code are compared in one run::

    git archive main | tar -x -C /tmp/tenant-before
    /work/venv/bin/python bench/request_path_bench.py --tree /tmp/tenant-before --tree .
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

DRIVER = r'''
import io, sys, time
from collections import deque
from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

globalLogBeginner.beginLoggingTo(
    [textFileLogObserver(open(os.devnull, "w"))], redirectStandardIO=False
)

from haikutx.languages import find_languages
from haikutx.runtime.loader import HandlerSource
from haikutx.runtime.pool import WorkerPool
from haikutx.runtime.resource import HandlerResource

RUNNING = deque()


class Worker:
    kind = None

    def __init__(self, pid):
        self.pid, self.state, self.served = pid, "idle", 0

    def run(self, exchange, head, body):
        self.state = "busy"
        RUNNING.append(exchange)

    def detach(self, exchange):
        pass


class Loader:
    source = HandlerSource(url="hello.py", source=b"res.end('Hello, world!\\n')\n")

    def load(self, name):
        return succeed(self.source)


pool = WorkerPool(reactor, 8, 0, spawner=object())
for i in range(8):
    worker = Worker(i + 1)
    pool.workers.add(worker)
    pool._idle.append(worker)
resource = HandlerResource(reactor, pool, Loader(), languages=find_languages())


def send():
    request = Request(DummyChannel(), False)
    request.method = b"GET"
    request.uri = b"/?x-haiku-handler=hello.py"
    request.path = b"/"
    request.clientproto = b"HTTP/1.1"
    request.content = io.BytesIO(b"")
    resource.render(request)


def answer():
    exchange = RUNNING.popleft()
    exchange.head(200, [["Content-Type", "text/plain"]])
    exchange.data(b"Hello, world!\n")
    exchange.finish([])


for _ in range(16):
    send()
for _ in range(500):
    answer()
    send()
count, repeat = int(sys.argv[1]), int(sys.argv[2])
best = float("inf")
for _ in range(repeat):
    started = time.process_time()
    for _ in range(count):
        answer()
        send()
    best = min(best, (time.process_time() - started) / count)
print(f"{best * 1e6:.1f}")
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", type=Path,
                        help="source tree to measure (repeatable; default: this one)")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the trees")
    parser.add_argument("--requests", type=int, default=2000, help="requests per run")
    parser.add_argument("--repeat", type=int, default=7, help="runs per round (best kept)")
    options = parser.parse_args()
    trees = [t.resolve() for t in (options.tree or [Path(__file__).resolve().parent.parent])]
    results: dict[str, list[float]] = {str(tree): [] for tree in trees}
    for round_ in range(options.rounds):
        for tree in trees:
            out = subprocess.run(
                [sys.executable, "-c", "import os\n" + DRIVER,
                 str(options.requests), str(options.repeat)],
                cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)),
                capture_output=True, text=True, check=True,
            ).stdout
            results[str(tree)].append(float(out))
            print(f"round {round_ + 1} {tree.name}: {float(out):.1f} us/request", flush=True)
    print()
    for tree, values in results.items():
        print(f"{Path(tree).name}: best {min(values):.1f} us/request, median "
              f"{sorted(values)[len(values) // 2]:.1f} of {', '.join(f'{v:.1f}' for v in values)}")


if __name__ == "__main__":
    main()
