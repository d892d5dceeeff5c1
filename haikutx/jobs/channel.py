# -*- test-case-name: haikutx.test.test_jobs -*-
"""
The job API's HTTP channel: Twisted's L{HTTPChannel}, with the exchange
clients repeat most (a poll, C{GET /<id>} of a job the runner knows) answered
as soon as its bytes arrive, without a L{Request}: one parse of the head, the
job's JSON (kept while the job is unchanged) and one C{send}.

Anything else, and a poll the fast path is not sure of (another method, a
body, C{Connection}, C{Expect}, HTTP/1.0, a request already under way on the
connection, part of a request, pipelined requests, a job the runner does
not hold, a missing or wrong token), goes through Twisted as before, so the
answers are the same either way.
"""

from __future__ import annotations

import hmac
import re
import time
from typing import Any

from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.server import version as SERVER_VERSION

from haikutx.jobs.send import send_now

#: Largest request head the fast path reads (larger: Twisted's own parse).
MAX_HEAD = 8192

_JOB_TARGET = re.compile(rb"^/([0-9a-f]{40})/?(?:\?[\x21-\x7e]*)?$")

#: A header field's name (RFC 9110's token).
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

#: Header fields after which Twisted handles the request itself.
_NOT_FAST = frozenset(
    (b"content-length", b"transfer-encoding", b"expect", b"connection", b"upgrade")
)

_END = b"\r\n\r\n"


class _Date:
    """
    The C{Date} header's value, formatted once a second.
    """

    def __init__(self) -> None:
        self._second = -1
        self._text = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._text = datetimeToString(second)
        return self._text


_DATE = _Date()


class JobChannel(HTTPChannel):
    """
    An L{HTTPChannel} of the job API (see the module's docstring). Its
    site's resource is a L{haikutx.jobs.api.JobsResource}.
    """

    _host: Any = None

    def getHost(self) -> Any:
        """
        The local address, asked of the socket once per connection (Twisted
        asks for every request).
        """
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def dataReceived(self, data: bytes) -> None:
        if self._answered(data):
            self.resetTimeout()
            return
        super().dataReceived(data)

    def _answered(self, data: bytes) -> bool:
        """
        Answer C{data} at once when it is exactly one poll of a job the
        runner holds, on an idle connection.

        @return: whether it was answered.
        """
        if (
            not data.startswith(b"GET /")
            or len(data) > MAX_HEAD
            or not data.endswith(_END)
            or data.find(_END) != len(data) - 4
            or self._handlingRequest
            or self.requests
            or not self.line_mode
            or self._buffer
            or not self.persistent
        ):
            return False
        head = data[:-4]
        bare = head.replace(b"\r\n", b"")
        if b"\r" in bare or b"\n" in bare or b"\0" in bare:
            return False
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1":
            return False
        match = _JOB_TARGET.match(parts[1])
        if match is None:
            return False
        authorization = None
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or _TOKEN.match(name) is None:
                return False
            name = name.lower()
            if name in _NOT_FAST:
                return False
            if name == b"authorization":
                if authorization is not None:
                    return False
                authorization = value.strip()
        resource = self.site.resource
        token = resource.token
        if token is not None:
            if authorization is None:
                return False
            scheme, _, given = authorization.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), token):
                return False
        job = resource.runner.peek(match.group(1).decode("ascii"))
        if job is None:
            return False
        body = resource.body_of(job)
        send_now(
            self.transport,
            b"HTTP/1.1 200 OK\r\nServer: %s\r\nDate: %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (SERVER_VERSION, _DATE.now(), len(body), body),
        )
        return True
