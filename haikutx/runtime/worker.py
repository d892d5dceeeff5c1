# -*- test-case-name: haikutx.test.test_pool -*-
"""
The server's side of one worker process: a L{ProcessProtocol} that frames
requests to the worker's fd 3, reads responses from its fd 4, logs what the
worker prints, and sends heartbeat challenges.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from haikutx.child import wire
from haikutx.runtime.body import BodyFeed, RequestBody

#: File descriptor numbers in the worker.
TO_WORKER = 3
FROM_WORKER = 4

CHILD_FDS = {0: "w", 1: "r", 2: "r", TO_WORKER: "w", FROM_WORKER: "r"}


def handler_kind(language: str) -> str:
    """
    What a worker process must be confined for to run a handler written in
    C{language}: C{"python"} (run in the process itself, no exec) or
    C{"stdio"} (an interpreter process started for it).
    """
    return "python" if language == "python" else "stdio"


def describe_exit(reason: Failure) -> str:
    """
    Name how a process ended, for logs and error messages.

    @param reason: the failure given to C{processEnded}.
    @return: for example C{"was killed by signal 9 (SIGKILL)"} or
        C{"exited with status 1"}.
    """
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exited with status 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = "unknown"
            return f"was killed by signal {value.signal} ({name})"
        return f"exited with status {value.exitCode}"
    return str(value)


class WorkerProtocol(ProcessProtocol):
    """
    One worker process.

    @ivar state: C{starting}, C{idle}, C{busy}, C{recycling} or C{dead}.
    @ivar pid: the process id, once started.
    @ivar served: requests this process has served.
    @ivar kind: what the current process is confined for (L{handler_kind}),
        or C{None} while it has run nothing.
    @ivar kill_reason: why the server killed it, if it did.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        on_ready: Callable[["WorkerProtocol"], None],
        on_ended: Callable[["WorkerProtocol", str], None],
        keepalive_interval: float,
        keepalive_timeout: float,
    ) -> None:
        self._reactor = reactor
        self._on_ready = on_ready
        self._on_ended = on_ended
        self._interval = keepalive_interval
        self._timeout = keepalive_timeout
        self._reader = wire.FrameReader()
        self._lines: dict[int, bytes] = {1: b"", 2: b""}
        self._challenge: bytes | None = None
        self._heartbeat: IDelayedCall | None = None
        self._exchange: Any = None
        self._feed: BodyFeed | None = None
        self.state = "starting"
        self.pid: int | None = None
        self.child_pid: int | None = None
        self.slot = 0
        self.deadline: IDelayedCall | None = None
        self.sandbox: dict[str, Any] | None = None
        self.served = 0
        self.kind: str | None = None
        self.kill_reason: str | None = None
        self.started = reactor.seconds()
        self.ended: Deferred[None] = Deferred()

    # Process events

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()
        self.log.info("worker {worker_pid} started in slot {slot}", worker_pid=self.pid, slot=self.slot)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == FROM_WORKER:
            try:
                for kind, payload in self._reader.feed(data):
                    self._frame(kind, payload)
            except (wire.FrameError, ValueError) as e:
                self.kill(f"sent a malformed frame: {e}")
        elif childFD in self._lines:
            self._log_output(childFD, data)

    def _log_output(self, fd: int, data: bytes) -> None:
        lines = (self._lines[fd] + data).split(b"\n")
        self._lines[fd] = lines.pop()
        for line in lines:
            self.log.info(
                "worker {worker_pid} {stream}: {line}",
                worker_pid=self.pid,
                stream="stdout" if fd == 1 else "stderr",
                line=line.decode("utf-8", "replace"),
            )

    def processEnded(self, reason: Failure) -> None:
        cause = self.kill_reason or describe_exit(reason)
        self.state = "dead"
        self._end_body()
        self._stop_heartbeat()
        self._cancel_deadline()
        self.log.info(
            "worker {worker_pid} ended: {reason}", worker_pid=self.pid, reason=cause
        )
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.lost(f"the worker process {cause}")
        self._on_ended(self, cause)
        self.ended.callback(None)

    # Frames

    def _frame(self, kind: int, payload: bytes) -> None:
        if kind == wire.ANSWER:
            if payload == self._challenge:
                self._challenge = None
                self._schedule_heartbeat()
            else:
                self.kill("sent an incorrect heartbeat answer")
        elif kind == wire.READY:
            if self.state in ("starting", "recycling"):
                self.child_pid = json.loads(payload).get("pid")
                self.served = 0
                self.kind = None
                self._cancel_deadline()
                if self.state == "starting":
                    self._schedule_heartbeat()
                self.state = "ready"
                self._on_ready(self)
        elif kind == wire.SANDBOX:
            self.sandbox = json.loads(payload)
        elif kind == wire.CONSOLE:
            self.log.info(
                "console of worker {worker_pid}: {console}",
                worker_pid=self.pid,
                console=payload.decode("utf-8", "replace").rstrip("\n"),
            )
        elif self._exchange is None:
            return
        elif kind == wire.HEAD:
            head = json.loads(payload)
            self._exchange.head(int(head["status"]), head["headers"])
        elif kind == wire.DATA:
            self._exchange.data(payload)
        elif kind == wire.FINISH:
            exchange, self._exchange = self._exchange, None
            self._end_body()
            exchange.finish(json.loads(payload)["trailers"])
        elif kind == wire.FAIL:
            failure = json.loads(payload)
            exchange, self._exchange = self._exchange, None
            self._end_body()
            exchange.fail(int(failure["status"]), failure["message"])

    # Requests

    def run(self, exchange: Any, head: dict[str, Any], body: RequestBody | bytes) -> None:
        """
        Send one request to this worker; its response goes to C{exchange}.

        @param exchange: an L{IExchange}.
        @param head: the request head (L{haikutx.child.wire.REQUEST}).
        @param body: the request body, sent in chunks as the pipe takes
            them (L{BodyFeed}).
        """
        assert self.state == "idle", self.state
        self.state = "busy"
        self.kind = handler_kind(head.get("language", "python"))
        self._exchange = exchange
        pipe = getattr(self.transport, "pipes", {}).get(TO_WORKER)
        self._feed = BodyFeed(lambda data: self.transport.writeToChild(TO_WORKER, data), pipe)
        self._feed.start(wire.encode_json(wire.REQUEST, head), body)

    def retire(self) -> None:
        """
        Ask the idle process to exit, so that its zygote forks a fresh one
        (announced by a new READY).
        """
        self.transport.writeToChild(TO_WORKER, wire.encode(wire.RETIRE))

    def detach(self, exchange: Any) -> None:
        """
        Stop sending the response to C{exchange} (it has answered already).
        """
        if self._exchange is exchange:
            self._exchange = None
            self._end_body()

    def _end_body(self) -> None:
        """
        Stop sending the request body (its response is over): the worker is
        sent the body's end before it can be given another request.
        """
        feed, self._feed = self._feed, None
        if feed is None:
            return
        if self.state == "dead":
            feed.stopProducing()
        else:
            feed.stop()

    # Heartbeat and stopping

    def _schedule_heartbeat(self) -> None:
        self._stop_heartbeat()
        if self.state != "dead":
            self._heartbeat = self._reactor.callLater(self._interval, self._challenge_worker)

    def _challenge_worker(self) -> None:
        self._challenge = os.urandom(8).hex().encode("ascii")
        self.transport.writeToChild(TO_WORKER, wire.encode(wire.CHALLENGE, self._challenge))
        self._heartbeat = self._reactor.callLater(self._timeout, self._missed_heartbeat)

    def _missed_heartbeat(self) -> None:
        self._heartbeat = None
        self.kill(
            f"did not answer a heartbeat within {self._timeout * 1000:.0f} ms"
        )

    def _cancel_deadline(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        self._heartbeat = None

    def kill(self, reason: str) -> None:
        """
        Kill the process at once (SIGKILL), remembering why.
        """
        if self.state == "dead":
            return
        if self.kill_reason is None:
            self.kill_reason = reason
            self.log.warn("killing worker {worker_pid}: {reason}", worker_pid=self.pid, reason=reason)
        self._signal("KILL")

    def terminate(self) -> None:
        """
        Ask the process to stop (SIGTERM).
        """
        self._signal("TERM")

    def _signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except (ProcessExitedAlready, OSError):
            pass
