# -*- test-case-name: haikutx.test.test_jobs -*-
"""
The job runner's HTTP face: http-runner's JSON API. C{POST /} submits a job,
C{GET /<id>} shows it, C{DELETE /<id>} stops it.
"""

from __future__ import annotations

import hmac
import json
import re
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from haikutx.jobs.channel import JobChannel
from haikutx.jobs.job import job_to_json
from haikutx.jobs.request import MAX_REQUEST_BODY, JobRefused, parse_job_request, split_args
from haikutx.jobs.runner import JobRunner
from haikutx.net.sending import send_pending

__all__ = [
    "MAX_REQUEST_BODY",
    "JobSite",
    "JobsResource",
    "job_site",
    "parse_job_request",
    "split_args",
]

_JOB_PATH = re.compile(rb"^/([0-9a-f]{40})/?$")

NOT_FOUND = {"message": "Not Found"}

#: Jobs whose JSON body the API keeps for the next poll.
CACHED_BODIES = 1024


class _LimitedRequest(Request):
    """
    A L{Request} that drops a body larger than L{MAX_REQUEST_BODY} instead of
    buffering it, and remembers that it did.
    """

    max_body = MAX_REQUEST_BODY
    too_large = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self.too_large = True
            self.content = BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        if self.content.tell() + len(data) > self.max_body:
            self.too_large = True
            self.content = BytesIO()
            return
        super().handleContentChunk(data)


class JobsResource(Resource):
    """
    The JSON API of the job runner.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, runner: JobRunner, token: str | None = None) -> None:
        """
        @param runner: the runner the API drives.
        @param token: when set, every request needs
            C{Authorization: Bearer <token>}.
        """
        super().__init__()
        self.runner = runner
        self.token = token.encode("utf-8") if token is not None else None
        #: The JSON body of the jobs polled lately, by id, with the value it
        #: was made from (jobs are frozen: the same value, the same body).
        self._bodies: dict[str, tuple[Any, bytes]] = {}

    def body_of(self, job: Any) -> bytes:
        """
        The JSON body of C{job}, made once for each value of the job.
        """
        cached = self._bodies.get(job.id)
        if cached is not None and cached[0] is job:
            return cached[1]
        body = json.dumps(job_to_json(job)).encode("utf-8")
        if len(self._bodies) >= CACHED_BODIES:
            self._bodies.clear()
        self._bodies[job.id] = (job, body)
        return body

    def render(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"application/json")
        if self.token is not None and not self._authorized(request):
            request.setHeader(b"www-authenticate", b'Bearer realm="haikutx jobs"')
            return _body(request, 401, {"message": "Unauthorized"})
        if getattr(request, "too_large", False):
            request.setHeader(b"connection", b"close")
            return _body(
                request,
                413,
                {
                    "message": "Payload Too Large",
                    "error": f"the request body is larger than {MAX_REQUEST_BODY} bytes",
                },
            )
        if request.method == b"GET":
            # The common poll, answered at once when the runner knows the job.
            match = _JOB_PATH.match(request.path)
            known = None if match is None else self.runner.peek(match.group(1).decode())
            if known is not None:
                request.setResponseCode(200)
                return self.body_of(known)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = Deferred.fromCoroutine(self._handle(request))

        def answer(result: tuple[int, dict[str, Any]]) -> None:
            if not gone:
                status, obj = result
                body = json.dumps(obj).encode("utf-8")
                request.setResponseCode(status)
                # A length, not chunks: the whole answer in one write.
                request.setHeader(b"content-length", b"%d" % len(body))
                transport = request.channel.transport
                request.write(body)
                request.finish()
                # Sent now, not at the reactor's next turn: the client has
                # its answer before the job's log event is written.
                send_pending(transport)

        def crashed(failure: Failure) -> None:
            self.log.failure("job API request failed", failure)
            if not gone:
                request.setResponseCode(500)
                request.write(b'{"message": "Internal Server Error"}')
                request.finish()

        d.addCallbacks(answer, crashed)
        return NOT_DONE_YET

    def _authorized(self, request: Request) -> bool:
        assert self.token is not None
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)

    async def _handle(self, request: Request) -> tuple[int, dict[str, Any]]:
        method = request.method
        path = request.path
        if method == b"POST" and path == b"/":
            return await self._create(request)
        if method not in (b"GET", b"DELETE") or path == b"/":
            return 501, {"message": "Not Implemented"}
        match = _JOB_PATH.match(path)
        if match is None:
            return 404, NOT_FOUND
        job_id = match.group(1).decode("ascii")
        await self.runner.wait_ready()
        if method == b"GET":
            job = await self.runner.get(job_id)
        else:
            job = await self.runner.cancel(job_id)
        if job is None:
            return 404, NOT_FOUND
        return 200, job_to_json(job)

    async def _create(self, request: Request) -> tuple[int, dict[str, Any]]:
        try:
            command, arguments, callback = parse_job_request(request.content.read())
            job = await self.runner.submit(command, arguments, callback)
        except JobRefused as e:
            self.log.warn("job refused: {reason}", reason=str(e))
            return 400, {"message": "Bad Request", "error": str(e)}
        return 202, job_to_json(job)


def _body(request: Request, status: int, obj: dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    return json.dumps(obj).encode("utf-8")


class JobSite(Site):
    """
    The L{Site} of the job API: request bodies bounded; an access-log line
    for every request except an accepted job (the runner logs a C{job
    accepted} event for it: one line, not two) and a job shown by C{GET}
    (clients poll: a line per poll would drown the job events).
    """

    requestFactory = _LimitedRequest
    protocol = JobChannel
    noisy = False

    def log(self, request: Request) -> None:
        quiet = (request.method, request.code) in ((b"POST", 202), (b"GET", 200))
        if not quiet:
            super().log(request)


def job_site(reactor: Any, runner: JobRunner, token: str | None = None) -> Site:
    """
    The L{JobSite} of C{runner}.
    """
    # The body is JSON whatever its declared type: never parsed as a form
    # (that parse costs a MIME parser per POST).
    site = JobSite(JobsResource(runner, token), reactor=reactor, parsePOSTFormSubmission=False)
    site.displayTracebacks = False
    return site
