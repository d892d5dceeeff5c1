# -*- test-case-name: haikutx.test.test_runtime -*-
"""
The objects a Python handler sees: C{req}, C{res} and C{console} (SPEC §3.1).

Standard library only: this runs in the worker process.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from haikutx.child.params import merge_params, parse_query


class Headers(dict):
    """
    Request headers: lower-case names, looked up case-insensitively; a
    header given several times has its values joined by C{", "}.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__()
        for name, value in pairs:
            name = name.lower()
            if name in self:
                super().__setitem__(name, self[name] + ", " + value)
            else:
                super().__setitem__(name, value)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)


class Request:
    """
    The request a handler answers.

    @ivar method: the HTTP method, such as C{"GET"}.
    @ivar url: the path and query string as received.
    @ivar path: the path alone.
    @ivar query: query parameters, name to last value.
    @ivar headers: the request headers (L{Headers}).
    @ivar remote_addr: the client's address.
    """

    path: str
    query: dict[str, str]
    headers: Headers

    def __init__(self, head: dict[str, Any], body: bytes) -> None:
        self.method: str = head["method"]
        self.url: str = head["url"]
        self._header_pairs = head["headers"]
        self.remote_addr: str = head.get("remote_addr", "")
        self._body = body
        self._params: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        # path, query and headers are made when first read (most handlers
        # read few of them); from then on they are plain attributes.
        if name == "headers":
            self.headers = Headers(self._header_pairs)
            return self.headers
        if name in ("path", "query", "_query_string"):
            parts = urlsplit(self.url)
            self.path = parts.path
            self._query_string = parts.query
            self.query = parse_query(parts.query)
            return getattr(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def body(self) -> bytes:
        """
        The whole request body.
        """
        return self._body

    @property
    def params(self) -> dict[str, Any]:
        """
        The query merged with a form, multipart or JSON body.

        @raise haikutx.child.params.BadRequestBody: for a malformed body (the
            caller gets 400 if the handler does not catch it).
        """
        if self._params is None:
            self._params = merge_params(
                self._query_string, self.headers.get("content-type", ""), self._body
            )
        return self._params

    def json(self) -> Any:
        """
        The body parsed as JSON.
        """
        return json.loads(self._body)


class Response:
    """
    The response a handler writes.  It streams: the head goes out at the
    first C{write_head}, C{write} or C{end}, and each C{write} at once.

    @ivar status_code: the status sent with the head (default 200).
    """

    def __init__(self, sink: ResponseSink) -> None:
        self._sink = sink
        self.status_code = 200
        self._headers: dict[str, tuple[str, Any]] = {}
        self.headers_sent = False
        self.finished = False

    def set_header(self, name: str, value: Any) -> None:
        """
        Set one response header (a list value sends the header once per item).

        @raise RuntimeError: once the head has been sent.
        """
        if self.headers_sent:
            raise RuntimeError("Cannot set headers after they are sent")
        self._headers[name.lower()] = (str(name), value)

    def get_header(self, name: str) -> Any:
        """
        The value of a response header set so far, or C{None}.
        """
        entry = self._headers.get(name.lower())
        return entry[1] if entry else None

    def remove_header(self, name: str) -> None:
        """
        Remove a response header set so far.
        """
        self._headers.pop(name.lower(), None)

    def write_head(self, status: int, headers: dict[str, Any] | None = None) -> None:
        """
        Set the status and headers and send the head.

        @raise RuntimeError: when the head was already sent.
        """
        if self.headers_sent:
            raise RuntimeError("write_head called after the head was sent")
        status = int(status)
        if not 200 <= status <= 599:
            raise ValueError(f"invalid status code {status}")
        self.status_code = status
        for name, value in (headers or {}).items():
            self.set_header(name, value)
        self._send_head()

    writeHead = write_head

    def write(self, data: str | bytes) -> None:
        """
        Send part of the body (C{str} is UTF-8 encoded) at once: it reaches
        the client even if the handler then computes without yielding.

        @raise RuntimeError: after C{end}.
        """
        self._write(data)
        self._sink.flush()

    def _write(self, data: str | bytes) -> None:
        if self.finished:
            raise RuntimeError("write after end")
        if not self.headers_sent:
            self._send_head()
        chunk = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        if chunk:
            self._sink.body(chunk)

    def end(self, data: str | bytes | None = None) -> None:
        """
        Send the last part of the body, if any, and finish the response.
        Calling C{end} again does nothing.
        """
        if self.finished:
            return
        if data is not None:
            # Sent with the end, in one write.
            self._write(data)
        elif not self.headers_sent:
            self._send_head()
        self.finished = True
        self._sink.end()

    def header_pairs(self) -> list[list[str]]:
        """
        The headers set so far, as C{[name, value]} pairs.
        """
        pairs = []
        for name, value in self._headers.values():
            values = value if isinstance(value, (list, tuple)) else [value]
            pairs.extend([name, str(v)] for v in values)
        return pairs

    def _send_head(self) -> None:
        self._sink.head(self)
        self.headers_sent = True


class ResponseSink:
    """
    Where a L{Response} sends its head, body and end (implemented by the
    worker's run of one request).
    """

    def head(self, response: Response) -> None:
        raise NotImplementedError()

    def body(self, data: bytes) -> None:
        raise NotImplementedError()

    def end(self) -> None:
        raise NotImplementedError()

    def flush(self) -> None:
        """
        Send what was written so far now, not at the end of the handler's
        current step.
        """


class Console:
    """
    The handler's C{console}: each call writes its arguments, joined by
    spaces, as one line.
    """

    def __init__(self, write: Callable[[str], None]) -> None:
        self._write = write

    def _line(self, *args: Any) -> None:
        self._write(" ".join(a if isinstance(a, str) else repr_arg(a) for a in args) + "\n")

    log = info = warn = error = debug = _line


def repr_arg(value: Any) -> str:
    """
    How a console argument that is not a string is written: JSON for plain
    data (as node's console shows objects), C{str()} otherwise.
    """
    if isinstance(value, (dict, list)):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            pass
    return str(value)
