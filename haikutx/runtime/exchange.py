# -*- test-case-name: haikutx.test.test_runtime -*-
"""
One request run by one worker (L{Exchange}): the worker's response written
to the client as it comes, paced by the client's reading, and the answer
given for the worker when it fails or runs out of time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.web.http import NO_BODY_CODES, toChunk
from twisted.web.server import Request
from zope.interface import implementer

from haikutx.interfaces import IExchange
from haikutx.net.http1 import HOP_BY_HOP
from haikutx.net.sending import send_pending
from haikutx.runtime.body import RequestBody
from haikutx.runtime.loader import HandlerSource
from haikutx.runtime.pool import WorkerPool
from haikutx.runtime.worker import WorkerProtocol

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
        #: Called with the exchange's status (C{None}: its client went
        #: away) when it ends, if set: as a callback of L{done} would be,
        #: without a L{Deferred} made for each request.
        self.on_end: Callable[[int | None], None] | None = None
        self._ended = False
        self._status_at_end: int | None = None
        self._done: Deferred[int] | None = None
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
            watch_lost(request, self.client_gone)

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
            and not self._ended
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
        if not self._timing or self._ended or self._worker.kind != "stdio":
            return
        # A stdio run whose client has gone ends now, and every process it
        # started with it (its child is killed; its cgroup emptied).
        self._stop_clock()
        self._worker.detach(self)
        self._end(None)
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
        channel = request.channel
        # What is written from here on goes out in one write, at once, on a
        # channel that can hold its writes (the runtime's own).
        hold = None if self._client_gone else getattr(channel, "hold_writes", None)
        if hold is not None:
            hold()
        try:
            self._write_end(trailers)
        finally:
            if hold is not None:
                channel.send_held()
        if hold is None and channel is not None and not self._client_gone:
            send_pending(channel.transport)
        # The worker first: the request's turn, given back when it is
        # done, finds the worker idle.
        self._pool.release(self._worker)
        self._complete(self.status or 200)

    def _write_end(self, trailers: list[list[str]]) -> None:
        """
        Write the rest of the response, and end it.
        """
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
            request.finish()

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
        if self._ended:
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
        if not self._ended:
            self._end(status)

    @property
    def done(self) -> Deferred[int]:
        """
        A L{Deferred} that fires with the exchange's status when it ends
        (C{None}: its client went away).
        """
        if self._done is None:
            self._done = Deferred()
            if self._ended:
                self._done.callback(self._status_at_end)  # type: ignore[arg-type]
        return self._done

    def _end(self, status: int | None) -> None:
        self._ended = True
        self._status_at_end = status
        if self._done is not None:
            self._done.callback(status)  # type: ignore[arg-type]
        if self.on_end is not None:
            self.on_end(status)


class ClientWatch:
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


def watch_lost(request: Request, lost: Any) -> None:
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
