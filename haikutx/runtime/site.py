# -*- test-case-name: haikutx.test.test_runtime -*-
"""
The runtime's C{twisted.web} site: a channel that reads a plain request's
head in one parse, asks for its connection's addresses once, sends a whole
response in one write and keeps one idle timer for its life, and an access
log that leaves out the requests the runtime logs itself.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.protocols.basic import LineReceiver
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.http_headers import Headers
from twisted.web.iweb import INonQueuedRequestFactory
from twisted.web.server import Request, Site

from haikutx.net.http1 import BadMessage, LastHead, parse_request_head
from haikutx.net.sending import write as send_at_once
from haikutx.runtime.body import DEFAULT_MAX_BODY
from haikutx.runtime.request import RuntimeRequest
from haikutx.runtime.timers import Deadline

#: Set on a request for which L{haikutx.runtime.resource.HandlerResource}
#: emits its own event (so L{RuntimeSite} writes no access-log line).
LOGGED_HERE = "haiku_logged"


#: Longest request head read in one parse (longer: Twisted's, line by line).
MAX_HEAD = 8192

#: Header fields after which Twisted reads the head itself (the hop-by-hop
#: ones, C{Connection} among them, are in L{Head.hop}; a body's are
#: L{Head.content_length} and L{Head.chunked}).
_NOT_PLAIN = frozenset((b"expect",))

_END = b"\r\n\r\n"


def _parse_plain(head: bytes) -> Any:
    return parse_request_head(head, require_host=False)


class RuntimeChannel(HTTPChannel):
    """
    An L{HTTPChannel} that reads a plain request's head in one parse, by the
    strict parser of haikutx (L{parse_request_head}), instead of
    C{twisted.web}'s line by line: a complete HTTP/1.1 head of at most
    L{MAX_HEAD} bytes, without a body, C{Expect} or hop-by-hop field, that
    arrives on an idle connection.  Its L{Request} is then made and run by
    C{twisted.web}'s own steps (L{HTTPChannel.allContentReceived}), after
    L{HTTPChannel.allHeadersReceived}, or, for a request that takes the
    parsed head itself (C{take_head}: L{RuntimeRequest}, the site's), after
    it has taken it; so the request, and its answer, are the ones Twisted's
    parse gives: the strict parser accepts no head that Twisted refuses,
    and reads the same fields from it.  Anything else, or
    a head the strict parser refuses, is read by Twisted as before, with
    its answers.  (L{plain_heads} turns it off, for comparisons.)  The
    connection's last head is remembered (L{LastHead}): a client that sends
    the same head again (a poller, a keep-alive client) is not parsed again.

    It asks its transport for the connection's addresses once: C{twisted.web}'s
    L{Request} asks for them on every request (a C{getsockname} system call
    each time for the local one on TCP), and they do not change.

    A response written whole between L{hold_writes} and L{send_held} goes to
    the client in one write, at once (no wait for the reactor's next turn,
    no change of what the reactor watches, when nothing else is waiting).

    Its idle timeout (L{TimeoutMixin}'s, given up while each request is
    answered and set again after it) keeps one reactor timer for the
    connection's life (a L{Deadline}), not a new one per request.
    """

    #: Whether plain heads are read in one parse.
    plain_heads = True

    _host: Any = None
    _peer: Any = None
    _idle: Deadline | None = None
    #: A response's pieces while writes are held (L{hold_writes}).
    _held: list[bytes] | None = None
    #: The connection's head parser, which remembers its last head.
    _parse: LastHead | None = None
    #: The request factory last used, and whether it takes no queue flag.
    _factory: Any = None
    _non_queued = False

    def getHost(self) -> Any:
        host = self._host
        if host is None:
            host = self._host = self.transport.getHost()
        return host

    def getPeer(self) -> Any:
        peer = self._peer
        if peer is None:
            peer = self._peer = self.transport.getPeer()
        return peer

    def dataReceived(self, data: bytes) -> None:
        if not self.plain_heads:
            super().dataReceived(data)
            return
        rest = self._plain_request(data)
        if rest is None:
            super().dataReceived(data)
            return
        while rest and not self.transport.disconnecting:
            # Requests that follow (pipelined), read in one parse while
            # each is answered at once and plain, then as Twisted reads.
            more = self._plain_request(rest)
            if more is None:
                LineReceiver.dataReceived(self, rest)
                return
            rest = more

    def _plain_request(self, data: bytes) -> bytes | None:
        """
        Run the request at the start of C{data} when its head is plain (see
        the class docstring) and the connection idle.

        @return: the rest of C{data}, or C{None} if the head was left for
            Twisted to read.
        """
        end = data.find(_END)
        if (
            end < 0
            or end + 4 > MAX_HEAD
            or data[:2] == b"\r\n"
            or self._busyReceiving
            or self._buffer
            or not self.line_mode
            or self.paused
            or self.requests
            or self._handlingRequest
            or not self.persistent
            or self._transferDecoder is not None
            or self._HTTPChannel__first_line != 1
            or self._receivedHeaderSize
        ):
            return None
        parse = self._parse
        if parse is None:
            parse = self._parse = LastHead(_parse_plain)
        try:
            head = parse(data[: end + 4])
        except BadMessage:
            return None  # Twisted answers it, with its 400
        fields = head.headers
        if (
            head.version != b"HTTP/1.1"
            or head.hop
            or head.chunked
            or head.content_length is not None
            or len(fields) > self.maxHeaders
        ):
            return None
        for name, _ in fields:
            if name in _NOT_PLAIN:
                return None
        self.resetTimeout()
        factory = self.requestFactory
        if factory is not self._factory:
            self._factory = factory
            self._non_queued = INonQueuedRequestFactory.providedBy(factory)
        request = factory(self) if self._non_queued else factory(self, 0)
        self.requests.append(request)
        self._command, self._path, self._version = head.method, head.target, head.version
        take = getattr(request, "take_head", None)
        if take is not None:
            # A request that takes the parsed head itself (RuntimeRequest):
            # what allHeadersReceived finds for it is known (an HTTP/1.1
            # connection without Connection: close stays persistent, no
            # Expect, no body).
            take(fields)
            self.persistent = True
        else:
            add = request.requestHeaders.addRawHeader
            for name, value in fields:
                add(name, value)
            # What Twisted's line reader does once the blank line is in,
            # for a request without a body.
            self.allHeadersReceived()
        self.allContentReceived()
        return data[end + 4 :]

    def hold_writes(self) -> None:
        """
        Keep what the channel is asked to write until L{send_held} (or the
        request is done, or the connection closed), to send it in one write.
        """
        if self._held is None:
            self._held = []

    def send_held(self) -> None:
        """
        Write what was held since L{hold_writes}, at once, and write as
        usual from now on.
        """
        held, self._held = self._held, None
        if held:
            # Sent at once on plain TCP; through TLS, or on any other
            # transport, written as usual.
            send_at_once(self.transport, b"".join(held))

    def write(self, data: bytes) -> None:
        held = self._held
        if held is None:
            self.transport.write(data)
        elif data:
            held.append(data)

    def writeSequence(self, iovec: Any) -> None:
        held = self._held
        if held is None:
            self.transport.writeSequence(iovec)
        else:
            held.extend(iovec)

    def requestDone(self, request: Any) -> None:
        # The response is all written: out before anything else happens.
        self.send_held()
        super().requestDone(request)

    def loseConnection(self) -> None:
        self.send_held()
        super().loseConnection()

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """
        Write a response head as L{HTTPChannel.writeHeaders} does, in one
        piece: a sequence's pieces (four per header) are each checked to be
        bytes in Python by the transport, a piece of ours once.
        """
        if not isinstance(headers, Headers):
            self.send_held()
            super().writeHeaders(version, code, reason, headers)
            return
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        held = self._held
        if held is None:
            self.transport.write(b"".join(head))
        else:
            held.extend(head)

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
        self._held = None
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

    Its requests are L{RuntimeRequest}s: L{LimitedRequest}s (a body over
    C{max_body} bytes is refused with 413 before it is read) that take a
    plain head as its channel parsed it.

    @ivar max_body: the largest request body accepted, in bytes.
    @ivar handler_name: the fixed handler the site runs, if any (named in
        the log of a refused body).
    """

    requestFactory = RuntimeRequest
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
