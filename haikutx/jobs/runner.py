# -*- test-case-name: haikutx.test.test_jobs -*-
"""
The job runner: http-runner's JSON API (SPEC section 4), made safe and
durable.

L{JobRunner} starts whitelisted commands without a shell, one
L{ProcessProtocol} per job, at most C{max_running} at once (the rest wait in
order), captures their output incrementally into bounded buffers, keeps every
job in an L{IJobStore} and POSTs finished jobs to their callback with
exponential back-off. L{JobsResource} is its HTTP face and L{JobService} the
named service C{twistd haiku --jobs} runs.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import pwd
import re
import secrets
import shutil
import signal as signal_module
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

import treq
from attrs import define, field
from treq.client import HTTPClient
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IResolutionReceiver, IStreamClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from haikutx.interfaces import IJobStore
from haikutx.jobs.store.sqlite import (
    FINISHED,
    QUEUED,
    RUNNING,
    CallbackOutcome,
    Job,
    SQLiteJobStore,
)

#: Largest request body the API reads, in bytes (larger gets 413).
MAX_REQUEST_BODY = 64 * 1024

#: Seconds between SIGTERM and SIGKILL when a job is stopped.
KILL_GRACE = 5.0

#: Seconds a job's pipes may stay open (held by a grandchild) after it exited.
DRAIN_TIME = 1.0

#: Seconds between saves of a running job's output.
FLUSH_INTERVAL = 0.5

_JOB_PATH = re.compile(rb"^/([0-9a-f]{40})/?$")

_METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)


class JobRefused(Exception):
    """
    A job request the runner will not accept; the message says why and is
    given to the client in a 400.
    """


class AddressRefused(Exception):
    """
    A callback URL whose host is, or resolves to, an address that callbacks
    may not go to.
    """


def split_args(args: object) -> list[str]:
    """
    The argument list of a job request's C{args}.

    @param args: a string (split on runs of white space, with no empty
        arguments at the ends, unlike http-runner), a list of strings (taken
        as is, so arguments with spaces work) or C{None} (no arguments).
    @return: the arguments.
    @raise JobRefused: for anything else.
    """
    if args is None:
        return []
    if isinstance(args, str):
        return args.split()
    if isinstance(args, list) and all(isinstance(a, str) for a in args):
        return list(args)
    raise JobRefused("args must be a string or a list of strings")


def refused_callback_address(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> str | None:
    """
    Why a callback may not be sent to C{address}, if it may not.

    This is the job runner's copy of the address rules handler URLs obey
    (SPEC section 1, C{--allow}): only globally routable unicast addresses
    are allowed. It is one pure function so that it can be replaced by a
    shared address-rules module.

    @param address: an address a callback host is or resolves to.
    @return: C{None} when allowed, else the reason (C{"loopback"},
        C{"private"}, C{"link-local"}, C{"metadata"}, ...).
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if address in _METADATA_ADDRESSES:
        return "metadata"
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "reserved"
    return None


def callback_allowed_by_prefix(url: str, allow: Sequence[str]) -> bool:
    """
    Whether C{url} starts with one of the C{--allow} prefixes, which lift
    the address rules (as they do for handler URLs).

    @param url: the callback URL.
    @param allow: the allowed prefixes.
    """
    return any(url.startswith(prefix) for prefix in allow)


def check_callback_url(url: object, allow: Sequence[str]) -> str:
    """
    Check a job request's C{callback} before the job is accepted.

    Host names are checked again, against every address they resolve to,
    when the callback is sent.

    @param url: the C{callback} of the request.
    @param allow: the C{--allow} prefixes.
    @return: the URL.
    @raise JobRefused: when it is not an http(s) URL, or its host is an
        address literal that callbacks may not go to.
    """
    if not isinstance(url, str):
        raise JobRefused("callback must be a string")
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError as e:
        raise JobRefused(f"callback is not a valid URL: {e}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JobRefused("callback must be an http:// or https:// URL")
    if callback_allowed_by_prefix(url, allow):
        return url
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return url
    reason = refused_callback_address(address)
    if reason is not None:
        raise JobRefused(f"callback address {address} is not allowed ({reason})")
    return url


def iso_time(seconds: float | None) -> str | None:
    """
    ISO 8601 UTC text of a POSIX time, to the millisecond.
    """
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_to_json(job: Job) -> dict[str, Any]:
    """
    The JSON object of a job, as the API answers and callbacks send it.

    @param job: the job.
    @return: a dict of JSON values; output is decoded as UTF-8 with
        invalid bytes replaced.
    """
    outcome = job.callback_outcome
    return {
        "id": job.id,
        "command": job.command,
        "arguments": list(job.arguments),
        "stdout": job.stdout.decode("utf-8", "replace"),
        "stderr": job.stderr.decode("utf-8", "replace"),
        "code": job.code,
        "signal": job.signal,
        "error": job.error,
        "callback": job.callback,
        "state": job.state,
        "created": iso_time(job.created),
        "started": iso_time(job.started),
        "finished": iso_time(job.finished),
        "stdout_truncated": job.stdout_truncated,
        "stderr_truncated": job.stderr_truncated,
        "callback_outcome": (
            None
            if outcome is None
            else {
                "status": outcome.status,
                "attempts": outcome.attempts,
                "http_status": outcome.http_status,
                "error": outcome.error,
            }
        ),
    }


@define
class OutputBuffer:
    """
    The most recent C{limit} bytes of a stream.

    @ivar limit: bytes kept.
    @ivar data: the bytes kept.
    @ivar truncated: whether older bytes were dropped.
    """

    limit: int
    data: bytearray = field(factory=bytearray)
    truncated: bool = False

    def append(self, chunk: bytes) -> None:
        """
        Add C{chunk}, dropping the oldest bytes beyond the limit.
        """
        self.data += chunk
        excess = len(self.data) - self.limit
        if excess > 0:
            del self.data[:excess]
            self.truncated = True


@define(eq=False)
class _Record:
    """
    The live, mutable state of one job inside L{JobRunner}.
    """

    id: str
    seq: int
    command: str
    arguments: list[str]
    callback: str | None
    stdout: OutputBuffer
    stderr: OutputBuffer
    state: str = QUEUED
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    code: int | None = None
    signal: str | None = None
    error: str | None = None
    callback_outcome: CallbackOutcome | None = None
    transport: Any = None
    pid: int | None = None
    timers: dict[str, Any] = field(factory=dict)
    waiters: list[Deferred[None]] = field(factory=list)
    evicted: bool = False

    @classmethod
    def from_job(cls, job: Job, limit: int) -> _Record:
        record = cls(
            id=job.id,
            seq=job.seq,
            command=job.command,
            arguments=list(job.arguments),
            callback=job.callback,
            stdout=OutputBuffer(limit, bytearray(job.stdout), job.stdout_truncated),
            stderr=OutputBuffer(limit, bytearray(job.stderr), job.stderr_truncated),
            state=job.state,
            created=job.created,
            started=job.started,
            finished=job.finished,
            code=job.code,
            signal=job.signal,
            error=job.error,
            callback_outcome=job.callback_outcome,
        )
        return record

    def snapshot(self) -> Job:
        return Job(
            id=self.id,
            seq=self.seq,
            command=self.command,
            arguments=self.arguments,
            callback=self.callback,
            state=self.state,
            created=self.created,
            started=self.started,
            finished=self.finished,
            code=self.code,
            signal=self.signal,
            error=self.error,
            stdout=bytes(self.stdout.data),
            stderr=bytes(self.stderr.data),
            stdout_truncated=self.stdout.truncated,
            stderr_truncated=self.stderr.truncated,
            callback_outcome=self.callback_outcome,
        )

    def cancel_timer(self, name: str) -> None:
        call = self.timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()


class _JobProtocol(ProcessProtocol):
    """
    The L{ProcessProtocol} of one job: output into its buffers, its end
    back to the runner.
    """

    def __init__(self, runner: JobRunner, record: _Record) -> None:
        self._runner = runner
        self._record = record

    def connectionMade(self) -> None:
        # Nothing is ever written to a job: close its stdin, so a command
        # that reads it (cat -) ends instead of waiting forever.
        assert self.transport is not None
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._record.stdout.append(data)
        self._runner._output(self._record)

    def errReceived(self, data: bytes) -> None:
        self._record.stderr.append(data)
        self._runner._output(self._record)

    def processExited(self, reason: Failure) -> None:
        self._runner._exited(self._record)

    def processEnded(self, reason: Failure) -> None:
        status = reason.value
        self._runner._ended(
            self._record, getattr(status, "exitCode", None), getattr(status, "signal", None)
        )


PostCallback = Callable[[str, bytes], Awaitable[int]]


async def deliver_callback(
    reactor,
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
    @param on_attempt: told the outcome so far after each attempt.
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


@implementer(IResolutionReceiver)
class _Addresses:
    def __init__(self) -> None:
        self.addresses: list[Any] = []
        self.done: Deferred[list[Any]] = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


@implementer(IStreamClientEndpoint)
class _CheckedEndpoint:
    """
    Connects to a callback host only after every address it resolves to
    has passed L{refused_callback_address}, and then to that very address
    (so a second resolution cannot swap in another).
    """

    def __init__(self, reactor, scheme: bytes, host: str, port: int) -> None:
        self._reactor = reactor
        self._scheme = scheme
        self._host = host
        self._port = port

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        try:
            addresses = [ipaddress.ip_address(self._host)]
        except ValueError:
            receiver = _Addresses()
            self._reactor.nameResolver.resolveHostName(receiver, self._host, self._port)
            resolved = await receiver.done
            addresses = [ipaddress.ip_address(a.host) for a in resolved]
        if not addresses:
            raise AddressRefused(f"{self._host} does not resolve")
        for address in addresses:
            reason = refused_callback_address(address)
            if reason is not None:
                raise AddressRefused(
                    f"callback address {address} of {self._host} is not allowed ({reason})"
                )
        address = addresses[0]
        endpoint: Any
        if address.version == 4:
            endpoint = TCP4ClientEndpoint(self._reactor, str(address), self._port, timeout=10)
        else:
            endpoint = TCP6ClientEndpoint(self._reactor, str(address), self._port, timeout=10)
        if self._scheme == b"https":
            endpoint = wrapClientTLS(optionsForClientTLS(self._host), endpoint)
        return await endpoint.connect(factory)


@implementer(IAgentEndpointFactory)
class _CheckedEndpoints:
    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def endpointForURI(self, uri: Any) -> _CheckedEndpoint:
        return _CheckedEndpoint(self._reactor, uri.scheme, uri.host.decode("ascii"), uri.port)


def callback_poster(reactor, allow: Sequence[str]) -> PostCallback:
    """
    The real way callbacks are sent: treq, over an L{Agent} whose
    connections obey the address rules unless C{allow} lifts them.

    @param reactor: the reactor.
    @param allow: the C{--allow} prefixes.
    @return: a L{PostCallback}.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    checked = HTTPClient(
        Agent.usingEndpointFactory(reactor, _CheckedEndpoints(reactor), pool=pool)
    )
    plain = HTTPClient(Agent(reactor, pool=pool))

    async def post(url: str, body: bytes) -> int:
        client = plain if callback_allowed_by_prefix(url, allow) else checked
        timestamp = str(int(reactor.seconds() * 1000))
        response = await client.post(
            url,
            data=body,
            headers={
                "content-type": "application/json",
                "accept": "application/json",
                "x-notify-timestamp": timestamp,
            },
        )
        await treq.collect(response, lambda data: None)
        return int(response.code)

    return post


class JobRunner:
    """
    Runs jobs: queues, processes, limits, output, durability, callbacks.

    The runner holds the live copy of every job it knows; its L{IJobStore}
    holds the copy that survives a restart.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        store: IJobStore,
        *,
        whitelist: Iterable[str] | None = None,
        max_jobs: int = 100,
        max_running: int = 2,
        job_time: float | None = None,
        max_output: int = 1048576,
        post_callback: PostCallback | None = None,
        allow: Sequence[str] = (),
        uid: int | None = None,
        gid: int | None = None,
        environ: dict[str, str] | None = None,
        kill_grace: float = KILL_GRACE,
        drain_time: float = DRAIN_TIME,
        flush_interval: float = FLUSH_INTERVAL,
        callback_give_up_after: float = 600.0,
    ) -> None:
        """
        @param reactor: provides L{IReactorTime} and L{IReactorProcess}.
        @param store: where jobs are kept.
        @param whitelist: the only commands allowed (exact names), or
            C{None} to allow every command.
        @param max_jobs: finished jobs kept; the oldest finished are evicted.
        @param max_running: jobs running at once.
        @param job_time: wall-clock limit of a job in seconds, or C{None}.
        @param max_output: bytes of stdout and of stderr kept per job.
        @param post_callback: sends a callback (default: L{callback_poster}).
        @param allow: URL prefixes lifting the callback address rules.
        @param uid: run commands as this user id (C{None}: as this process).
        @param gid: run commands with this group id.
        @param environ: the environment of commands (default: this process's).
        @param kill_grace: seconds between SIGTERM and SIGKILL.
        @param drain_time: seconds output pipes may outlive the process.
        @param flush_interval: seconds between saves of running output.
        @param callback_give_up_after: seconds callbacks are retried.
        """
        self._reactor = reactor
        self._store = store
        self.whitelist = None if whitelist is None else frozenset(whitelist)
        self._max_jobs = max_jobs
        self._max_running = max_running
        self._job_time = job_time
        self._max_output = max_output
        self._allow = tuple(allow)
        self._post = post_callback or callback_poster(reactor, self._allow)
        self._uid = uid
        self._gid = gid
        self._environ = dict(os.environ if environ is None else environ)
        self._kill_grace = kill_grace
        self._drain_time = drain_time
        self._flush_interval = flush_interval
        self._callback_give_up_after = callback_give_up_after
        self._jobs: dict[str, _Record] = {}
        self._queue: list[_Record] = []
        self._running: set[_Record] = set()
        self._callbacks: dict[str, Deferred[None]] = {}
        self._seq = 0
        self._ready = False
        self._stopping = False
        self._ready_waiters: list[Deferred[None]] = []

    # -- life --

    async def start(self) -> None:
        """
        Open the store and load its jobs: jobs that were running when the
        last process stopped become finished with C{"error": "interrupted"},
        queued ones are queued again, pending callbacks are marked failed.
        """
        await self._store.open()
        jobs = await self._store.load()
        now = self._reactor.seconds()
        changed = []
        for job in jobs:
            record = _Record.from_job(job, self._max_output)
            self._seq = max(self._seq, record.seq)
            if record.state == RUNNING:
                record.state = FINISHED
                record.error = "interrupted"
                record.finished = now
                changed.append(record)
                self.log.warn(
                    "job {job_id} was running when the server stopped: interrupted",
                    job_id=record.id,
                )
            if record.callback_outcome and record.callback_outcome.status == "pending":
                record.callback_outcome = CallbackOutcome(
                    "failed",
                    record.callback_outcome.attempts,
                    record.callback_outcome.http_status,
                    "interrupted by a restart",
                )
                changed.append(record)
            self._jobs[record.id] = record
            if record.state == QUEUED:
                self._queue.append(record)
        for record in changed:
            self._save(record)
        self._evict()
        self._ready = True
        self.log.info(
            "job runner ready with {count} stored jobs", count=len(self._jobs)
        )
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        self._pump()

    async def wait_ready(self) -> None:
        """
        Wait until L{start} has loaded the stored jobs.
        """
        if not self._ready:
            waiter: Deferred[None] = Deferred()
            self._ready_waiters.append(waiter)
            await waiter

    async def stop(self) -> None:
        """
        Stop every running job (marked C{"interrupted"}), cancel pending
        callbacks and timers, save everything and close the store.
        """
        self._stopping = True
        ends = []
        for record in list(self._running):
            ends.append(self._wait_end(record))
            self._terminate(record, "interrupted")
        if ends:
            await DeferredList(ends, consumeErrors=True)
        for delivery in list(self._callbacks.values()):
            delivery.cancel()
        for record in self._jobs.values():
            if record.timers.get("flush") is not None:
                record.cancel_timer("flush")
                self._save(record)
        await self._store.close()

    # -- API --

    def submit(self, command: str, arguments: list[str], callback: str | None) -> Job:
        """
        Accept a job: it runs now or when a running slot frees up.

        @raise JobRefused: for a command outside the whitelist, a bad
            callback URL, or NUL characters.
        """
        if self.whitelist is not None and command not in self.whitelist:
            raise JobRefused("Specified command is not in whitelist.")
        if "\0" in command or any("\0" in a for a in arguments):
            raise JobRefused("command and args must not contain NUL characters")
        if callback is not None:
            check_callback_url(callback, self._allow)
        self._seq += 1
        record = _Record(
            id=secrets.token_hex(20),
            seq=self._seq,
            command=command,
            arguments=list(arguments),
            callback=callback,
            stdout=OutputBuffer(self._max_output),
            stderr=OutputBuffer(self._max_output),
            created=self._reactor.seconds(),
        )
        self._jobs[record.id] = record
        self._queue.append(record)
        self.log.info(
            "job {job_id} accepted: {command} {arguments}",
            job_id=record.id,
            command=command,
            arguments=record.arguments,
        )
        self._pump()
        if record.state == QUEUED:
            self._save(record)
        return record.snapshot()

    def get(self, job_id: str) -> Job | None:
        """
        The job with this id as it is now, or C{None}.
        """
        record = self._jobs.get(job_id)
        return None if record is None else record.snapshot()

    def jobs(self) -> list[Job]:
        """
        Every job kept, oldest first.
        """
        return [r.snapshot() for r in sorted(self._jobs.values(), key=lambda r: r.seq)]

    async def cancel(self, job_id: str) -> Job | None:
        """
        Stop a job: a queued one never runs, a running one gets SIGTERM and
        SIGKILL after the grace period; either finishes with C{"error":
        "stopped"}. A finished job is left as it is.

        @return: the job once it has finished, or C{None} when unknown.
        """
        record = self._jobs.get(job_id)
        if record is None:
            return None
        if record.state == QUEUED:
            self._queue.remove(record)
            record.error = "stopped"
            self._finish(record)
        elif record.state == RUNNING:
            end = self._wait_end(record)
            self._terminate(record, "stopped")
            await end
        return record.snapshot()

    # -- running --

    def _pump(self) -> None:
        while self._ready and not self._stopping and self._queue and (
            len(self._running) < self._max_running
        ):
            self._spawn(self._queue.pop(0))

    def _spawn(self, record: _Record) -> None:
        record.state = RUNNING
        record.started = self._reactor.seconds()
        executable = shutil.which(record.command, path=self._environ.get("PATH"))
        if executable is None:
            record.error = f"command not found: {record.command}"
            self.log.warn(
                "job {job_id}: {reason}", job_id=record.id, reason=record.error
            )
            self._finish(record)
            return
        try:
            transport = self._reactor.spawnProcess(
                _JobProtocol(self, record),
                executable,
                [record.command, *record.arguments],
                env=self._environ,
                uid=self._uid,
                gid=self._gid,
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except (OSError, ValueError) as e:
            record.error = f"cannot start {record.command}: {e}"
            self.log.warn("job {job_id}: {reason}", job_id=record.id, reason=record.error)
            self._finish(record)
            return
        record.transport = transport
        record.pid = transport.pid
        self._running.add(record)
        self.log.info(
            "job {job_id} started: pid {pid}", job_id=record.id, pid=record.pid
        )
        if self._job_time is not None:
            record.timers["job_time"] = self._reactor.callLater(
                self._job_time, self._terminate, record, "timeout"
            )
        self._save(record)

    def _terminate(self, record: _Record, reason: str) -> None:
        if record.state != RUNNING or "kill" in record.timers:
            return
        if record.error is None:
            record.error = reason
        record.cancel_timer("job_time")
        self.log.info(
            "job {job_id} stopping ({reason}): SIGTERM to pid {pid}",
            job_id=record.id,
            reason=reason,
            pid=record.pid,
        )
        self._signal(record, "TERM")
        record.timers["kill"] = self._reactor.callLater(
            self._kill_grace, self._kill, record
        )

    def _kill(self, record: _Record) -> None:
        self.log.warn(
            "job {job_id} ignored SIGTERM: SIGKILL to pid {pid}",
            job_id=record.id,
            pid=record.pid,
        )
        self._signal(record, "KILL")

    def _signal(self, record: _Record, name: str) -> None:
        try:
            record.transport.signalProcess(name)
        except (ProcessExitedAlready, OSError):
            pass

    def _wait_end(self, record: _Record) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if record.state == FINISHED:
            waiter.callback(None)
        else:
            record.waiters.append(waiter)
        return waiter

    def _output(self, record: _Record) -> None:
        if "flush" not in record.timers:
            record.timers["flush"] = self._reactor.callLater(
                self._flush_interval, self._flush, record
            )

    def _flush(self, record: _Record) -> None:
        record.timers.pop("flush", None)
        self._save(record)

    def _exited(self, record: _Record) -> None:
        # The process is gone; a grandchild may still hold its pipes open.
        # Give the output a moment, then close them so the job ends.
        record.cancel_timer("kill")
        record.cancel_timer("job_time")
        if record.state == RUNNING and record.transport is not None:
            record.timers["drain"] = self._reactor.callLater(
                self._drain_time, record.transport.loseConnection
            )

    def _ended(self, record: _Record, code: int | None, signal: int | None) -> None:
        self._running.discard(record)
        record.code = code
        if signal is not None:
            try:
                record.signal = signal_module.Signals(signal).name
            except ValueError:
                record.signal = str(signal)
        record.transport = None
        self._finish(record)
        self._pump()

    def _finish(self, record: _Record) -> None:
        for name in list(record.timers):
            record.cancel_timer(name)
        record.state = FINISHED
        record.finished = self._reactor.seconds()
        duration = record.finished - (record.started or record.created)
        self.log.info(
            "job {job_id} finished: code {code} signal {signal} error {error} "
            "in {duration:.3f}s",
            job_id=record.id,
            code=record.code,
            signal=record.signal,
            error=record.error,
            duration=duration,
        )
        if record.callback is not None and not self._stopping:
            record.callback_outcome = CallbackOutcome("pending")
        self._save(record)
        waiters, record.waiters = record.waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if record.callback is not None and not self._stopping:
            self._start_callback(record)
        self._evict()

    def _evict(self) -> None:
        finished = [r for r in self._jobs.values() if r.state == FINISHED]
        excess = len(finished) - self._max_jobs
        if excess <= 0:
            return
        finished.sort(key=lambda r: (r.finished or 0.0, r.seq))
        evicted = finished[:excess]
        for record in evicted:
            record.evicted = True
            del self._jobs[record.id]
            self.log.info("job {job_id} evicted", job_id=record.id)
        self._store_call(self._store.remove([r.id for r in evicted]))

    # -- callbacks --

    def _start_callback(self, record: _Record) -> None:
        assert record.callback is not None
        body = json.dumps(job_to_json(record.snapshot())).encode("utf-8")

        def progress(outcome: CallbackOutcome) -> None:
            record.callback_outcome = outcome
            self.log.warn(
                "job {job_id}: callback attempt {attempts} failed: {reason}",
                job_id=record.id,
                attempts=outcome.attempts,
                reason=outcome.error,
            )
            self._save(record)

        delivery = Deferred.fromCoroutine(
            deliver_callback(
                self._reactor,
                self._post,
                record.callback,
                body,
                give_up_after=self._callback_give_up_after,
                on_attempt=progress,
            )
        )
        self._callbacks[record.id] = delivery

        def done(outcome: CallbackOutcome) -> None:
            record.callback_outcome = outcome
            self.log.info(
                "job {job_id}: callback {status} after {attempts} attempts",
                job_id=record.id,
                status=outcome.status,
                attempts=outcome.attempts,
                reason=outcome.error,
            )
            self._save(record)

        def failed(failure: Failure) -> None:
            if not failure.check(CancelledError):
                self.log.failure(
                    "job {job_id}: callback crashed", failure, job_id=record.id
                )

        delivery.addCallbacks(done, failed)
        delivery.addBoth(lambda _: self._callbacks.pop(record.id, None))

    # -- storage --

    def _save(self, record: _Record) -> None:
        if record.evicted:
            return
        self._store_call(self._store.save(record.snapshot()))

    def _store_call(self, d: Deferred[None]) -> None:
        d.addErrback(lambda f: self.log.failure("job store write failed", f))


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
    The JSON API of the job runner (SPEC section 4).
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
        self._runner = runner
        self._token = token.encode("utf-8") if token is not None else None

    def render(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"application/json")
        if self._token is not None and not self._authorized(request):
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
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = Deferred.fromCoroutine(self._handle(request))

        def answer(result: tuple[int, dict[str, Any]]) -> None:
            if not gone:
                status, obj = result
                request.setResponseCode(status)
                request.write(json.dumps(obj).encode("utf-8"))
                request.finish()

        def crashed(failure: Failure) -> None:
            self.log.failure("job API request failed", failure)
            if not gone:
                request.setResponseCode(500)
                request.write(b'{"message": "Internal Server Error"}')
                request.finish()

        d.addCallbacks(answer, crashed)
        return NOT_DONE_YET

    def _authorized(self, request: Request) -> bool:
        assert self._token is not None
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(
            given.strip(), self._token
        )

    async def _handle(self, request: Request) -> tuple[int, dict[str, Any]]:
        await self._runner.wait_ready()
        method = request.method
        path = request.path
        if method == b"POST" and path == b"/":
            return self._create(request)
        match = _JOB_PATH.match(path)
        if match is not None and method in (b"GET", b"DELETE"):
            job_id = match.group(1).decode("ascii")
            if method == b"GET":
                job = self._runner.get(job_id)
            else:
                job = await self._runner.cancel(job_id)
            if job is None:
                return 404, {"message": "Not Found"}
            return 200, job_to_json(job)
        return 501, {"message": "Not Implemented"}

    def _create(self, request: Request) -> tuple[int, dict[str, Any]]:
        try:
            command, arguments, callback = parse_job_request(request.content.read())
            job = self._runner.submit(command, arguments, callback)
        except JobRefused as e:
            self.log.warn("job refused: {reason}", reason=str(e))
            return 400, {"message": "Bad Request", "error": str(e)}
        return 202, job_to_json(job)


def parse_job_request(body: bytes) -> tuple[str, list[str], str | None]:
    """
    The command, arguments and callback of a C{POST /} body.

    @raise JobRefused: when it is not a JSON object with a string
        C{command}, or C{args}/C{callback} have the wrong types.
    """
    try:
        request = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise JobRefused("the request body is not UTF-8")
    except ValueError as e:
        raise JobRefused(f"invalid JSON: {e}")
    if not isinstance(request, dict):
        raise JobRefused("the request body must be a JSON object")
    command = request.get("command")
    if command is None:
        raise JobRefused("command is missing")
    if not isinstance(command, str) or not command:
        raise JobRefused("command must be a non-empty string")
    arguments = split_args(request.get("args"))
    callback = request.get("callback")
    if callback is not None and not isinstance(callback, str):
        raise JobRefused("callback must be a string")
    return command, arguments, callback or None


def _body(request: Request, status: int, obj: dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    return json.dumps(obj).encode("utf-8")


def job_site(reactor, runner: JobRunner, token: str | None = None) -> Site:
    """
    The L{Site} of the job API, with request bodies bounded.
    """
    site = Site(JobsResource(runner, token), reactor=reactor)
    site.requestFactory = _LimitedRequest
    site.displayTracebacks = False
    return site


def command_user(user: str | None, euid: int | None = None) -> tuple[int | None, int | None]:
    """
    The uid and gid jobs run as.

    @param user: the C{--user} option.
    @param euid: this process's effective uid (default: the real one).
    @return: C{(None, None)} unless started as root, then the uid and gid of
        C{user} (default C{nobody}); C{user} C{root} keeps root.
    @raise KeyError: for an unknown user.
    """
    if euid is None:
        euid = os.geteuid()
    if euid != 0:
        return None, None
    entry = pwd.getpwnam(user or "nobody")
    if entry.pw_uid == 0:
        return None, None
    return entry.pw_uid, entry.pw_gid


class JobService(MultiService):
    """
    The job runner as a service: its listener as a child, the runner
    started after it and stopped after it.
    """

    log = Logger()

    def __init__(self, runner: JobRunner) -> None:
        super().__init__()
        self.runner = runner
        self.setName("jobs")
        self._started: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        if self.runner.whitelist is None:
            self.log.warn(
                "the job runner has no --whitelist: every command may be started"
            )
        self._started = Deferred.fromCoroutine(self.runner.start())
        self._started.addErrback(
            lambda f: self.log.failure("the job runner failed to start", f)
        )

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await super().stopService()
        if self._started is not None:
            await self._started
        await self.runner.stop()


def build_jobs_service(reactor, config: Any) -> JobService:
    """
    The C{jobs} service C{config} asks for.

    @param reactor: the reactor.
    @param config: a L{haikutx.config.Config} with C{jobs} set.
    """
    try:
        uid, gid = command_user(config.user)
    except KeyError:
        from twisted.python.usage import UsageError

        raise UsageError(f"--user: there is no user {config.user!r}")
    if config.user and os.geteuid() != 0:
        JobService.log.warn(
            "--user {user} ignored: not started as root, jobs run as this user",
            user=config.user,
        )
    store = SQLiteJobStore(reactor, config.state / "jobs.sqlite3")
    runner = JobRunner(
        reactor,
        store,
        whitelist=config.whitelist,
        max_jobs=config.max_jobs,
        max_running=config.max_running,
        job_time=config.job_time,
        max_output=config.max_output,
        allow=config.allow,
        uid=uid,
        gid=gid,
    )
    service = JobService(runner)
    listener = strports.service(
        config.jobs, job_site(reactor, runner, config.token), reactor=reactor
    )
    listener.setServiceParent(service)
    return service
