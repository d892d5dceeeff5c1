# -*- test-case-name: haikutx.test.test_body -*-
"""
Request bodies on the server's side: refused beyond C{--maxbody} before they
are read (L{LimitedRequest}), and sent to a worker in bounded frames, as
fast as the worker's pipe takes them (L{BodyFeed}).

twisted.web keeps a request's body in C{request.content}: in memory up to
100 kB, in an unlinked temporary file beyond, so the server's memory does not
grow with the body; L{BodyFeed} reads that file in L{wire.CHUNK} pieces, one
piece each time the pipe to the worker has drained.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IConsumer, IDelayedCall, IPullProducer
from twisted.logger import Logger
from twisted.web.http import Request as HTTPRequest
from twisted.web.server import Request
from zope.interface import implementer

from haikutx.child import wire
from haikutx.runtime.parameters import HANDLER, request_parameter

#: The default of C{--maxbody}, in bytes.
DEFAULT_MAX_BODY = 10 * 1024 * 1024

#: Seconds a connection whose body was refused is kept open, its input
#: discarded, so that the client reads the 413 before the connection closes
#: (closing with unread input would reset it and lose the answer).
LINGER = 5.0

#: Bodies up to this size are written with the request in one go.
_INLINE = wire.CHUNK

_BODY_END = wire.encode(wire.BODY_END)


def body_too_large(max_body: int) -> str:
    """
    The runtime's message for a body over C{max_body} bytes.
    """
    return f"The request body is larger than the limit of {max_body} bytes."


class LimitedRequest(Request):
    """
    A L{Request} that refuses a body larger than its site's C{max_body}
    (L{DEFAULT_MAX_BODY} for a site that names none) with 413: as soon as
    the headers are in when C{Content-Length} says so (no C{100 Continue} is
    sent, nothing of the body is read), or when a chunked body passes the
    limit.  The request then never reaches its resource; the refusal is
    logged with the handler the request named.
    """

    log = Logger()

    _body_received = 0
    _body_refused = False
    _linger: IDelayedCall | None = None
    #: Called with the reason if the connection is lost before the
    #: response is finished (L{watch_lost}).
    _on_lost: Any = None

    def _max_body(self) -> int:
        return int(getattr(getattr(self.channel, "site", None), "max_body", DEFAULT_MAX_BODY))

    def gotLength(self, length: int | None) -> None:
        if length and length > self._max_body():
            self.content = BytesIO()
            # allHeadersReceived answers "Expect: 100-continue" after us.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse_body(length)
            return
        if getattr(getattr(self.channel, "site", None), "getContentFile", None) is None:
            # What Request.gotLength does for a site without getContentFile,
            # without raising and catching its AttributeError.
            HTTPRequest.gotLength(self, length)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._body_refused:
            return
        self._body_received += len(data)
        if self._body_received > self._max_body():
            self._refuse_body(None)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._body_refused:
            return
        super().requestReceived(command, path, version)

    def watch_lost(self, lost: Any) -> None:
        """
        Have C{lost} called with the reason if the client goes away before
        the response is finished, as an errback of C{notifyFinish} would be,
        without its L{Deferred} (one per request); instead of any callable
        given before.
        """
        self._on_lost = lost

    def connectionLost(self, reason: Any) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        super().connectionLost(reason)
        lost, self._on_lost = self._on_lost, None
        if lost is not None and not self.finished:
            lost(reason)

    def _refuse_body(self, remaining: int | None) -> None:
        """
        Answer 413 on the raw transport (the request has not been processed,
        so twisted.web's response machinery is not ready), log it, and close
        the connection once the client has had the time to read the answer,
        or has sent all of its body.

        @param remaining: the body bytes still to come (its
            C{Content-Length}), or C{None} when unknown (chunked).
        """
        self._body_refused = True
        channel = self.channel
        limit = self._max_body()
        message = body_too_large(limit)
        self.uri = getattr(channel, "_path", b"/")
        method = getattr(channel, "_command", b"-")
        site = getattr(channel, "site", None)
        name = getattr(site, "handler_name", None) or request_parameter(self, HANDLER)
        self.log.warn(
            "{client} {method} {handler_url} -> {status}: {reason}",
            client=getattr(self.getClientAddress(), "host", "-"),
            method=method.decode("latin-1"),
            handler_url=name,
            status=413,
            reason=message,
        )
        body = message.encode("utf-8") + b"\n"
        transport = channel.transport
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body) + body
        )
        channel.persistent = False
        half_close = getattr(transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
            self._linger = channel.callLater(LINGER, transport.abortConnection)
        else:
            self._linger = channel.callLater(LINGER, transport.loseConnection)
        # Discard whatever else the client sends; once all of the body it
        # announced is in, the connection can close without a reset.  The
        # decoder at work (a chunked body) must not end the request either:
        # the channel would then stop reading, and never see the client go.
        current = channel._transferDecoder
        if current is not None:
            current.finishCallback = _ignore
        channel._transferDecoder = _Discard(remaining, transport.loseConnection)


def _ignore(*args: Any) -> None:
    pass


class _Discard:
    """
    A transfer decoder that drops its input, and calls C{done} once
    C{remaining} bytes (if known) have come.
    """

    def __init__(self, remaining: int | None, done: Callable[[], None]) -> None:
        self._remaining = remaining
        self._done = done

    def dataReceived(self, data: bytes) -> None:
        if self._remaining is None:
            return
        self._remaining -= len(data)
        if self._remaining <= 0:
            self._remaining = None
            self._done()

    def noMoreData(self) -> None:
        pass


class RequestBody:
    """
    The body of one request, as twisted.web received it (C{request.content}:
    a L{BytesIO}, or an unlinked temporary file beyond 100 kB).

    It is opened (L{open}) when a worker is about to receive it; from then on
    it holds a descriptor of its own, so it stays readable when twisted.web
    closes C{request.content} (the client went away, the response ended).
    """

    def __init__(self, content: Any) -> None:
        self._content = content
        #: The size found while the content is open (it is complete, and
        #: does not change).
        self._size: int | None = None

    @classmethod
    def of(cls, request: Request) -> RequestBody:
        """
        The body of C{request}.
        """
        return cls(getattr(request, "content", None))

    def size(self) -> int:
        """
        The body's length in bytes (0 once twisted.web has closed it).
        """
        content = self._content
        if content is None or content.closed:
            return 0
        if self._size is None:
            position = content.tell()
            content.seek(0, os.SEEK_END)
            self._size = int(content.tell())
            content.seek(position)
        return self._size

    def open(self) -> _BodyReader:
        """
        A reader of the body from its start (empty once twisted.web has
        closed it: its client has gone).
        """
        content = self._content
        if content is None or content.closed:
            return _BodyReader(data=b"")
        if isinstance(content, BytesIO):
            return _BodyReader(data=content.getvalue())
        return _BodyReader(fd=os.dup(content.fileno()))


class _BodyReader:
    def __init__(self, data: bytes | None = None, fd: int | None = None) -> None:
        self._data = data
        self._fd = fd
        self._offset = 0

    def read(self, size: int) -> bytes:
        if self._fd is not None:
            chunk = os.pread(self._fd, size, self._offset)
        else:
            assert self._data is not None
            chunk = self._data[self._offset : self._offset + size]
        self._offset += len(chunk)
        return chunk

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._data = b""


@implementer(IPullProducer)
class BodyFeed:
    """
    Sends a request to a worker: the request frame, the body in
    L{wire.BODY} frames of at most L{wire.CHUNK} bytes, then
    L{wire.BODY_END}.  A small body goes with the request in one write; a
    larger one is a pull producer on the worker's pipe (C{consumer}), which
    asks for the next frame only once it has written the last, so no more
    than a frame or two of it is in the server's memory at a time.

    @param write: writes bytes to the worker.
    @param consumer: the L{IConsumer} that C{write} feeds, or C{None} to
        write the whole body at once (a transport without one, in tests).
    """

    def __init__(self, write: Callable[[bytes], None], consumer: IConsumer | None) -> None:
        self._write = write
        self._consumer = consumer
        self._reader: _BodyReader | None = None
        self.done = True

    def start(self, head_frame: bytes, body: RequestBody | bytes) -> None:
        """
        Send C{head_frame} and then C{body}.
        """
        if not body or (isinstance(body, RequestBody) and body.size() == 0):
            # No body (most requests): the request and its end in one write.
            self._write(head_frame + _BODY_END)
            return
        reader = body.open() if isinstance(body, RequestBody) else _BodyReader(data=body)
        first = reader.read(_INLINE)
        frames = [head_frame]
        if first:
            frames.append(wire.encode(wire.BODY, first))
        if len(first) < _INLINE:
            reader.close()
            frames.append(_BODY_END)
            self._write(b"".join(frames))
            return
        self._write(b"".join(frames))
        self._reader = reader
        self.done = False
        if self._consumer is None:
            while not self.done:
                self.resumeProducing()
        else:
            self._consumer.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.done or self._reader is None:
            return
        chunk = self._reader.read(wire.CHUNK)
        if chunk:
            self._write(wire.encode(wire.BODY, chunk))
        else:
            self.stop()

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        """
        The pipe is gone (the worker died): send nothing more.
        """
        self._close()

    def stop(self) -> None:
        """
        End the body now (all of it sent, or its response is complete
        already): send L{wire.BODY_END} if the body was not complete.
        """
        if self.done:
            return
        self._close()
        self._write(_BODY_END)

    def _close(self) -> None:
        if self.done:
            return
        self.done = True
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._consumer is not None:
            self._consumer.unregisterProducer()
