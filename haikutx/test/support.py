"""
Helpers for integration tests: a runtime on 127.0.0.1 with real workers,
and a raw HTTP client whose responses are parsed by h11.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h11
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.trial.unittest import TestCase

from haikutx.config import Config, Limits
from haikutx.runtime.site import RuntimeSite
from haikutx.service import build_runtime


def write_handlers(directory: Path, handlers: dict[str, str]) -> Path:
    """
    Write handler files into C{directory} (created) and return it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name, source in handlers.items():
        (directory / name).write_text(source)
    return directory


def start_runtime(
    case: TestCase,
    handlers: dict[str, str] | Path,
    workers: int = 2,
    max_requests: int = 1,
    limits: Limits | None = None,
    **config: Any,
) -> tuple[int, Any]:
    """
    Start a runtime (real worker processes) listening on 127.0.0.1 and stop
    it when the test ends.

    @return: the port and the pool.
    """
    if limits is None:
        limits = Limits()
    if isinstance(handlers, dict):
        handlers = write_handlers(Path(case.mktemp()), handlers)
    cfg = Config(
        http=None,
        https=None,
        workers=workers,
        max_requests=max_requests,
        limits=limits,
        handlers=handlers,
        **config,
    )
    pool, root, fetcher = build_runtime(reactor, cfg)
    pool.startService()
    case.addCleanup(fetcher.close)
    site = RuntimeSite(root, reactor=reactor, max_body=limits.max_body)
    site.displayTracebacks = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    case.addCleanup(pool.stopService)
    case.addCleanup(port.stopListening)
    return port.getHost().port, pool


async def until(condition: Any, timeout: float = 10.0, what: Any = None) -> None:
    """
    Wait (bounded) until C{condition()} is true, checking every 10 ms.

    @param what: called for the failure message when time runs out.
    """
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(what() if what else "condition not met in time")
        await deferLater(reactor, 0.01, lambda: None)


async def ready(pool: Any, timeout: float = 20.0) -> None:
    """
    Wait until every worker of C{pool} is idle (bounded), so that tests with
    a short --maxtime do not count a worker's start-up against it.
    """
    await until(
        lambda: pool.status()["workers"] == {"idle": pool.size},
        timeout,
        lambda: f"workers not ready: {pool.status()}",
    )


class _RawClient(Protocol):
    def __init__(self, request: bytes, done: Deferred[list[tuple[float, bytes]]]) -> None:
        self._request = request
        self._done = done
        self.received: list[tuple[float, bytes]] = []

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self.received.append((reactor.seconds(), data))

    def connectionLost(self, reason: Any) -> None:
        self._done.callback(self.received)


class Response:
    """
    A response parsed by h11: status, headers (lower-case names), body,
    trailers, and when each piece of raw data arrived.
    """

    def __init__(self, received: list[tuple[float, bytes]]) -> None:
        self.arrivals = received
        raw = b"".join(data for _, data in received)
        self.raw = raw
        connection = h11.Connection(h11.CLIENT)
        connection.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        connection.send(h11.EndOfMessage())
        connection.receive_data(raw)
        connection.receive_data(b"")
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.trailers: dict[str, str] | None = None
        self.complete = False
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError:
                break
            if isinstance(event, h11.Response):
                self.status = event.status_code
                self.headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                self.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True
                self.trailers = {k.decode().lower(): v.decode() for k, v in event.headers}
                break
            elif event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
                break

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


async def http(
    port: int | Any,
    target: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    version: str = "1.1",
) -> Response:
    """
    Send one request over a new connection (closed after the response) and
    parse the answer with h11.

    @param port: a port on 127.0.0.1, or a client endpoint.
    """
    lines = [f"{method} {target} HTTP/{version}", "Host: 127.0.0.1", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    done: Deferred[list[tuple[float, bytes]]] = Deferred()
    factory = ClientFactory.forProtocol(lambda: _RawClient(request, done))
    if isinstance(port, int):
        reactor.connectTCP("127.0.0.1", port, factory)
    else:
        await port.connect(factory)
    return Response(await done)


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
