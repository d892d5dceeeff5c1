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

from haikutx.config import Config
from haikutx.metrics import MetricsResource, show_workers
from haikutx.net.addresses import EgressRules
from haikutx.runtime.fetch import HandlerFetcher
from haikutx.runtime.loader import HandlerLoader, ServeLoader
from haikutx.runtime.pool import WorkerPool
from haikutx.runtime.resource import HandlerResource
from haikutx.runtime.scheduler import Scheduler
from haikutx.runtime.site import RuntimeSite
from haikutx.runtime.spawner import MAX_HANDLER_THREADS, SLOT_BASE_UID, PythonWorkerSpawner
from haikutx.runtime.status import StatusResource


class RuntimeRoot(Resource):
    """
    The runtime's root: C{/_haiku/status}, C{/_haiku/metrics}, and every
    other path runs a handler.
    """

    def __init__(
        self, handlers: HandlerResource, status: Resource, metrics: Resource | None = None
    ) -> None:
        super().__init__()
        self._handlers = handlers
        self._status = status
        self._metrics = metrics

    @property
    def handlers(self) -> HandlerResource:
        """
        The resource that runs handlers.
        """
        return self._handlers

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if path == b"_haiku" and request.postpath == [b"status"]:
            return self._status
        if path == b"_haiku" and request.postpath == [b"metrics"] and self._metrics is not None:
            return self._metrics
        request.postpath.insert(0, request.prepath.pop())
        return self._handlers

    def render(self, request: Request) -> Any:
        return self._handlers.render(request)


class WaitingRequestsService(Service):
    """
    Answers the requests still waiting for a turn with 503 when the runtime
    stops (L{Scheduler.stop}), before the pool stops: else they would wait
    out their time limit, or lose their connection when the reactor stops.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def stopService(self) -> None:
        super().stopService()
        self.scheduler.stop()


class FetcherService(Service):
    """
    Closes the handler fetcher's pooled connections when the runtime stops.
    """

    def __init__(self, fetcher: HandlerFetcher) -> None:
        self.fetcher = fetcher

    def stopService(self) -> Any:
        super().stopService()
        return self.fetcher.close()




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
        "max_procs": config.limits.max_procs,
    }


class ListenFailed(Exception):
    """
    A listener could not listen (the port is in use, no permission): start-up
    stops with one line naming the listener's option and the cause.

    @ivar option: the command-line option of the listener, as C{--port}.
    @ivar where: what it tried to listen on, as C{port 80} or
        C{127.0.0.1:9000}.
    @ivar reason: why it could not, as C{Address already in use}.
    """

    def __init__(self, option: str, where: str, reason: str) -> None:
        super().__init__(option, where, reason)
        self.option = option
        self.where = where
        self.reason = reason

    @classmethod
    def from_error(cls, option: str, error: Exception) -> ListenFailed:
        """
        Describe C{error}, raised by listening for C{option}.

        @param option: the listener's command-line option.
        @param error: a L{CannotListenError} or an L{OSError}.
        """
        if isinstance(error, CannotListenError):
            port = error.port
            where = f"{error.interface}:{port}" if error.interface else f"port {port}"
            cause = error.socketError
        else:
            where, cause = "its address", error
        if isinstance(cause, OSError) and cause.strerror:
            reason = cause.strerror
        else:
            reason = str(cause)
        return cls(option, where, reason)

    def __str__(self) -> str:
        return f"{self.option}: cannot listen on {self.where}: {self.reason}"


class ListeningServices(MultiService):
    """
    A L{MultiService} whose named children listen for command-line options:
    a child that cannot listen raises L{ListenFailed} naming its option
    instead of the bare L{CannotListenError}.

    @param options: the option of each listening child, by child name.
    """

    def __init__(self, options: dict[str, str]) -> None:
        super().__init__()
        self._options = options

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        for child in self:
            self._start(child, child.privilegedStartService)

    def startService(self) -> None:
        Service.startService(self)
        for child in self:
            self._start(child, child.startService)

    def _start(self, child: Any, start: Any) -> None:
        try:
            start()
        except ListenFailed:
            raise
        except (CannotListenError, OSError) as e:
            option = self._options.get(child.name)
            if option is None:
                raise
            raise ListenFailed.from_error(option, e) from e


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

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._listening is not None:
            return
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

    def startService(self) -> None:
        super().startService()
        self.privilegedStartService()

    def stopService(self) -> Any:
        super().stopService()
        if self._listening is not None:
            listening, self._listening = self._listening, None
            return listening.stopListening()
        return None


def build_runtime(
    reactor: Any, config: Config
) -> tuple[WorkerPool, RuntimeRoot, HandlerFetcher]:
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
        scheduler=Scheduler(reactor, pool, config.max_concurrency, config.max_queue),
    )
    limits = {k: v for k, v in asdict(config.limits).items()}
    status = StatusResource(
        {
            "pool": pool.status,
            "requests": lambda: dict(handlers.counters),
            "cache": fetcher.counters,
            "limits": lambda: limits,
            "scheduler": handlers.scheduler.status,
            "handlers": handlers.scheduler.tenants.status,
        }
    )
    metrics = MetricsResource(refresh=[lambda: show_workers(pool.status()["workers"])])
    return pool, RuntimeRoot(handlers, status, metrics), fetcher


def build_service(reactor: Any, config: Config) -> MultiService:
    """
    Compose the services C{config} asks for.

    The runtime (its worker pool and listeners) is composed only when it
    has a listener, so a job runner or a gate alone starts no worker
    process.

    @param reactor: the reactor every service uses.
    @param config: the validated configuration.
    @return: a L{MultiService} whose children are named C{pool} and
        C{runtime} (when the runtime listens), C{jobs} and C{gate} (when
        configured). Starting it raises L{ListenFailed} when a listener
        cannot listen.
    """
    top = ListeningServices({"jobs": "--jobs", "gate": "--gate"})
    if config.http is not None or config.https is not None:
        for service in _runtime_services(reactor, config):
            service.setServiceParent(top)
    if config.jobs is not None:
        from haikutx.jobs.service import build_jobs_service

        build_jobs_service(reactor, config).setServiceParent(top)
    if config.gates:
        from haikutx.gate.service import GateService

        GateService.from_config(reactor, config).setServiceParent(top)
    return top


def _runtime_services(reactor: Any, config: Config) -> list[Service]:
    """
    The runtime's services: the worker pool (C{pool}), the fetcher's
    connections and the listeners (C{runtime}, whose children are named
    C{http} and C{https}).
    """
    pool, root, fetcher = build_runtime(reactor, config)
    runtime = ListeningServices(
        {"http": "--serve" if config.port_search else "--port", "https": "--sslport"}
    )
    runtime.setName("runtime")
    site = RuntimeSite(
        root, reactor=reactor, max_body=config.limits.max_body,
        handler_name=str(config.serve) if config.serve else None,
    )
    site.displayTracebacks = False
    site.noisy = False
    if config.https is not None and config.generate_tls:
        from haikutx.tls import ensure_self_signed

        assert config.cert is not None and config.key is not None
        ensure_self_signed(config.cert, config.key)
    for name, description in (("http", config.http), ("https", config.https)):
        if description is None:
            continue
        if config.port_search and name == "http":
            listener: Service = FirstFreePort(reactor, site, description, config.serve)
        else:
            listener = strports.service(description, site, reactor=reactor)
        listener.setName(name)
        listener.setServiceParent(runtime)
    # Stopped last to first: the listeners, the fetcher's connections, the
    # requests waiting for a turn, then the pool.
    waiting = WaitingRequestsService(root.handlers.scheduler)
    return [pool, waiting, FetcherService(fetcher), runtime]
