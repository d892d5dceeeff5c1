# -*- test-case-name: haikutx.test.test_runtime -*-
"""
The runtime as a C{twisted.web} resource: it names the handler of each
request, loads it, runs it in a worker from the pool and streams the
worker's response to the client.
"""

from __future__ import annotations

import gc
import re
from typing import Any
from urllib.parse import parse_qsl

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.tcp import Connection
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, HTTPChannel, _GenericHTTPChannelProtocol, toChunk
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from haikutx.child.console import console_mode
from haikutx.config import Limits
from haikutx.interfaces import IExchange
from haikutx.languages import UnknownLanguage, detect
from haikutx.net.http1 import HOP_BY_HOP
from haikutx.net.urls import redact_url
from haikutx.runtime.body import DEFAULT_MAX_BODY, LimitedRequest, RequestBody, body_too_large
from haikutx.runtime.events import EventEmitter
from haikutx.runtime.frames import RequestFrames
from haikutx.runtime.loader import HandlerLoadError, HandlerSource
from haikutx.runtime.pool import PoolBusy, WorkerPool
from haikutx.runtime.scheduler import Overloaded, Scheduler
from haikutx.runtime.tenants import handler_identity
from haikutx.runtime.timers import Deadline
from haikutx.runtime.worker import WorkerProtocol, handler_kind

HANDLER = "x-haiku-handler"
CONSOLE = "x-haiku-console"
LANGUAGE = "x-haiku-language"

NO_HANDLER = (
    "The x-haiku-handler HTTP request header or query parameter must specify "
    "the URL of the handler to run."
)

#: Response headers a handler may not set: the runtime frames the response.
#: C{Content-Length} among them: a handler's could be a lie (say 0, then
#: write a whole forged response) that splits a keep-alive connection, so
#: the next response its client, or a front proxy reusing the connection
#: for another tenant, reads would be the handler's.
_UNFRAMED = HOP_BY_HOP | {b"content-length"}

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")

#: Response bytes the server holds for a client that reads slowly before
#: it stops reading the handler's channel (the handler then waits).
RESPONSE_BUFFER = 4 * 1024 * 1024

#: Set on a request for which L{HandlerResource} emits its own event.
_LOGGED_HERE = "haiku_logged"

#: Set on a request to the handler it is accounted under: its identity,
#: then, once it asks for a worker, its tenant.
_IDENTITY = "haiku_handler"
_TENANT = "haiku_tenant"

#: Set on a request to its query string's parameters, name to last value.
_QUERY = "haiku_query"

#: Set on a request to its C{x-haiku-*} headers, by lower-case name.
_HEADERS = "haiku_headers"

#: Handlers whose language a L{HandlerResource} remembers (their code with
#: it: a bound on what it keeps).
_DETECTED = 64

#: Seconds a client refused with 429 is told to wait.
RETRY_OVERLOADED = 1


#: The limits a L{HandlerResource} holds handlers to unless told others
#: (a frozen value, so one instance serves every default).
DEFAULT_LIMITS = Limits()


class RuntimeChannel(HTTPChannel):
    """
    An L{HTTPChannel} that asks its transport for the connection's local
    address once: C{twisted.web}'s L{Request} asks for it on every request
    (a C{getsockname} system call each time on TCP), and a connection's
    local address does not change.

    Its idle timeout (L{TimeoutMixin}'s, given up while each request is
    answered and set again after it) keeps one reactor timer for the
    connection's life (a L{Deadline}), not a new one per request.
    """

    _host: Any = None
    _idle: Deadline | None = None

    def getHost(self) -> Any:
        host = self._host
        if host is None:
            host = self._host = self.transport.getHost()
        return host

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """
        Write a response head as L{HTTPChannel.writeHeaders} does, in one
        piece: a sequence's pieces (four per header) are each checked to be
        bytes in Python by the transport, a piece of ours once.
        """
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        self.transport.write(b"".join(head))

    def setTimeout(self, period: float | None) -> float | None:
        """
        Time the connection out after C{period} idle seconds (C{None}: no
        more), as L{TimeoutMixin.setTimeout} does.  (Given up, its timer
        fires once more, to no effect, unless set again: for a connection
        handed over to HTTP/2, whose channel times out on its own.)

        @return: the period before.
        """
        previous, self.timeOut = self.timeOut, period
        idle = self._idle
        if period is None:
            if idle is not None:
                idle.clear()
        else:
            if idle is None:
                clock = getattr(self.factory, "reactor", None)
                if clock is None:
                    from twisted.internet import reactor as clock
                idle = self._idle = Deadline(clock, self.timeoutConnection)
            idle.set(period)
        return previous

    def resetTimeout(self) -> None:
        """
        Restart the idle timeout, if it is running (L{TimeoutMixin}).
        """
        idle = self._idle
        if idle is not None and idle.pending and self.timeOut is not None:
            idle.set(self.timeOut)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if self._idle is not None:
            self._idle.stop()


def _runtime_channel_protocol(site: Site) -> _GenericHTTPChannelProtocol:
    """
    The protocol of a L{RuntimeSite}'s connection: C{twisted.web}'s own
    (HTTP/1.1, or HTTP/2 when negotiated) on a L{RuntimeChannel}.
    """
    return _GenericHTTPChannelProtocol(RuntimeChannel())


class RuntimeSite(Site):
    """
    A L{Site} whose access log leaves out the requests L{HandlerResource}
    answers: for each of those the runtime emits one structured event of
    its own (SPEC §7: client, method, handler, status, duration, worker),
    so that every request costs one log line, not two.

    Its requests are L{LimitedRequest}s: a body over C{max_body} bytes is
    refused with 413 before it is read.

    @ivar max_body: the largest request body accepted, in bytes.
    @ivar handler_name: the fixed handler the site runs, if any (named in
        the log of a refused body).
    """

    requestFactory = LimitedRequest
    protocol = _runtime_channel_protocol

    def __init__(
        self, resource: Any, *args: Any, max_body: int = DEFAULT_MAX_BODY,
        handler_name: str | None = None, **kwargs: Any,
    ) -> None:
        super().__init__(resource, *args, **kwargs)
        self.max_body = max_body
        self.handler_name = handler_name

    def log(self, request: Request) -> None:
        if not getattr(request, _LOGGED_HERE, False):
            super().log(request)

    def startFactory(self) -> None:
        super().startFactory()
        freeze_startup_heap()


_heap_frozen = False


def freeze_startup_heap() -> None:
    """
    Move every object the process has made so far out of the cyclic
    garbage collector's sight (C{gc.freeze}), once per process, when the
    runtime starts serving: the modules, plugins and services made at start
    live as long as the server, and each collection would otherwise walk
    them all again (a hello request's path collects every 35 requests or
    so, and a full collection walks every object).
    """
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.collect()
        gc.freeze()


def request_parameter(request: Request, name: str) -> str | None:
    """
    A C{x-haiku-*} parameter: the request header if given and not empty,
    else the last value in the query string.

    @param request: the request.
    @param name: the parameter's (lower-case) name.
    @return: its value, or C{None}.
    """
    headers = getattr(request, _HEADERS, None)
    if headers is None:
        # The request's x-haiku-* headers found in one pass, whichever
        # parameter is asked first (not a header lookup for each).
        headers = {}
        for raw, values in request.requestHeaders.getAllRawHeaders():
            if raw[:8].lower() == b"x-haiku-" and values:
                headers[raw.lower()] = values
        setattr(request, _HEADERS, headers)
    if name.startswith("x-haiku-"):
        values = headers.get(name.encode("latin-1")) if headers else None
        header = values[-1].decode("utf-8") if values else None
    else:
        header = request.getHeader(name)
    if header:
        return header
    query = getattr(request, _QUERY, None)
    if query is None:
        # Parsed once per request, whichever parameter is asked first.
        uri = request.uri
        query = (
            dict(parse_qsl(uri.split(b"?", 1)[1].decode("latin-1"), keep_blank_values=True))
            if b"?" in uri
            else {}
        )
        setattr(request, _QUERY, query)
    return query.get(name)


def send_error(request: Request, status: int, message: str) -> None:
    """
    Answer C{request} with C{status} and a plain-text C{message}.
    """
    body = message.encode("utf-8") + b"\n"
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.write(body)
    request.finish()


@implementer(IExchange)
class Exchange:
    """
    One request run by one worker: writes the worker's response to the
    client, and answers for the worker when it fails or runs out of time.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        request: Request,
        worker: WorkerProtocol,
        pool: WorkerPool,
        handler: HandlerSource,
        max_time: float,
        watch_client: bool = True,
    ) -> None:
        self._reactor = reactor
        self._request = request
        self._worker = worker
        self._pool = pool
        self._handler = handler
        self._max_time = max_time
        self._manual_chunks = False
        self._client_gone = False
        self.status: int | None = None
        #: The request's C{REQUEST} frame, when made before it is sent
        #: (L{haikutx.runtime.frames}).
        self.frame: bytes | None = None
        self.done: Deferred[int] = Deferred()
        #: The request's time limit: the worker's (L{Deadline}), which
        #: serves one request at a time, or a timer of its own.
        self._limit: Any = None
        self._timer: IDelayedCall | None = None
        self._timing = False
        self._source: Any = None
        #: Body bytes received in the current read of the child's channel.
        self._held: list[bytes] = []
        self._child: Any = None
        #: Whether the child's channel was paced by the client's (L{_pace}).
        self._paced = False
        if watch_client:
            _watch_lost(request, self.client_gone)

    def start(
        self, head: dict[str, Any], body: RequestBody, frame: bytes | None = None
    ) -> None:
        """
        Send the request to the worker and start the clock.

        @param frame: the request's C{REQUEST} frame, if made already.
        """
        self._timing = True
        limit = self._limit = getattr(self._worker, "time_limit", None)
        if limit is not None:
            limit.set(self._max_time, self._timed_out)
        else:
            self._timer = self._reactor.callLater(self._max_time, self._timed_out)
        self._child = getattr(self._worker, "child", None)
        self.frame = frame
        self._worker.run(self, head, body)

    def _pace(self) -> None:
        """
        Have a client that does not read pause the child's channel, once
        the server holds RESPONSE_BUFFER bytes of the response for it
        (from the first part of a response that streams: one written whole
        needs no pacing).
        """
        source = getattr(self._child, "transport", None)
        if (
            hasattr(source, "pauseProducing")
            and not self.done.called
            and self._request.channel is not None
            and self._request.producer is None
        ):
            self._source = _Valve(source, RESPONSE_BUFFER)
            self._request.registerProducer(self._source, True)

    def _release_source(self) -> None:
        """
        Stop pausing the child's channel with the client's (the response is
        over, or the client gone).
        """
        source, self._source = self._source, None
        if source is None:
            return
        if self._request.channel is not None and self._request.producer is source:
            self._request.unregisterProducer()
        source.resumeProducing()

    def client_gone(self, reason: Any) -> None:
        """
        The client went away before the response ended.
        """
        self._client_gone = True
        self._release_source()
        if not self._timing or self.done.called or self._worker.kind != "stdio":
            return
        # A stdio run whose client has gone ends now, and every process it
        # started with it (its child is killed; its cgroup emptied).
        self._stop_clock()
        self._worker.detach(self)
        self.done.callback(None)  # type: ignore[arg-type]
        self._worker.kill("its client went away")

    # IExchange

    def head(self, status: int, headers: list[list[str]]) -> None:
        request = self._request
        self.status = status
        if self._client_gone:
            return
        request.setResponseCode(status)
        trailers = False
        for name, value in headers:
            raw = _field_name(name)
            if raw is None or raw.lower() in _UNFRAMED:
                continue
            if raw.lower() == b"trailer":
                trailers = True
            request.responseHeaders.addRawHeader(raw, _header_value(value))
        if trailers:
            self._start_trailers()

    def _start_trailers(self) -> None:
        request = self._request
        if request.clientproto != b"HTTP/1.1" or request.method == b"HEAD":
            request.responseHeaders.removeHeader(b"trailer")
            return
        request.responseHeaders.removeHeader(b"content-length")
        request.write(b"")
        if request.chunked:
            request.chunked = False
            self._manual_chunks = True

    def data(self, data: bytes) -> None:
        if self._client_gone or not data:
            # An empty chunk would be the last chunk: the response's end.
            return
        # Held until the end of the read that brought it (flush), so that a
        # response whose end came in the same read is written whole, with
        # its length, in one write.
        self._held.append(data)

    def flush(self) -> None:
        self._write_held(streaming=True)

    def _write_held(self, streaming: bool) -> None:
        held = self._held
        if not held:
            return
        data = held[0] if len(held) == 1 else b"".join(held)
        held.clear()
        if self._client_gone:
            return
        if streaming and self._source is None and not self._paced:
            self._paced = True
            self._pace()
        if self._source is not None:
            self._source.wrote(len(data))
        if self._manual_chunks:
            self._request.write(b"".join(toChunk(data)))
        else:
            self._request.write(data)

    def finish(self, trailers: list[list[str]]) -> None:
        request = self._request
        if (
            self._held
            and not self._client_gone
            and not self._manual_chunks
            and not request.startedWriting
            and request.code not in NO_BODY_CODES
        ):
            # The whole response is here: sent with its length, not chunked.
            request.responseHeaders.setRawHeaders(
                b"content-length", [b"%d" % sum(map(len, self._held))]
            )
        self._write_held(streaming=False)
        self._release_source()
        if not self._client_gone:
            if self._manual_chunks:
                lines = b"".join(
                    raw + b": " + _header_value(value) + b"\r\n"
                    for raw, value in (
                        (_field_name(name), value) for name, value in trailers
                    )
                    if raw is not None and raw.lower() not in _UNFRAMED
                )
                self._request.write(b"0\r\n" + lines + b"\r\n")
            channel = request.channel
            request.finish()
            if channel is not None:
                _send_now(channel.transport)
        # The worker first: the request's turn, given back when it is
        # done, finds the worker idle.
        self._pool.release(self._worker)
        self._complete(self.status or 200)

    def fail(self, status: int, message: str) -> None:
        self._write_held(streaming=False)
        self._pool.release(self._worker)
        self._answer(status, message)

    def lost(self, reason: str) -> None:
        self._answer(500, f"Handler {self._handler.url} did not complete: {reason}.")

    # Failures

    def _timed_out(self) -> None:
        self._timing = False
        self._timer = None
        self._worker.detach(self)
        self._answer(
            500,
            f"Handler {self._handler.url} did not complete within the time limit "
            f"of {self._max_time * 1000:.0f} ms",
        )
        self._worker.kill("exceeded the time limit of its request")

    def _answer(self, status: int, message: str) -> None:
        """
        Answer with the runtime's error; once the head is out, all that can
        be done is to close the connection.
        """
        if self.done.called:
            return
        self._release_source()
        request = self._request
        if not self._client_gone:
            if request.startedWriting:
                self.log.warn(
                    "{handler_url} failed after its response started: {reason}",
                    handler_url=self._handler.url,
                    reason=message,
                )
                request.channel.transport.loseConnection()
                status = self.status or status
            else:
                for name, _ in list(request.responseHeaders.getAllRawHeaders()):
                    if name.lower() != b"x-haiku-cache":
                        request.responseHeaders.removeHeader(name)
                send_error(request, status, message)
        self._complete(status, message)

    def _stop_clock(self) -> None:
        """
        Give up the request's time limit (its worker's, if it is still
        this request's: the worker may serve the next one already).
        """
        if not self._timing:
            return
        self._timing = False
        if self._limit is not None:
            self._limit.clear(self._timed_out)
        elif self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _complete(self, status: int, message: str | None = None) -> None:
        self._stop_clock()
        if message is not None:
            self.log.warn(
                "{handler_url} -> {status}: {reason}",
                handler_url=self._handler.url,
                status=status,
                reason=message.split("\n", 1)[0],
                worker_pid=self._worker.pid,
            )
        if not self.done.called:
            self.done.callback(status)


def _send_now(transport: Any) -> None:
    """
    Send what a TCP connection holds now, instead of at the reactor's next
    turn: the client has its response before the server does the
    request's bookkeeping (its turn given to the next request, its
    accounting, its log event).  What the socket does not take is sent
    when it is writable, as always; an error is the reactor's to handle
    then (the data stays, and the descriptor is still watched).  A TLS
    connection is one too: its ciphertext is in the same buffer.
    """
    if isinstance(transport, Connection) and not transport.disconnecting:
        transport.doWrite()


class _ClientWatch:
    """
    What a request's client going away does now (C{then}): first give up
    its wait for a worker, then end its exchange.
    """

    def __init__(self, then: Any) -> None:
        self.then = then

    def __call__(self, reason: Any) -> None:
        self.then(reason)


def _field_name(name: str) -> bytes | None:
    """
    A handler's header or trailer name as sent, or C{None} when it is not
    an HTTP token (a name with CR LF in it could end the response and
    start a forged one).
    """
    raw = name.encode("latin-1", "replace")
    return raw if _TOKEN.fullmatch(raw) else None


@implementer(IPushProducer)
class _Valve:
    """
    Pauses a child's channel for a slow client, but only once the client's
    connection holds more than C{limit} bytes written since it last drained:
    most responses are taken whole, so their handler is done at once (its
    time limit counts until its end), and none holds more server memory.
    """

    def __init__(self, source: Any, limit: int) -> None:
        self._source = source
        self._limit = limit
        self._held = 0
        self._full = False

    def wrote(self, size: int) -> None:
        """
        C{size} bytes of the response went into the client's connection.
        """
        self._held += size
        if self._full and self._held > self._limit:
            self._source.pauseProducing()

    def pauseProducing(self) -> None:
        self._full = True
        if self._held > self._limit:
            self._source.pauseProducing()

    def resumeProducing(self) -> None:
        # The client's connection has drained.
        self._full = False
        self._held = 0
        self._source.resumeProducing()

    def stopProducing(self) -> None:
        self._full = False
        self._source.resumeProducing()


def _header_value(value: str) -> bytes:
    return value.encode("utf-8").replace(b"\r", b" ").replace(b"\n", b" ")


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
        setattr(request, _LOGGED_HERE, True)
        name = self._handler or request_parameter(request, HANDLER)
        if not name:
            if request.uri == b"/favicon.ico":
                self._served(request, None, 404, self._reactor.seconds(), None)
                request.setResponseCode(404)
                request.responseHeaders.setRawHeaders(b"content-length", [b"0"])
                return b""
            self._refuse(request, 400, NO_HANDLER, None)
            return NOT_DONE_YET
        if RequestBody.of(request).size() > self._limits.max_body:
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
        acquiring = scheduler.acquire(tenant, self._limits.max_time, kind)
        if acquiring.called and not isinstance(acquiring.result, Failure):
            self._granted(
                acquiring.result, request, handler, language, argv, name, started, None
            )
            return
        watch = None
        if not acquiring.called:
            # A client that leaves while waiting gives up its place in the
            # queue (and later, its exchange ends: one watch for both).
            watch = _ClientWatch(lambda _: acquiring.cancel())
            _watch_lost(request, watch)
        acquiring.addCallbacks(
            self._granted, self._not_granted,
            callbackArgs=(request, handler, language, argv, name, started, watch),
            errbackArgs=(request, handler, name, started),
        ).addErrback(self._crashed, request, name)

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
        name: str, started: float, watch: _ClientWatch | None,
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
        exchange.done.addCallback(
            self._answered, request, handler.url, turn, worker.pid, started
        ).addErrback(self._crashed, request, name)

    def _answered(
        self, status: int | None, request: Request, url: str, turn: Any, worker_pid: int | None,
        started: float,
    ) -> None:
        """
        The exchange of C{request} is over: give back its turn, emit its
        event.
        """
        self.scheduler.release(turn)
        self._served(request, url, status, started, worker_pid)

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
    return RequestBody.of(request)


def _watch_lost(request: Request, lost: Any) -> None:
    """
    Have C{lost} called with the reason if C{request}'s client goes away
    before its response is finished: by a L{LimitedRequest} itself, else
    through C{notifyFinish}.
    """
    watch = getattr(request, "watch_lost", None)
    if watch is not None:
        watch(lost)
    else:
        request.notifyFinish().addErrback(lost)
