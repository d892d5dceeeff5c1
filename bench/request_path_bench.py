"""
The runtime's own cost per request, in one process, in CPU time: steady
figures on a shared machine, where requests/s under wrk follow the others'
load.  Three paths (C{--path}):

C{resource} (the default): the resource layer alone, without sockets, HTTP
parsing or worker processes: C{HandlerResource.render} on real C{twisted.web}
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

C{server}: the server's whole path but the reactor and the TCP socket: a
real C{HTTPChannel} of the runtime's site (on a C{StringTransport}) parses
each request, the resource, scheduler and pool run it, a real
C{WorkerProtocol} sends it on a C{ChannelTransport} over a socketpair, and
the bench, as the child, answers each request with the frames a hello
handler's child sends (head, body and end in one write); sixteen requests
at a time over four workers, log events formatted by a text observer to
C{/dev/null}.  Counted per request: the server's part only.

C{child}: a child's whole path: a real L{haikutx.child.runner.Worker} (no
sandbox) serves the hello handler over a socketpair, the bench sending the
next request from the same loop as each answer ends.  Counted per request:
the child's part and the bench's few calls.

C{fresh}: the server's side of C{-r 1}, one fresh child per request: the
same HTTP path as C{server}, with the real reactor, a real L{WorkerPool}
(C{--maxrequests 1}, four slots) and L{WorkerProtocol}s whose zygotes are
a stand-in process (standard library only, spawned as a zygote is): it
answers each child's request with hello's frames at once, and for each
C{RETIRE} passes the next child's channel and a pidfd (of a zombie of its
own, so the server's C{SIGKILL} harms nothing) in a C{CHILD} frame, as
the zygote does.  No process is forked per request: what is counted is
the server's process only (the stand-in runs apart), sixteen requests in
flight.  C{--profile FILE} writes the cProfile statistics of one run
instead (Python calls per request: divide by C{--requests}).
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

    def cached(self, name):
        # What HandlerLoader.cached gives for a local handler in memory.
        return self.source


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


SERVER = r'''
import socket, sys, time
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource

globalLogBeginner.beginLoggingTo(
    [textFileLogObserver(open(os.devnull, "w"))], redirectStandardIO=False
)

from haikutx.child import wire
from haikutx.languages import find_languages
from haikutx.runtime.channels import ChannelTransport, ChildProtocol
from haikutx.runtime.loader import HandlerSource
from haikutx.runtime.pool import WorkerPool
from haikutx.runtime.resource import HandlerResource
try:
    from haikutx.runtime.site import RuntimeSite
except ImportError:  # a tree from before haikutx.runtime.site (--tree)
    from haikutx.runtime.resource import RuntimeSite
from haikutx.runtime.scheduler import Scheduler
from haikutx.runtime.worker import WorkerProtocol
from haikutx.service import RuntimeRoot


class Loader:
    source = HandlerSource(url="hello.py", source=(
        b"res.write_head(200, {'Content-Type': 'text/plain'})\n"
        b"res.end('Hello, world!\\n')\n"))

    def load(self, name):
        return succeed(self.source)

    def cached(self, name):
        # What HandlerLoader.cached gives for a local handler in memory.
        return self.source


pool = WorkerPool(reactor, 4, 0, spawner=object())
children = []
for i in range(4):
    worker = WorkerProtocol(reactor, lambda w: None, lambda w, c: None, 1000.0, 1000.0)
    worker.pid = 1000 + i
    ours, theirs = socket.socketpair()
    child = ChildProtocol(worker, 2000 + i, -1)
    child.makeConnection(ChannelTransport(reactor, ours.detach(), child))
    worker.child, worker._children[child.pid], worker.state = child, child, "idle"
    pool.workers.add(worker)
    pool._idle.append(worker)
    theirs.setblocking(False)
    children.append((theirs, child))
resource = HandlerResource(reactor, pool, Loader(), languages=find_languages(),
                           scheduler=Scheduler(reactor, pool, 4, 64))
site = RuntimeSite(RuntimeRoot(resource, Resource(), None), reactor=reactor)
site.startFactory()
REQUEST = b"GET /?x-haiku-handler=hello.py HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
ANSWER = (
    wire.encode_json(wire.HEAD, {"status": 200, "headers": [["Content-Type", "text/plain"]]})
    + wire.encode(wire.DATA, b"Hello, world!\n") + wire.encode_json(wire.FINISH, {"trailers": []})
)
clients = []
for i in range(16):
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000 + i))
    protocol = site.buildProtocol(None)
    protocol.makeConnection(transport)
    clients.append((protocol, transport))


def sixteen():
    for protocol, _ in clients:
        protocol.dataReceived(REQUEST)
    answered = True
    while answered:
        answered = False
        for theirs, child in children:
            try:
                theirs.recv(65536)
            except BlockingIOError:
                continue
            answered = True
            theirs.sendall(ANSWER)
            child.transport.doRead()
    for _, transport in clients:
        if not transport.value().endswith((b"Hello, world!\n", b"0\r\n\r\n")):
            raise SystemExit(repr(transport.value()[-300:]))
        transport.clear()


for _ in range(50):
    sixteen()
count, repeat = int(sys.argv[1]) // 16, int(sys.argv[2])
best = float("inf")
for _ in range(repeat):
    started = time.process_time()
    for _ in range(count):
        sixteen()
    best = min(best, (time.process_time() - started) / (count * 16))
print(f"{best * 1e6:.1f}")
'''

CHILD = r'''
import socket, sys, time
from haikutx.child import runner, wire

HEAD = {
    "method": "GET", "url": "/?x-haiku-handler=hello.py",
    "headers": [["Host", "127.0.0.1:8080"], ["User-Agent", "wrk"]],
    "remote_addr": "127.0.0.1", "protocol": "HTTP/1.1", "handler_url": "hello.py",
    "source": "res.write_head(200, {'Content-Type': 'text/plain'})\nres.end('Hello, world!\\n')\n",
    "console": "none", "max_console": 4096, "debug": False, "body_length": 0,
    "language": "python", "argv": None,
}


def serve(count):
    ours, theirs = socket.socketpair()
    worker = runner.Worker(count, theirs.fileno())
    reader = wire.FrameReader()
    request = wire.encode_json(wire.REQUEST, HEAD) + wire.encode(wire.BODY_END)

    def answered():
        for kind, _ in reader.feed(ours.recv(65536)):
            if kind in (wire.FINISH, wire.FAIL):
                ours.sendall(request)

    worker.loop.add_reader(ours.fileno(), answered)
    ours.sendall(request)
    started = time.process_time()
    worker.run()
    spent = time.process_time() - started
    worker.loop.close()
    ours.close()
    theirs.close()
    return spent / count


serve(200)
print(f"{min(serve(int(sys.argv[1])) for _ in range(int(sys.argv[2]))) * 1e6:.1f}")
'''


#: The stand-in zygote of the C{fresh} path (its channel is its fd 3).
STAND_IN = r"""
import os, selectors, socket, struct
HEADER = struct.Struct(">IB")
def frame(kind, payload=b""):
    return HEADER.pack(len(payload) + 1, kind) + payload
ANSWER = (frame(ord("H"), b'{"status":200,"headers":[["Content-Type","text/plain"]]}')
          + frame(ord("D"), b"Hello, world!\n") + frame(ord("F"), b'{"trailers":[]}'))
control = socket.socket(fileno=3)
zombie = os.fork()
if zombie == 0:
    os._exit(0)
select_ = selectors.DefaultSelector()
buffer = bytearray()
children = {}
pids = iter(range(100000, 10**9))

def fork():
    ours, theirs = socket.socketpair()
    pidfd = os.pidfd_open(zombie)
    pid = next(pids)
    socket.send_fds(control, [frame(ord("N"), b'{"pid":%d}' % pid)], [theirs.fileno(), pidfd])
    theirs.close()
    os.close(pidfd)
    children[pid] = ours
    select_.register(ours, selectors.EVENT_READ, pid)

def serve(pid):
    sock = children[pid]
    data = sock.recv(65536)
    if not data:
        select_.unregister(sock)
        sock.close()
        children.pop(pid)
    elif data.endswith(frame(ord("E"))):
        sock.sendall(ANSWER)

def commands():
    data = control.recv(65536)
    if not data:
        raise SystemExit
    buffer.extend(data)
    while len(buffer) >= 5:
        length, kind = HEADER.unpack_from(buffer)
        if len(buffer) < 4 + length:
            break
        del buffer[:4 + length]
        if kind == ord("Q"):
            fork()

control.sendall(frame(ord("S"), b'{"layers":{"all":"disabled"}}'))
fork()
select_.register(control, selectors.EVENT_READ, None)
while True:
    for key, _ in select_.select():
        if key.data is None:
            commands()
        elif key.data in children:
            serve(key.data)
"""

FRESH = r"""
import socket, sys, time
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource

globalLogBeginner.beginLoggingTo(
    [textFileLogObserver(open(os.devnull, "w"))], redirectStandardIO=False
)

from haikutx.languages import find_languages
from haikutx.runtime.channels import ChannelTransport
from haikutx.runtime.loader import HandlerSource
from haikutx.runtime.pool import WorkerPool
from haikutx.runtime.resource import HandlerResource
try:
    from haikutx.runtime.site import RuntimeSite
except ImportError:  # a tree from before haikutx.runtime.site (--tree)
    from haikutx.runtime.resource import RuntimeSite
from haikutx.runtime.scheduler import Scheduler
from haikutx.runtime.worker import CHILD_FDS, ZYGOTE_FD, ZygoteChannel
from haikutx.service import RuntimeRoot

STAND_IN = sys.argv[3]


class Loader:
    source = HandlerSource(url="hello.py", source=(
        b"res.write_head(200, {'Content-Type': 'text/plain'})\n"
        b"res.end('Hello, world!\\n')\n"))

    def load(self, name):
        return succeed(self.source)

    def cached(self, name):
        # What HandlerLoader.cached gives for a local handler in memory.
        return self.source


class StandInSpawner:
    def spawn(self, protocol, max_requests):
        server_end, zygote_end = socket.socketpair()
        fds = dict(CHILD_FDS)
        fds[ZYGOTE_FD] = zygote_end.fileno()
        reactor.spawnProcess(protocol, sys.executable, [sys.executable, "-c", STAND_IN],
                             env=None, childFDs=fds)
        channel = ZygoteChannel(reactor, protocol)
        channel.makeConnection(
            ChannelTransport(reactor, server_end.detach(), channel, receive_fds=True))
        zygote_end.close()


pool = WorkerPool(reactor, 4, 1, spawner=StandInSpawner())
resource = HandlerResource(reactor, pool, Loader(), languages=find_languages(),
                           scheduler=Scheduler(reactor, pool, 4, 64))
site = RuntimeSite(RuntimeRoot(resource, Resource(), None), reactor=reactor)
REQUEST = b"GET /?x-haiku-handler=hello.py HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
state = {"left": 0, "answered": 0}


class Client(StringTransport):
    def write(self, data):
        StringTransport.write(self, data)
        if data.endswith(b"Hello, world!\n"):
            self.clear()
            state["answered"] += 1
            if state["left"] > 0:
                state["left"] -= 1
                reactor.callLater(0, self.protocol.dataReceived, REQUEST)
            elif state["answered"] == state["goal"]:
                reactor.callLater(0, next_phase)


clients = []
count, repeat = int(sys.argv[1]), int(sys.argv[2])
profile = sys.argv[4] if len(sys.argv) > 4 else ""
results = []


def run(requests):
    state.update(left=requests - 16, answered=0, goal=requests)
    for client in clients:
        client.protocol.dataReceived(REQUEST)


def phases():
    # A warm-up, then the measured runs (or the one profiled).
    yield 320
    for _ in range(1 if profile else repeat):
        yield count


steps = phases()
started = [0.0]


def next_phase():
    if started[0]:
        results.append((time.process_time() - started[0]) / count)
    requests = next(steps, None)
    if requests is None:
        if profile:
            profiler.disable()
            profiler.dump_stats(profile)
        reactor.stop()
        return
    if started[0] or requests == count:
        if profile:
            profiler.enable()
        started[0] = time.process_time()
    run(requests)


def start():
    site.startFactory()
    pool.startService()
    for i in range(16):
        transport = Client(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000 + i))
        transport.protocol = site.buildProtocol(None)
        transport.protocol.makeConnection(transport)
        clients.append(transport)
    reactor.callLater(0.5, next_phase)


if profile:
    import cProfile
    profiler = cProfile.Profile()
reactor.callWhenRunning(start)
reactor.run()
print(f"{min(results) * 1e6:.1f}" if results else "0")
"""

DRIVERS = {"resource": DRIVER, "server": SERVER, "child": CHILD, "fresh": FRESH}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", type=Path,
                        help="source tree to measure (repeatable; default: this one)")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the trees")
    parser.add_argument("--requests", type=int, default=2000, help="requests per run")
    parser.add_argument("--repeat", type=int, default=7, help="runs per round (best kept)")
    parser.add_argument("--path", choices=sorted(DRIVERS), default="resource",
                        help="what is measured (see above)")
    parser.add_argument("--profile", default="",
                        help="with --path fresh: write one run's cProfile statistics here")
    options = parser.parse_args()
    trees = [t.resolve() for t in (options.tree or [Path(__file__).resolve().parent.parent])]
    results: dict[str, list[float]] = {str(tree): [] for tree in trees}
    for round_ in range(options.rounds):
        for tree in trees:
            out = subprocess.run(
                [sys.executable, "-c", "import os\n" + DRIVERS[options.path],
                 str(options.requests), str(options.repeat), STAND_IN, options.profile],
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
