# -*- test-case-name: haikutx.test.test_runtime -*-
"""
The runtime's C{twisted.web} site: a channel that asks for its connection's
local address once and keeps one idle timer for its life, and an access log
that leaves out the requests the runtime logs itself.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from haikutx.runtime.body import DEFAULT_MAX_BODY, LimitedRequest
from haikutx.runtime.timers import Deadline

#: Set on a request for which L{haikutx.runtime.resource.HandlerResource}
#: emits its own event (so L{RuntimeSite} writes no access-log line).
LOGGED_HERE = "haiku_logged"


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
    A L{Site} whose access log leaves out the requests L{haikutx.runtime.resource.HandlerResource}
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
        if not getattr(request, LOGGED_HERE, False):
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
