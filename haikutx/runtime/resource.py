# -*- test-case-name: haikutx.test.test_runtime -*-
"""
The runtime as a C{twisted.web} resource: it names the handler of each
request, loads it, runs it in a worker from the pool and streams the
worker's response to the client.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from haikutx.child.console import console_mode
from haikutx.config import Limits
from haikutx.events import EventEmitter
from haikutx.languages import UnknownLanguage, detect
from haikutx.net.urls import redact_url
from haikutx.runtime.body import RequestBody, body_too_large
from haikutx.runtime.exchange import ClientWatch, Exchange, send_error, watch_lost
from haikutx.runtime.frames import RequestFrames
from haikutx.runtime.loader import HandlerLoadError, HandlerSource
from haikutx.runtime.parameters import CONSOLE, HANDLER, LANGUAGE, request_parameter
from haikutx.runtime.pool import PoolBusy, WorkerPool
from haikutx.runtime.scheduler import Overloaded, Scheduler
from haikutx.runtime.site import LOGGED_HERE
from haikutx.runtime.tenants import handler_identity
from haikutx.runtime.worker import handler_kind

NO_HANDLER = (
    "The x-haiku-handler HTTP request header or query parameter must specify "
    "the URL of the handler to run."
)

#: Set on a request to the handler it is accounted under: its identity,
#: then, once it asks for a worker, its tenant.
_IDENTITY = "haiku_handler"
_TENANT = "haiku_tenant"

#: Set on a request to its body (L{RequestBody}), once it is looked at.
_BODY = "haiku_body"

#: Handlers whose language a L{HandlerResource} remembers (their code with
#: it: a bound on what it keeps).
_DETECTED = 64

#: Seconds a client refused with 429 is told to wait.
RETRY_OVERLOADED = 1


#: The limits a L{HandlerResource} holds handlers to unless told others
#: (a frozen value, so one instance serves every default).
DEFAULT_LIMITS = Limits()


class HandlerResource(Resource):
    """
    A C{twisted.web} resource that runs handlers in the worker pool: the one
    each request names, or one fixed handler.

    @param reactor: the reactor (for time).
    @param pool: the started L{WorkerPool}.
    @param loader: an L{haikutx.interfaces.IHandlerLoader}.
    @param limits: the L{Limits} each run is held to.
    @param handler: a fixed handler name to run for every request, or
        C{None} to run the one each request names.
    @param debug: send handlers' console to the server log.
    @param languages: the L{haikutx.interfaces.ILanguage} providers handlers
        may be written in (default: every plugin found).
    @param scheduler: the L{Scheduler} sharing C{pool} among handlers
        (default: one with the default shares).
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        pool: WorkerPool,
        loader: Any,
        limits: Limits = DEFAULT_LIMITS,
        handler: str | None = None,
        debug: bool = False,
        languages: Any = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        super().__init__()
        if languages is None:
            from haikutx.languages import find_languages

            languages = find_languages()
        self._languages = tuple(languages)
        self._reactor = reactor
        self._pool = pool
        self.scheduler = scheduler if scheduler is not None else Scheduler(reactor, pool)
        self._loader = loader
        #: A loader's handler at hand, if it can say so without a Deferred.
        self._cached = getattr(loader, "cached", None)
        self._limits = limits
        self._handler = handler
        self._debug = debug
        self.counters = {"requests": 0, "errors": 0}
        #: (URL, language override) to (code, language): L{_detect}.
        self._detected: dict[tuple[str, str | None], tuple[bytes, Any]] = {}
        # The class's logger bound to this resource once, not at each event.
        self.log = self.log
        self._emit_served = EventEmitter(self.log, LogLevel.info)
        self._frames = RequestFrames()

    def render(self, request: Request) -> Any:
        self.counters["requests"] += 1
        # Every path below emits one event for this request (SPEC §7).
        setattr(request, LOGGED_HERE, True)
        name = self._handler or request_parameter(request, HANDLER)
        if not name:
            if request.uri == b"/favicon.ico":
                self._served(request, None, 404, self._reactor.seconds(), None)
                request.setResponseCode(404)
                request.responseHeaders.setRawHeaders(b"content-length", [b"0"])
                return b""
            self._refuse(request, 400, NO_HANDLER, None)
            return NOT_DONE_YET
        body = RequestBody.of(request)
        setattr(request, _BODY, body)
        if body.size() > self._limits.max_body:
            # Served by a Site whose requests do not refuse it before reading.
            self._refuse(request, 413, body_too_large(self._limits.max_body), name)
            return NOT_DONE_YET
        try:
            self._serve(request, name)
        except Exception:
            self._crashed(Failure(), request, name)
        return NOT_DONE_YET

    def _account(self, request: Request, status: int | None, started: float) -> None:
        """
        Count the request under its handler (L{handler_identity}), when it
        named one.
        """
        tenants = self.scheduler.tenants
        tenant = getattr(request, _TENANT, None)
        if tenant is None:
            identity = getattr(request, _IDENTITY, None)
            if identity is None:
                return
            tenant = tenants.lookup(identity)
        tenants.answered(tenant, status, self._reactor.seconds() - started)

    def _refuse(
        self, request: Request, status: int, message: str, name: str | None,
        started: float | None = None,
    ) -> None:
        self.counters["errors"] += 1
        self._account(request, status, self._reactor.seconds() if started is None else started)
        self.log.warn(
            "{client} {method} {handler_url} -> {status}: {reason}",
            client=_client(request),
            method=request.method.decode("latin-1"),
            handler_url=_shown(name),
            status=status,
            reason=message,
        )
        send_error(request, status, message)

    def _served(
        self, request: Request, name: str | None, status: int | None, started: float,
        worker_pid: int | None,
    ) -> None:
        """
        Emit the event of a request that was answered (C{status}), or whose
        client went away before it was (C{None}).
        """
        self._account(request, status, started)
        client = _client(request)
        method = request.method.decode("latin-1")
        handler_url = _shown(name)
        answer = status if status is not None else "client went away"
        duration = self._reactor.seconds() - started
        # Its text made here, once; every field in the event (EventEmitter).
        self._emit_served(
            f"{client} {method} {handler_url} -> {answer} in {duration:.3f}s",
            {
                "client": client,
                "method": method,
                "handler_url": handler_url,
                "status": status,
                "answer": answer,
                "duration": duration,
                "worker_pid": worker_pid,
            },
        )

    # A request's way, step by step: each step runs at once when what it
    # waits for is at hand (a handler in the loader's memory, a free turn),
    # else as that Deferred's callback; an error in any step is _crashed.
    # (A coroutine would cost a trip through inlineCallbacks at each await.)

    def _serve(self, request: Request, name: str) -> None:
        started = self._reactor.seconds()
        setattr(request, _IDENTITY, handler_identity(name))
        cached = self._cached
        handler = cached(name) if cached is not None else None
        if handler is not None:
            self._loaded(handler, request, name, started)
            return
        loading = self._loader.load(name)
        if loading.called and not isinstance(loading.result, Failure):
            self._loaded(loading.result, request, name, started)
            return
        loading.addCallbacks(
            self._loaded, self._not_loaded,
            callbackArgs=(request, name, started), errbackArgs=(request, name, started),
        ).addErrback(self._crashed, request, name)

    def _not_loaded(self, failure: Failure, request: Request, name: str, started: float) -> None:
        failure.trap(HandlerLoadError)
        self._refuse(request, failure.value.status, failure.value.message, name, started)

    def _loaded(
        self, handler: HandlerSource, request: Request, name: str, started: float
    ) -> None:
        """
        The handler is loaded: find its language, then wait for a turn.
        """
        if request._disconnected:
            self._served(request, name, None, started, None)
            return
        try:
            language, argv = self._language(request, handler)
        except HandlerLoadError as e:
            self._refuse(request, e.status, e.message, name, started)
            return
        if self._debug:
            request.responseHeaders.setRawHeaders(b"x-haiku-cache", [handler.cache.encode()])
        scheduler = self.scheduler
        tenant = scheduler.tenants.lookup(getattr(request, _IDENTITY))
        setattr(request, _TENANT, tenant)
        kind = handler_kind(language.name)
        turn = scheduler.take(tenant, kind)
        if turn is not None:
            self._granted(turn, request, handler, language, argv, name, started, None)
            return
        # The wait's end (at once, or when a turn comes) without a Deferred.
        watch = ClientWatch(None)
        waiting = scheduler.wait(
            tenant, self._limits.max_time, kind,
            partial(self._waited, request, handler, language, argv, name, started, watch),
        )
        if scheduler.waiting_for(waiting):
            # A client that leaves while waiting gives up its place in the
            # queue (and later, its exchange ends: one watch for both).
            watch.then = lambda _: scheduler.cancel(waiting)
            watch_lost(request, watch)

    def _waited(
        self, request: Request, handler: HandlerSource, language: Any, argv: Any, name: str,
        started: float, watch: ClientWatch, outcome: Any,
    ) -> None:
        """
        The wait for a turn is over: with a turn (L{_granted}), or a
        L{Failure} (L{_not_granted}).  C{watch} watches the client if it
        was set while waiting.
        """
        try:
            if isinstance(outcome, Failure):
                failure = self._not_granted(outcome, request, handler, name, started)
                if failure is not None:
                    self._crashed(failure, request, name)
                return
            self._granted(
                outcome, request, handler, language, argv, name, started,
                watch if watch.then is not None else None,
            )
        except Exception:
            self._crashed(Failure(), request, name)

    def _not_granted(
        self, failure: Failure, request: Request, handler: HandlerSource, name: str,
        started: float,
    ) -> Failure | None:
        """
        No turn: the client left while waiting, the handler has too many
        requests already (429), or no worker came in time (503).
        """
        if failure.check(CancelledError):
            self._served(request, handler.url, None, started, None)
        elif failure.check(Overloaded):
            tenant = failure.value.tenant
            request.responseHeaders.setRawHeaders(
                b"retry-after", [b"%d" % RETRY_OVERLOADED]
            )
            self._refuse(
                request, 429,
                f"Too many requests for handler {handler.url}: {tenant.running} "
                f"running and {len(tenant.waiting)} waiting already; try again later.",
                name, started,
            )
        elif failure.check(PoolBusy):
            request.responseHeaders.setRawHeaders(
                b"retry-after", [b"%d" % max(1, round(self._limits.max_time))]
            )
            self._refuse(
                request, 503, f"Service unavailable: {failure.value}; try again later.",
                name, started,
            )
        else:
            return failure
        return None

    def _granted(
        self, turn: Any, request: Request, handler: HandlerSource, language: Any, argv: Any,
        name: str, started: float, watch: ClientWatch | None,
    ) -> None:
        """
        A turn and a worker: send the request to it.
        """
        worker = turn.worker
        try:
            # Everything the worker needs is taken from the request now, once
            # it has a worker (a refused request costs none of it): when the
            # client goes away, twisted.web closes the request's content, and
            # a client that left while waiting cancelled the wait above.
            body = _body(request)
            head = self._request_head(request, body.size())
            head["language"] = language.name
            frame = self._frames.frame(head, handler, argv)
            exchange = Exchange(
                self._reactor, request, worker, self._pool, handler, self._limits.max_time,
                watch_client=watch is None,
            )
            if watch is not None:
                watch.then = exchange.client_gone
            exchange.start(head, body, frame)
        except BaseException:
            self.scheduler.release(turn)
            raise
        exchange.on_end = partial(
            self._answered, request, handler.url, turn, worker.pid, started, name
        )

    def _answered(
        self, request: Request, url: str, turn: Any, worker_pid: int | None, started: float,
        name: str, status: int | None,
    ) -> None:
        """
        The exchange of C{request} is over: give back its turn, emit its
        event.
        """
        try:
            self.scheduler.release(turn)
            self._served(request, url, status, started, worker_pid)
        except Exception:
            self._crashed(Failure(), request, name)

    def _language(self, request: Request, handler: HandlerSource) -> tuple[Any, Any]:
        """
        The handler's language (SPEC §3.3) and the command line that runs it.

        @raise HandlerLoadError: 400 for an unknown C{x-haiku-language}, 501
            for a language whose interpreter is not installed, 500 for code
            that cannot be passed to it.
        """
        override = request_parameter(request, LANGUAGE)
        try:
            language = self._detect(override, handler)
        except UnknownLanguage:
            known = ", ".join(language.name for language in self._languages)
            raise HandlerLoadError(
                400,
                f"The x-haiku-language parameter names an unknown language "
                f"{override!r}; known: {known}.",
            ) from None
        if not language.is_available():
            raise HandlerLoadError(
                501,
                f"Handler {handler.url} is written in {language.name}, whose "
                f"interpreter is not installed here.",
            )
        try:
            argv = language.argv(handler.source)
        except ValueError as e:
            raise HandlerLoadError(
                500, f"Handler {handler.url} could not be run: {e}"
            ) from None
        return language, argv

    def _detect(self, override: str | None, handler: HandlerSource) -> Any:
        """
        L{detect} the handler's language, remembered for the few handlers
        served last by their URL and C{override}: a pure function of those
        and the code, which is compared (by identity first: a handler the
        loader keeps is the same object each time).

        @raise UnknownLanguage: as L{detect} does (not remembered).
        """
        key = (handler.url, override)
        known = self._detected.get(key)
        source = handler.source
        if known is not None and (known[0] is source or known[0] == source):
            return known[1]
        language = detect(self._languages, override, handler.url, source)
        if len(self._detected) >= _DETECTED:
            self._detected.clear()
        self._detected[key] = (source, language)
        return language

    def _request_head(self, request: Request, body_length: int) -> dict[str, Any]:
        """
        The request's members of its C{REQUEST} frame (the handler's are
        L{RequestFrames}').
        """
        peer = request.getClientAddress()
        return {
            "method": request.method.decode("latin-1"),
            "url": request.uri.decode("latin-1"),
            "headers": [
                [name.decode("latin-1"), value.decode("latin-1")]
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ],
            "remote_addr": getattr(peer, "host", ""),
            "protocol": request.clientproto.decode("latin-1"),
            "console": console_mode(request_parameter(request, CONSOLE)),
            "max_console": self._limits.max_console,
            "debug": self._debug,
            "body_length": body_length,
        }

    def _crashed(self, failure: Any, request: Request, name: str) -> None:
        self.log.failure("serving {handler_url} failed", failure, handler_url=_shown(name))
        if not request.startedWriting and not request._disconnected:
            send_error(
                request, 500, f"Handler {_shown(name)} could not be run: internal error"
            )


def _shown(name: str | None) -> str:
    """
    A handler's name as logs and answers show it: credentials redacted,
    C{-} when the request named none.
    """
    return "-" if name is None else redact_url(name)


def _client(request: Request) -> str:
    return getattr(request.getClientAddress(), "host", "-")


def _body(request: Request) -> RequestBody:
    body = getattr(request, _BODY, None)
    return RequestBody.of(request) if body is None else body
