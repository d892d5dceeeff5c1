# -*- test-case-name: haikutx.test.test_jobs -*-
"""
The job API's HTTP channel: Twisted's L{HTTPChannel}, with the two exchanges
clients repeat (a poll, C{GET /<id>} of a job the runner knows, and a valid
C{POST /}) answered without a L{Request}: one parse of the head (by the
strict parser the gate uses, L{haikutx.net.http1.parse_request_head}), the job's
JSON (kept while the job is unchanged) and one C{send}. While a submission
is being committed, what else arrives on the connection waits, and is read
once its 202 is sent.

Anything else, and a request the fast path is not sure of (another method or
path, C{Connection}, C{Expect}, C{Transfer-Encoding}, HTTP/1.0, a request
already under way on the connection, part of a request, pipelined requests,
a job the runner does not hold, a missing or wrong token, a job the runner
would refuse), goes through Twisted as before, so the answers (and the
access-log lines) are the same either way.
"""

from __future__ import annotations

import hmac
import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.server import version as SERVER_VERSION

from haikutx.jobs.request import MAX_REQUEST_BODY, JobRefused, parse_job_request
from haikutx.net.dates import http_date
from haikutx.net.http1 import BadMessage, parse_request_head
from haikutx.net.sending import write as send_now

#: Largest request head the fast path reads (larger: Twisted's own parse).
MAX_HEAD = 8192

#: Bytes read while a submission is committed, beyond which the connection
#: is not read until it is answered.
MAX_HELD = 16384

_JOB_TARGET = re.compile(rb"^/([0-9a-f]{40})/?(?:\?[\x21-\x7e]*)?$")

#: Header fields after which Twisted handles the request itself (the
#: hop-by-hop ones, C{Connection} among them, are in L{Head.hop}).
_NOT_FAST = frozenset((b"expect", b"upgrade"))

_HEAD = (
    b"HTTP/1.1 %s\r\nServer: %s\r\nDate: %s\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
)

_END = b"\r\n\r\n"


class JobChannel(HTTPChannel):
    """
    An L{HTTPChannel} of the job API (see the module's docstring). Its
    site's resource is a L{haikutx.jobs.api.JobsResource}.
    """

    log = Logger()
    _host: Any = None
    #: What arrived while a submission answered here is committed.
    _held: list[bytes] | None = None
    _held_size = 0
    _paused = False
    _lost = False

    def getHost(self) -> Any:
        """
        The local address, asked of the socket once per connection (Twisted
        asks for every request).
        """
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def dataReceived(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size > MAX_HELD and not self._paused:
                # Like Twisted's channel: no more reads until the answer.
                self._paused = True
                self.transport.pauseProducing()
            return
        if self._answered(data):
            self.resetTimeout()
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        self._lost = True
        self._held = None
        super().connectionLost(reason)

    def _answered(self, data: bytes) -> bool:
        """
        Answer C{data} here when it is exactly one poll of a job the runner
        holds, or one valid submission, on an idle connection.

        @return: whether it was (or is being) answered.
        """
        end = data.find(_END)
        if (
            end < 0
            or end + 4 > MAX_HEAD
            or self._handlingRequest
            or self.requests
            or not self.line_mode
            or self._buffer
            or not self.persistent
        ):
            return False
        try:
            head = parse_request_head(data[: end + 4], require_host=False)
        except BadMessage:
            return False  # Twisted answers it, with its 400
        if head.version != b"HTTP/1.1" or head.hop or head.chunked:
            return False
        fields = dict(head.headers)
        if len(fields) != len(head.headers) or not _NOT_FAST.isdisjoint(fields):
            return False
        body = data[end + 4 :]
        resource = self.site.resource
        token = resource.token
        if token is not None:
            authorization = fields.get(b"authorization")
            if authorization is None:
                return False
            scheme, _, given = authorization.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), token):
                return False
        if head.method == b"GET":
            if body or head.content_length is not None:
                return False
            return self._poll(resource, head.target)
        if head.method == b"POST" and head.target == b"/":
            return self._submit(resource, head.content_length, body)
        return False

    def _poll(self, resource: Any, target: bytes) -> bool:
        match = _JOB_TARGET.match(target)
        if match is None:
            return False
        job = resource.runner.peek(match.group(1).decode("ascii"))
        if job is None:
            return False
        self._send(b"200 OK", resource.body_of(job))
        return True

    def _submit(self, resource: Any, length: int | None, body: bytes) -> bool:
        if length != len(body):
            return False
        runner = resource.runner
        if len(body) > MAX_REQUEST_BODY or not runner.ready:
            return False
        try:
            command, arguments, callback = parse_job_request(body)
            runner.check(command, arguments, callback)
        except JobRefused:
            # Refused by Twisted's path, with its 400 and access-log line.
            return False
        self._held, self._held_size = [], 0
        submitted = Deferred.fromCoroutine(runner.submit(command, arguments, callback))
        submitted.addCallbacks(
            lambda job: self._answer(b"202 Accepted", resource.body_of(job)),
            self._failed,
        )
        return True

    def _failed(self, failure: Failure) -> None:
        self.log.failure("job API request failed", failure)
        self._answer(b"500 Internal Server Error", b'{"message": "Internal Server Error"}')

    def _answer(self, status: bytes, body: bytes) -> None:
        """
        Send the answer of a submission, then read what arrived meanwhile.
        """
        if self._lost:
            return
        held, self._held, self._held_size = self._held, None, 0
        self._send(status, body)
        self.resetTimeout()
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if held:
            self.dataReceived(b"".join(held))

    def _send(self, status: bytes, body: bytes) -> None:
        send_now(
            self.transport,
            _HEAD % (status, SERVER_VERSION, http_date(), len(body)) + body,
        )
