# -*- test-case-name: haikutx.test.test_jobs -*-
"""
Completion callbacks (L{CallbackSender}): the finished job POSTed as JSON
to the URL the client gave, retried with back-off, under the same address
rules as handler URLs (L{haikutx.net.addresses}): checked when the job is
submitted, and again, against every address the
host resolves to, when connecting (L{haikutx.net.outbound.CheckedEndpoint}).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from io import BytesIO
from typing import Any

import treq
from attrs import evolve
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from haikutx.jobs.job import CallbackOutcome, Job, job_to_json
from haikutx.net.addresses import AddressRules, URLTarget
from haikutx.net.outbound import AddressRefused, CheckedEndpoint

#: Sends one POST of a body to a URL and returns the response status.
PostCallback = Callable[[str, bytes], Awaitable[int]]

#: Seconds one connection attempt of a callback may take.
CONNECT_TIMEOUT = 10.0


class CallbackRefused(ValueError):
    """
    A callback URL the rules refuse before any connection: not an http(s)
    URL, or its host is an address callbacks may not go to.
    """


def check_callback_url(url: str, rules: AddressRules) -> URLTarget:
    """
    Check a job request's C{callback} before the job is accepted.

    Host names are checked again, against every address they resolve to,
    when the callback is sent.

    @param url: the callback URL.
    @param rules: the address rules (C{--allow}).
    @return: the URL, split.
    @raise CallbackRefused: saying why it is refused.
    """
    try:
        target = URLTarget.parse(url)
    except ValueError as e:
        raise CallbackRefused(f"callback {e}") from None
    refused = rules.check_target(target)
    if refused is not None:
        raise CallbackRefused(f"callback {url} is not allowed: {refused}")
    return target


async def deliver_callback(
    reactor: Any,
    post: PostCallback,
    url: str,
    body: bytes,
    *,
    first_delay: float = 1.0,
    max_delay: float = 60.0,
    give_up_after: float = 600.0,
    attempt_timeout: float = 10.0,
    on_attempt: Callable[[CallbackOutcome], None] | None = None,
) -> CallbackOutcome:
    """
    POST C{body} to C{url} until it is accepted, retrying with exponential
    back-off for at most C{give_up_after} seconds.

    A 2xx answer delivers it; a 4xx answer other than 408 and 429 fails at
    once; other statuses, connection failures and attempts slower than
    C{attempt_timeout} are retried after C{first_delay}, then twice as long
    each time up to C{max_delay}. An L{AddressRefused} is not retried.

    @param reactor: an L{IReactorTime}.
    @param post: sends one POST and returns the response status.
    @param on_attempt: told the outcome so far after each failed attempt.
    @return: the final L{CallbackOutcome}.
    """
    start = reactor.seconds()
    delay = first_delay
    attempts = 0
    while True:
        attempts += 1
        http_status: int | None = None
        error: str | None = None
        attempt = Deferred.fromCoroutine(_awaited(post(url, body)))
        timer = reactor.callLater(attempt_timeout, attempt.cancel)
        try:
            http_status = await attempt
        except AddressRefused as e:
            return CallbackOutcome("refused", attempts, None, str(e))
        except CancelledError:
            if timer.active():
                raise
            error = f"no answer within {attempt_timeout:g}s"
        except Exception as e:
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        finally:
            if timer.active():
                timer.cancel()
        if http_status is not None:
            if 200 <= http_status < 300:
                return CallbackOutcome("delivered", attempts, http_status, None)
            error = f"HTTP {http_status}"
            if 400 <= http_status < 500 and http_status not in (408, 429):
                return CallbackOutcome("failed", attempts, http_status, error)
        if reactor.seconds() + delay - start > give_up_after:
            return CallbackOutcome("failed", attempts, http_status, error)
        if on_attempt is not None:
            on_attempt(CallbackOutcome("pending", attempts, http_status, error))
        await deferLater(reactor, delay)
        delay = min(delay * 2, max_delay)


async def _awaited(awaitable: Awaitable[int]) -> int:
    return await awaitable


@implementer(IAgentEndpointFactory)
class CallbackEndpoints:
    """
    The endpoint of each callback origin: a L{CheckedEndpoint} that resolves
    the host once, checks every address with the address rules and connects
    only to a checked one; wrapped in verified TLS for https.
    """

    def __init__(self, reactor: Any, rules: AddressRules, resolver: Any = None) -> None:
        """
        @param reactor: an L{IReactorTCP} and L{IReactorTime}.
        @param rules: the address rules.
        @param resolver: an L{IHostnameResolver} (default: the reactor's).
        """
        self._reactor = reactor
        self._rules = rules
        self._resolver = resolver if resolver is not None else reactor.nameResolver

    def endpointForURI(self, uri: Any) -> Any:
        scheme = uri.scheme.decode("ascii")
        host = uri.host.decode("ascii").strip("[]").lower()
        port = uri.port

        def check(address: Any) -> str | None:
            return self._rules.check_address(scheme, host, port, address)

        endpoint: Any = CheckedEndpoint(
            self._reactor, self._resolver, host, port, check, CONNECT_TIMEOUT
        )
        if scheme == "https":
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint


class _QuietClientFactory(_HTTP11ClientFactory):
    """
    The factory of callback connections, without a log line for each.
    """

    noisy = False


def callback_poster(reactor: Any, rules: AddressRules) -> PostCallback:
    """
    The real way callbacks are sent: an L{Agent} whose every connection goes
    through L{CallbackEndpoints}.

    @param reactor: the reactor.
    @param rules: the address rules.
    @return: a L{PostCallback}.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = _QuietClientFactory
    # Twisted's Agent itself, not treq: treq IDNA-encodes the host of a text
    # URL, which fails for IPv6 literals ([::1]).
    agent = Agent.usingEndpointFactory(reactor, CallbackEndpoints(reactor, rules), pool=pool)

    async def post(url: str, body: bytes) -> int:
        try:
            check_callback_url(url, rules)
        except CallbackRefused as e:
            raise AddressRefused(str(e)) from None
        headers = Headers(
            {
                b"content-type": [b"application/json"],
                b"accept": [b"application/json"],
                b"x-notify-timestamp": [b"%d" % int(reactor.seconds() * 1000)],
            }
        )
        response = await agent.request(
            b"POST", url.encode("ascii"), headers, FileBodyProducer(BytesIO(body))
        )
        await treq.collect(response, lambda data: None)
        return int(response.code)

    return post


class CallbackSender:
    """
    Send finished jobs' callbacks (L{deliver_callback}): one delivery per
    job at a time, each failed attempt and the outcome saved with the job.

    @param reactor: the clock.
    @param post: sends one attempt (L{callback_poster}).
    @param give_up_after: seconds a callback is retried.
    @param save: saves a job (with its callback's outcome so far).
    @param log: the runner's logger, for the attempts' events.
    """

    def __init__(
        self,
        reactor: Any,
        post: PostCallback,
        give_up_after: float,
        save: Callable[[Job], None],
        log: Any,
    ) -> None:
        self._reactor = reactor
        self._post = post
        self._give_up_after = give_up_after
        self._save = save
        self.log = log
        self._deliveries: dict[str, Deferred[CallbackOutcome]] = {}

    def send(self, job: Job) -> None:
        """
        Deliver C{job}'s callback, unless one is under way for it already.
        """
        assert job.callback is not None
        if job.id in self._deliveries:
            return
        body = json.dumps(job_to_json(job)).encode("utf-8")

        def progress(outcome: CallbackOutcome) -> None:
            self.log.warn(
                "job {job_id}: callback attempt {attempts} failed: {reason}",
                job_id=job.id,
                attempts=outcome.attempts,
                reason=outcome.error,
            )
            self._save(evolve(job, callback_outcome=outcome))

        delivery = Deferred.fromCoroutine(
            deliver_callback(
                self._reactor,
                self._post,
                job.callback,
                body,
                give_up_after=self._give_up_after,
                on_attempt=progress,
            )
        )
        self._deliveries[job.id] = delivery

        def done(outcome: CallbackOutcome) -> None:
            self.log.info(
                "job {job_id}: callback {status} after {attempts} attempts",
                job_id=job.id,
                status=outcome.status,
                attempts=outcome.attempts,
                reason=outcome.error,
            )
            self._save(evolve(job, callback_outcome=outcome))

        def failed(failure: Failure) -> None:
            if not failure.check(CancelledError):
                self.log.failure("job {job_id}: callback crashed", failure, job_id=job.id)

        delivery.addCallbacks(done, failed)
        delivery.addBoth(lambda _: self._deliveries.pop(job.id, None))

    def cancel_all(self) -> None:
        """
        Stop every delivery under way (their outcome stays pending in the
        store, for the runner that starts next).
        """
        for delivery in list(self._deliveries.values()):
            delivery.cancel()
