# -*- test-case-name: haikutx.test.test_runtime -*-
"""
What a zygote does once before its first fork so that no child repeats it
(L{warm_up}), and the freezing of its heap (L{freeze}): imports made
lazily elsewhere, first calls through ctypes and asyncio, a handler
compiled, requests of its own served on both of a worker's paths.  The
zygote runs no handler code: the warm-up handlers are constants of this
module.

Standard library only (the zygote imports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import linecache
import socket
from collections.abc import Iterator

from haikutx.child import runner, wire
from haikutx.sandbox._libc import PR_SET_PDEATHSIG, libc

#: Requests the zygote serves itself before its first fork (L{warm_up}).
WARM_UP_REQUESTS = 64

#: The warm-up requests' head, shaped like the server's.
_WARM_UP_HEAD = {
    "method": "GET",
    "url": "/?x-haiku-handler=%3Cwarm-up%3E",
    "headers": [["Host", "localhost"], ["User-Agent", "warm-up"], ["Accept", "*/*"]],
    "remote_addr": "127.0.0.1",
    "protocol": "HTTP/1.1",
    "handler_url": "<warm-up>",
    # The zygote's own code, not a handler's: the zygote runs no handler code.
    "source": "res.write_head(200, {'Content-Type': 'text/plain'})\nres.end(req.method)\n",
    "language": "python",
    "console": "none",
    "max_console": 4096,
    "debug": False,
    "body_length": 0,
}


def _warm_up_request(source: str) -> bytes:
    """
    A warm-up request's frames, for a handler of the zygote's own.
    """
    head = dict(_WARM_UP_HEAD, source=source)
    return wire.encode_json(wire.REQUEST, head) + wire.encode(wire.BODY_END)


@contextlib.contextmanager
def _worker_on_socketpair(max_requests: int) -> Iterator[tuple[socket.socket, runner.Worker]]:
    """
    A L{runner.Worker} serving one end of a new socketpair, and the other
    end (the server's); both closed, and the warm-up's lines forgotten, after.
    """
    server, child = socket.socketpair()
    worker = runner.Worker(max_requests, child.fileno())
    try:
        yield server, worker
    finally:
        worker.loop.close()
        server.close()
        child.close()
        linecache.cache.pop("<warm-up>", None)


def serve_requests(count: int) -> None:
    """
    Serve C{count} requests of the zygote's own synchronous warm-up
    handler through a real L{runner.Worker} over a socketpair, as the
    server would: the worker serves them on its synchronous path, as a
    child serves such a handler.  Besides readying every function of a
    request's path, this specializes their bytecode (CPython 3.11 rewrites
    an instruction's inline cache as it runs, some 50 times before it
    settles), so that a child's request writes to fewer of the pages it
    inherited, each of which the kernel would copy for it.

    Measured on the 2-core VM (300 children, no sandbox): a child's CPU from
    fork to exit 4.4 ms without, 3.5–3.6 ms with 64 warm-up requests; its
    page faults 460 against 380.
    """
    with _worker_on_socketpair(0) as (server, worker):
        # Every request at once, then the end: the worker reads them,
        # answers each and returns at the end (the answers wait unread).
        server.sendall(_warm_up_request(_WARM_UP_HEAD["source"]) * count)
        server.shutdown(socket.SHUT_WR)
        worker.run()


def serve_awaiting(count: int, seconds: float = 5.0) -> None:
    """
    Serve C{count} requests of the zygote's own awaiting warm-up handler
    (L{_WARM_UP_AWAITING}), one at a time, on a worker's asyncio loop, for
    the path of handlers that await.
    """
    reader = wire.FrameReader()
    request = _warm_up_request(_WARM_UP_AWAITING)
    with _worker_on_socketpair(count) as (server, worker):

        def answered() -> None:
            data = server.recv(65536)
            if not data:
                worker.loop.stop()
                return
            for kind, _ in reader.feed(data):
                if kind in (wire.FINISH, wire.FAIL):
                    server.sendall(request)

        worker.loop.add_reader(server.fileno(), answered)
        # A bound, should a warm-up request never finish.
        worker.loop.call_later(seconds, worker.loop.stop)
        server.sendall(request)
        worker.run()


#: The zygote's own warm-up handler that awaits (L{serve_awaiting}).
_WARM_UP_AWAITING = (
    "import asyncio\nawait asyncio.sleep(0)\n"
    "res.write_head(200, {'Content-Type': 'text/plain'})\nres.end(req.method)\n"
)

#: Requests of the awaiting warm-up handler the zygote serves itself.
WARM_UP_AWAITING_REQUESTS = 16


def warm_up() -> None:
    """
    Do once, before the first fork, what every child would otherwise do
    for the first time: import what is imported lazily, make the first
    calls through ctypes and asyncio, compile a handler, serve requests
    (L{serve_awaiting}, L{serve_requests}).

    Measured on a 2-core VM: a child's first event loop costs 2.7 ms cold
    and 0.2 ms warm.
    """
    # The zygote has no parent-death signal: setting none is a no-op call
    # that readies the ctypes function each child calls first.
    libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
    asyncio.new_event_loop().close()
    json.loads(json.dumps({"warm": [1, 2.0, None, True]}))
    serve_awaiting(WARM_UP_AWAITING_REQUESTS)
    serve_requests(WARM_UP_REQUESTS)


def freeze() -> None:
    """
    Collect the garbage and freeze what is left (L{gc.freeze}), so that no
    child's collection walks, and so copies, the pages it inherited: a full
    collection in a child costs 19 ms unfrozen, 0.3 ms frozen.
    """
    gc.collect()
    gc.freeze()
