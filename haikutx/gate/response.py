# -*- test-case-name: haikutx.test.test_gate -*-
"""
The application side of a gate connection: the application connection in
use, and the response on it. The response head is read strictly and
rewritten for the client (its own C{Connection} and framing); the body
passes through as bytes, framed as the application framed it, or chunked
for a kept-alive HTTP/1.1 client when the application ends its body by
closing. A finished connection goes back to the pool when it can serve
another request.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from haikutx.gate.backends import BackendPool, BackendProtocol
from haikutx.gate.states import State
from haikutx.net.http1 import (
    BadMessage,
    BodyFramer,
    LastHead,
    end_to_end,
    head_end,
    parse_response_head,
)
from haikutx.net.sending import write

#: Largest response head accepted from an application, in bytes.
MAX_RESPONSE_HEAD = 65536


class ApplicationSide:
    """
    The application side of one client connection (C{client}, a
    L{haikutx.gate.forward.GateProtocol}), one request at a time; the
    L{BackendProtocol} in use reports to it.

    @ivar backend: the application connection in use, or C{None}.
    """

    log = Logger()

    def __init__(self, client: Any, pool: BackendPool) -> None:
        self._client = client
        self._pool = pool
        self.backend: BackendProtocol | None = None
        self._idle = False
        self._retry_head: bytes | None = None
        #: The response being read.
        self.response = ResponseReader(client, self)

    def attach(self, backend: BackendProtocol, head: bytes, retry: bool) -> None:
        """
        Send a request head on C{backend}, with flow control both ways.

        @param backend: a new connection, one from the pool, or the one
            L{kept}.
        @param retry: the request has no body and an idempotent method, so
            it may be sent again on a
            new connection if a reused C{backend} closes unanswered.
        """
        if backend is not self.backend:
            self.release(True)
            client = self._client
            backend.owner = self
            self.backend = backend
            client.valve.resume("consumer")
            client.transport.registerProducer(backend.valve, True)
            backend.transport.registerProducer(client.valve, True)
        self._idle = False
        self._retry_head = head if retry and backend.reused else None
        write(backend.transport, head)

    def keep(self) -> None:
        """
        The response is complete and the client connection stays open: keep
        the application connection, if it can serve another request, for
        this client's next one.
        """
        backend = self.backend
        if backend is not None and backend.reusable and backend.connected_:
            backend.reused = True
            self._idle = True
        else:
            self.release(False)

    def kept(self, port: int) -> BackendProtocol | None:
        """
        The application connection L{keep} kept, if it goes to C{port}.
        """
        backend = self.backend
        if backend is not None and backend.port == port and backend.connected_:
            return backend
        return None

    def client_gone(self) -> None:
        """
        The client connection closed: a kept application connection goes to
        the pool, one in the middle of a request is closed.
        """
        if self._idle:
            self.release(True)
        else:
            self.close()

    def write(self, data: bytes) -> None:
        """
        Pass client bytes (body, tunnel) to the application.
        """
        assert self.backend is not None
        write(self.backend.transport, data)

    def release(self, reusable: bool) -> None:
        """
        Done with the application connection: to the pool when C{reusable},
        else closed.
        """
        backend, self.backend = self.backend, None
        self._idle = False
        if backend is None:
            return
        client = self._client
        client.transport.unregisterProducer()
        client.valve.resume("consumer")
        if backend.transport is None:
            return
        backend.transport.unregisterProducer()
        if reusable and backend.reusable:
            self._pool.give(backend)
        else:
            backend.transport.loseConnection()

    def abort(self) -> None:
        """
        Abort the application connection (it cannot be reused).
        """
        backend = self.backend
        if backend is not None and backend.transport is not None:
            backend.reusable = False
            backend.transport.abortConnection()

    def close(self) -> None:
        """
        The client is gone: close the application connection.
        """
        backend = self.backend
        if backend is not None and backend.transport is not None:
            backend.transport.loseConnection()

    def backend_data(self, backend: BackendProtocol, data: bytes) -> None:
        """
        Bytes from the application: a response head, body, or tunnel data.
        """
        client = self._client
        client.touch()
        if backend is not self.backend or client.state is State.CLOSED:
            backend.transport.loseConnection()
            return
        if client.state is State.TUNNEL:
            write(client.transport, data)
            return
        if self._idle:
            # Bytes nobody asked for: this connection cannot be trusted.
            backend.reusable = False
            self.release(False)
            return
        self._retry_head = None
        self.response.data(backend, data)

    def backend_lost(self, backend: BackendProtocol) -> None:
        """
        The application connection closed.
        """
        if backend is not self.backend:
            return
        client = self._client
        client.valve.resume("consumer")
        if client.state is State.CLOSED:
            return
        self.backend = None
        self._idle = False
        client.transport.unregisterProducer()
        if client.state is State.TUNNEL:
            client.transport.loseConnection()
        elif client.state in (State.BODY, State.WAITING):
            response = self.response
            if response.received_nothing and self._retry_head is not None:
                head, self._retry_head = self._retry_head, None
                client.dispatch.retry(head)
            elif response.head_pending:
                client.backend_failed("closed before answering")
            elif response.close_delimited:
                response.end_of_close()
                client.response_done()
            else:
                client.cut()


class ResponseReader:
    """
    Reads one response at a time from the application connection and
    passes it on to the client connection (C{client}).

    @ivar head_pending: no response head has been read yet.
    @ivar keep_alive: whether the client connection stays open after this
        response.
    """

    log = Logger()

    def __init__(self, client: Any, side: ApplicationSide) -> None:
        self._client = client
        self._side = side
        self._buffer = bytearray()
        self._rest = b""
        self._framer = BodyFramer("none")
        self._parse_head = LastHead(parse_response_head)
        self._rechunk = False
        self._method = b""
        self._http10 = False
        self._upgrade = False
        self.head_pending = True
        self.keep_alive = True

    def start(self, method: bytes, http10: bool, keep_alive: bool, upgrade: bool) -> None:
        """
        Expect the response to a new request.
        """
        self._buffer = bytearray()
        self._rest = b""
        self._method = method
        self._http10 = http10
        self._upgrade = upgrade
        self.keep_alive = keep_alive
        self.head_pending = True

    @property
    def received_nothing(self) -> bool:
        """
        Whether no byte of the response has arrived.
        """
        return self.head_pending and not self._buffer

    @property
    def close_delimited(self) -> bool:
        """
        Whether the body ends when the application closes.
        """
        return self._framer.mode == "close"

    @property
    def buffered(self) -> int:
        """
        Bytes held (tests).
        """
        return len(self._buffer) + len(self._rest)

    def end_of_close(self) -> None:
        """
        The application closed a close-delimited body: end it for the client.
        """
        if self._rechunk:
            write(self._client.transport, b"0\r\n\r\n")

    def data(self, backend: BackendProtocol, data: bytes) -> None:
        """
        Bytes of the response from C{backend}: what of them can be passed
        on goes to the client in one write (the head and the body that came
        with it, the common case, in one C{send}).
        """
        client = self._client
        out = b""
        if self.head_pending:
            if self._buffer:
                self._buffer += data
                data = bytes(self._buffer)
            at = self._read_head(backend, data)
            if at is None:
                return
            out, data = at
            self._buffer = bytearray()
            if client.state is State.TUNNEL:
                write(client.transport, out + data)
                client.tunnel_started()
                return
        elif self._rest:
            data, self._rest = self._rest + data, b""
        framer = self._framer
        try:
            end = framer.consume(data)
        except BadMessage as e:
            self.log.error("port {port}: bad response body: {reason}", port=backend.port,
                           reason=e.reason)
            self._side.abort()
            client.transport.abortConnection()
            return
        if end < len(data) and not framer.done:
            # An incomplete chunk line: kept for the next bytes.
            self._rest = data[end:]
        if end:
            body = data if end == len(data) else data[:end]
            if self._rechunk:
                body = b"%x\r\n%s\r\n" % (len(body), body)
            out = out + body if out else body
        if out:
            write(client.transport, out)
        if framer.done:
            if end < len(data):
                backend.reusable = False
            client.response_done()

    def _read_head(
        self, backend: BackendProtocol, data: bytes
    ) -> tuple[bytes, bytes] | None:
        """
        Read the response head at the start of C{data} (and any interim
        C{1xx} heads before it).

        @return: what to send the client for the head(s) and the bytes after
            the head, or C{None} when the head is incomplete (kept) or bad
            (answered).
        """
        client = self._client
        interim = b""
        while True:
            try:
                end = head_end(data)
                if end < 0:
                    if interim:
                        write(client.transport, interim)
                    if len(data) > MAX_RESPONSE_HEAD:
                        client.backend_failed("response head too large")
                    else:
                        self._buffer = bytearray(data)
                    return None
                head = self._parse_head(data[:end])
            except BadMessage as e:
                if interim:
                    write(client.transport, interim)
                client.backend_failed(f"bad response: {e.reason}")
                return None
            raw, data = data[:end], data[end:]
            if head.status == 101 and self._upgrade:
                client.dispatch.count(101)
                backend.reusable = False
                client.enter_tunnel()
                self.head_pending = False
                return interim + raw, data
            if 100 <= head.status < 200:
                interim += raw
                continue
            break
        self.head_pending = False
        if not head.keep_alive:
            backend.reusable = False
        self._framer = framer = BodyFramer.for_response(head, self._method)
        self._rechunk = False
        client.dispatch.count(head.status)
        if not head.hop and head.version == b"HTTP/1.1" and framer.mode != "close":
            # Nothing to take out (the common case): the head as it came.
            tail = b"\r\n" if self.keep_alive else b"connection: close\r\n\r\n"
            return interim + raw[:-2] + tail, data
        out = [interim, b"HTTP/1.1 %d " % head.status, head.reason, b"\r\n"]
        for name, value in end_to_end(head):
            out += [name, b": ", value, b"\r\n"]
        if framer.mode == "chunked":
            out.append(b"transfer-encoding: chunked\r\n")
        elif framer.mode == "close":
            backend.reusable = False
            if self._http10:
                self.keep_alive = False
            elif self.keep_alive:
                self._rechunk = True
                out.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive:
            out.append(b"connection: close\r\n")
        elif self._http10:
            out.append(b"connection: keep-alive\r\n")
        out.append(b"\r\n")
        return b"".join(out), data
