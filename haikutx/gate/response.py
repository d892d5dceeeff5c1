# -*- test-case-name: haikutx.test.test_gate -*-
"""
The response side of a gate connection: reads an application's response
head strictly, rewrites it for the client (its own C{Connection} and
framing), and passes the body through as bytes, framed as the application
framed it, or chunked for a kept-alive HTTP/1.1 client when the application
ends its body by closing.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from haikutx.gate.backends import BackendProtocol
from haikutx.net.http1 import (
    BadMessage,
    BodyFramer,
    end_to_end,
    head_end,
    parse_response_head,
)

#: Largest response head accepted from an application, in bytes.
MAX_RESPONSE_HEAD = 65536


class ResponseForwarder:
    """
    Forwards one response at a time to a client connection.

    The client connection (C{client}) provides C{transport}, C{count(status)},
    C{response_done()}, C{tunnel_started()} and C{backend_failed(reason)}.

    @ivar head_pending: no response head has been read yet.
    @ivar keep_alive: whether the client connection stays open after this
        response.
    """

    log = Logger()

    def __init__(self, client: Any) -> None:
        self._client = client
        self._buffer = bytearray()
        self._rest = b""
        self._framer = BodyFramer("none")
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

    def data(self, backend: BackendProtocol, data: bytes) -> None:
        """
        Bytes of the response from C{backend}.
        """
        client = self._client
        if self.head_pending:
            self._buffer += data
            if not self._read_head(backend):
                return
            data, self._buffer = bytes(self._buffer), bytearray()
            if client.state_is_tunnel():
                if data:
                    client.transport.write(data)
                client.tunnel_started()
                return
            if not data:
                if self._framer.done:
                    client.response_done()
                return
        if self._rest:
            data, self._rest = self._rest + data, b""
        framer = self._framer
        try:
            end = framer.consume(data)
        except BadMessage as e:
            self.log.error("port {port}: bad response body: {reason}", port=backend.port,
                           reason=e.reason)
            backend.reusable = False
            backend.transport.abortConnection()
            client.transport.abortConnection()
            return
        if end < len(data) and not framer.done:
            # An incomplete chunk line: kept for the next bytes.
            self._rest = data[end:]
        if end:
            body = data if end == len(data) else data[:end]
            if self._rechunk:
                client.transport.write(b"%x\r\n%s\r\n" % (len(body), body))
            else:
                client.transport.write(body)
        if framer.done:
            if end < len(data):
                backend.reusable = False
            client.response_done()

    def end_of_close(self) -> None:
        """
        The application closed a close-delimited body: end it for the client.
        """
        if self._rechunk:
            self._client.transport.write(b"0\r\n\r\n")

    def _read_head(self, backend: BackendProtocol) -> bool:
        client = self._client
        buffer = self._buffer
        while True:
            try:
                end = head_end(buffer)
                if end < 0:
                    if len(buffer) > MAX_RESPONSE_HEAD:
                        client.backend_failed("response head too large")
                    return False
                head = parse_response_head(buffer[:end])
            except BadMessage as e:
                client.backend_failed(f"bad response: {e.reason}")
                return False
            raw = bytes(buffer[:end])
            del buffer[:end]
            if head.status == 101 and self._upgrade:
                client.transport.write(raw)
                client.count(101)
                backend.reusable = False
                client.enter_tunnel()
                self.head_pending = False
                return True
            if 100 <= head.status < 200:
                client.transport.write(raw)
                continue
            break
        if not head.keep_alive:
            backend.reusable = False
        self._framer = framer = BodyFramer.for_response(head, self._method)
        self._rechunk = False
        out = [b"HTTP/1.1 %d " % head.status, head.reason, b"\r\n"]
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
        client.transport.write(b"".join(out))
        self.head_pending = False
        client.count(head.status)
        return True
