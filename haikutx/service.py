# -*- test-case-name: haikutx.test.test_service -*-
"""
Composition of the haikutx services from a L{Config}.
"""

from __future__ import annotations

import math
from typing import Any

from attrs import asdict
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from haikutx.net.addresses import EgressRules
from haikutx.config import Config
from haikutx.runtime.fetch import HandlerFetcher
from haikutx.runtime.loader import HandlerLoader, ServeLoader
from haikutx.runtime.pool import PythonWorkerSpawner, WorkerPool
from haikutx.runtime.resource import HandlerResource, RuntimeSite
from haikutx.runtime.status import StatusResource


class RuntimeRoot(Resource):
    """
    The runtime's root: C{/_haiku/status}, and every other path runs a
    handler.
    """

    def __init__(self, handlers: HandlerResource, status: Resource) -> None:
        super().__init__()
        self._handlers = handlers
        self._status = status

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if path == b"_haiku" and request.postpath == [b"status"]:
            return self._status
        request.postpath.insert(0, request.prepath.pop())
        return self._handlers

    def render(self, request: Request) -> Any:
        return self._handlers.render(request)


class FetcherService(Service):
    """
    Closes the handler fetcher's pooled connections when the runtime stops.
    """

    def __init__(self, fetcher: HandlerFetcher) -> None:
        self.fetcher = fetcher

    def stopService(self) -> Any:
        super().stopService()
        return self.fetcher.close()


#: First uid of the per-slot handler uids used as root without --user:
#: each worker slot gets a uid of its own so RLIMIT_NPROC counts it alone.
SLOT_BASE_UID = 2_000_000_000

#: Tasks (threads) a handler process may have, with a per-slot uid.
MAX_HANDLER_THREADS = 64


def zygote_options(config: Config) -> dict[str, Any]:
    """
    The sandbox options each worker slot's zygote gets from C{config}.
    """
    if config.max_requests:
        cpu_seconds = math.ceil(config.limits.max_time * config.max_requests) + 1
    else:
        cpu_seconds = 2**31 - 2
    from haikutx.languages import find_languages
    from haikutx.languages.builtin import sandbox_paths

    exec_paths, exec_read_paths = sandbox_paths(find_languages())
    return {
        "exec_paths": list(exec_paths),
        "exec_read_paths": list(exec_read_paths),
        "sandbox": config.sandbox,
        "max_memory": config.limits.max_memory,
        "cpu_seconds": cpu_seconds,
        "user": config.user,
        "base_uid": SLOT_BASE_UID if config.user is None else None,
        "max_threads": MAX_HANDLER_THREADS,
    }


class FirstFreePort(Service):
    """
    Listens on the first free TCP port from the one C{description} names
    (C{--serve} without C{--port}, as stackvana's C{stack} counts up from
    3000), so several instances run side by side.

    @ivar port: the port listened on, once started.
    """

    log = Logger()
    tries = 100

    def __init__(self, reactor: Any, factory: Any, description: str, serving: Any) -> None:
        self._reactor = reactor
        self._factory = factory
        self._first = int(description.split(":")[1])
        self._serving = serving
        self._listening: Any = None
        self.port: int | None = None

    def startService(self) -> None:
        super().startService()
        for port in range(self._first, min(self._first + self.tries, 65536)):
            try:
                self._listening = self._reactor.listenTCP(port, self._factory)
            except CannotListenError:
                continue
            self.port = port
            self.log.info(
                "serving {path} at http://127.0.0.1:{port}/",
                path=str(self._serving),
                port=port,
            )
            return
        raise CannotListenError(
            "", self._first, f"no free port from {self._first} to {port}"
        )

    def stopService(self) -> Any:
        super().stopService()
        if self._listening is not None:
            listening, self._listening = self._listening, None
            return listening.stopListening()
        return None


def build_runtime(
    reactor: Any, config: Config
) -> tuple[WorkerPool, Resource, HandlerFetcher]:
    """
    The worker pool, the root resource and the handler fetcher of the
    runtime.
    """
    pool = WorkerPool(
        reactor,
        size=config.workers,
        max_requests=config.max_requests,
        spawner=PythonWorkerSpawner(
            reactor,
            zygote_options(config),
            egress=EgressRules.from_pairs(config.egress_allow),
        ),
        keepalive_interval=config.keepalive_interval,
        keepalive_timeout=config.keepalive_timeout,
    )
    pool.setName("pool")
    fetcher = HandlerFetcher.from_config(reactor, config)
    loader: Any
    if config.serve is not None:
        loader = ServeLoader(reactor, config.serve, config.limits.max_size)
    else:
        loader = HandlerLoader(
            reactor, config.handlers, config.limits.max_size, fetcher,
            fresh_for=config.cache_ttl,
        )
    handlers = HandlerResource(
        reactor,
        pool,
        loader,
        config.limits,
        handler=str(config.serve) if config.serve else None,
        debug=config.debug,
    )
    limits = {k: v for k, v in asdict(config.limits).items()}
    status = StatusResource(
        {
            "pool": pool.status,
            "requests": lambda: dict(handlers.counters),
            "cache": fetcher.counters,
            "limits": lambda: limits,
        }
    )
    return pool, RuntimeRoot(handlers, status), fetcher


def build_service(reactor: Any, config: Config) -> MultiService:
    """
    Compose the services C{config} asks for.

    @param reactor: the reactor every service uses.
    @param config: the validated configuration.
    @return: a L{MultiService} whose children are named C{pool}, C{runtime},
        and, when configured, C{jobs} and C{gate}.
    """
    top = MultiService()
    pool, root, fetcher = build_runtime(reactor, config)
    pool.setServiceParent(top)
    FetcherService(fetcher).setServiceParent(top)
    runtime = MultiService()
    runtime.setName("runtime")
    runtime.setServiceParent(top)
    site = RuntimeSite(root, reactor=reactor)
    site.displayTracebacks = False
    if config.https is not None and config.generate_tls:
        from haikutx.tls import ensure_self_signed

        assert config.cert is not None and config.key is not None
        ensure_self_signed(config.cert, config.key)
    for description in (config.http, config.https):
        if description is None:
            continue
        if config.port_search and description == config.http:
            listener: Service = FirstFreePort(reactor, site, description, config.serve)
        else:
            listener = strports.service(description, site, reactor=reactor)
        listener.setServiceParent(runtime)
    if config.jobs is not None:
        from haikutx.jobs.service import build_jobs_service

        build_jobs_service(reactor, config).setServiceParent(top)
    if config.gates:
        from haikutx.gate.service import GateService

        GateService.from_config(reactor, config).setServiceParent(top)
    return top
