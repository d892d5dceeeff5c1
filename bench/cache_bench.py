"""
Fetches per second of one handler through L{haikutx.runtime.fetch.HandlerFetcher}
with the cache on (fresh: served from memory), on but always stale (each
fetch a conditional request answered 304), and off (each fetch downloads the
handler, as haiku-http did on every request).

The origin is a twisted.web site on 127.0.0.1 in the same process, so the
"off" and "revalidate" figures include the origin's own work on the same
core. Every run is bounded by C{--seconds}.

    .venv/bin/python bench/cache_bench.py [--seconds 3] [--size 2048]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Site  # noqa: E402

from haikutx.runtime.fetch import HandlerFetcher  # noqa: E402


class _Handler(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body
        self.requests = 0

    def render_GET(self, request):  # noqa: N802
        self.requests += 1
        request.setHeader("etag", '"1"')
        if request.getHeader("if-none-match") == '"1"':
            request.setResponseCode(304)
            return b""
        return self.body


async def _run(seconds: float, size: int) -> None:
    origin = _Handler(b"# handler\n" + b"x" * (size - 10))
    port = reactor.listenTCP(0, Site(origin), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/hello.py"
    rows = []
    for mode, kwargs in [
        ("cache on (fresh)", dict(cache_ttl=3600.0)),
        ("cache on, always stale (304)", dict(cache_ttl=0.0)),
        ("cache off (fetch every time)", dict(cache_bytes=0)),
    ]:
        fetcher = HandlerFetcher(
            reactor, max_size=size * 2, allow=(url,), timeout=10.0, **kwargs
        )
        before = origin.requests
        count = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for _ in range(100):
                await fetcher.fetch(url)
            count += 100
        elapsed = time.perf_counter() - start
        rows.append((mode, count, elapsed, origin.requests - before))
        await fetcher.close()
    await port.stopListening()
    print(
        f"handler size {size} bytes, {seconds:g} s per mode, "
        f"python {platform.python_version()}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'mode':32} {'fetches':>9} {'fetches/s':>11} {'origin requests':>16}")
    for mode, count, elapsed, requests in rows:
        print(f"{mode:32} {count:9d} {count / elapsed:11.0f} {requests:16d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    d = defer.Deferred.fromCoroutine(_run(args.seconds, args.size))
    d.addErrback(lambda f: print(f.getTraceback(), file=sys.stderr))
    d.addBoth(lambda _: reactor.callLater(0, reactor.stop))
    reactor.run()


if __name__ == "__main__":
    main()
