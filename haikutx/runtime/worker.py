# -*- test-case-name: haikutx.test.test_pool -*-
"""
The server's side of one worker slot: a zygote process and, one at a time,
the children it forks (L{haikutx.child.zygote}).

Only the zygote, which runs no handler code, is believed about the slot's
processes: its channel (L{ZygoteChannel}) brings each new child's pid with
the server's end of a channel made for that child alone, and each child's
end.  A child's channel (L{ChildProtocol}) carries its requests and
responses and nothing else; it is given at most C{--maxrequests} requests,
then closed, and the zygote is told to kill the child.  Nothing a handler
can do in its process decides which process serves a later request.
"""

from __future__ import annotations

import json
import os
import signal
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from haikutx.child import wire
from haikutx.runtime.body import BodyFeed, RequestBody
from haikutx.runtime.channels import ChannelTransport, ChildProtocol, ZygoteChannel
from haikutx.runtime.timers import Deadline

__all__ = [
    "CHILD_FDS",
    "ZYGOTE_FD",
    "ChildProtocol",
    "ChannelTransport",
    "WorkerProtocol",
    "ZygoteChannel",
    "child_pid",
    "describe_exit",
    "describe_status",
    "handler_kind",
    "retire_order",
]

#: The zygote's end of its channel to the server, in the zygote.
ZYGOTE_FD = 3

#: The zygote's other descriptors: stdin (closed at once), stdout, stderr.
CHILD_FDS: dict[int, Any] = {0: "w", 1: "r", 2: "r"}

#: Seconds a child whose channel closed is given for its end to be
#: reported before it is killed.
CHANNEL_GRACE = 1.0

_PID = struct.Struct(">I")


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
        return describe_status(value.exitCode, value.signal)
    return str(value)


def describe_status(code: int | None, number: int | None) -> str:
    """
    Name how a process ended from its exit status or signal.
    """
    if number is not None:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {number} ({name})"
    return f"exited with status {code}"


def _pairs(value: Any) -> list[list[str]]:
    """
    Headers or trailers from a child's frame: a list of C{[name, value]}
    string pairs.

    @raise ValueError: for anything else (the child sent a malformed frame).
    """
    if not isinstance(value, list) or not all(
        isinstance(pair, list)
        and len(pair) == 2
        and isinstance(pair[0], str)
        and isinstance(pair[1], str)
        for pair in value
    ):
        raise ValueError("headers are not a list of [name, value] strings")
    return value


#: Heads one child's channel remembers at most, and the largest it
#: remembers, in bytes.
_HEADS_KEPT = 256
_HEAD_KEPT_SIZE = 1024


def _remember_head(
    heads: dict[bytes, tuple[int, Any]], payload: bytes, head: tuple[int, list[list[str]]]
) -> None:
    """
    Remember a valid response head a child sent, by its bytes: a handler's
    head is the same bytes on every request, and what they decode to is a
    function of them alone.  Each child has its own (a child never learns
    from the server's speed what another one sent); the headers are kept
    as a tuple of tuples, never changed, and each exchange given its own
    list.
    """
    if len(payload) > _HEAD_KEPT_SIZE:
        return
    if len(heads) >= _HEADS_KEPT:
        heads.clear()
    heads[payload] = (head[0], tuple((name, value) for name, value in head[1]))


def child_pid(payload: bytes) -> int:
    """
    The pid a zygote's C{CHILD} frame announces.  The zygote's own form,
    C{{"pid":N}}, is read by hand (the json module's path costs a dozen
    calls per child); anything else is read as JSON.

    @raise ValueError: if it is not a JSON object with an integer C{pid}.
    @raise KeyError: if it has no C{pid}.
    """
    if payload.startswith(b'{"pid":') and payload.endswith(b"}"):
        number = payload[7:-1]
        if number.isdigit() and not number.startswith(b"0"):
            return int(number)
    return int(json.loads(payload)["pid"])


def retire_order(pid: int, report: bool) -> bytes:
    """
    The C{RETIRE} frame that has the zygote kill child C{pid} (and report
    its end, if C{report}): compact JSON, made by hand.
    """
    if report:
        return wire.encode(wire.RETIRE, b'{"pid":%d,"report":true}' % pid)
    return wire.encode(wire.RETIRE, b'{"pid":%d}' % pid)


def _final_status(status: int) -> bool:
    """
    Whether C{status} may answer a request: not an interim one (C{1xx}),
    after which the client would read what follows as the response, or as
    another protocol (C{101}).
    """
    return 200 <= status <= 599


def _reading_paused(child: ChildProtocol) -> bool:
    """
    Whether the server has stopped reading C{child}'s channel for now (its
    response's client is not reading).
    """
    return bool(getattr(child.transport, "paused", False))


class WorkerProtocol(ProcessProtocol):
    """
    One worker slot: its zygote process and its current child.

    @ivar state: C{starting}, C{idle}, C{busy}, C{recycling} or C{dead}.
    @ivar pid: the zygote's process id, once started.
    @ivar child: the current child's channel, or C{None} between children.
    @ivar served: requests the current child has served.
    @ivar kind: what the current child is confined for (L{handler_kind}),
        or C{None} while it has run nothing.
    @ivar kill_reason: why the server killed the zygote, if it did.
    @ivar children_started: children its zygote has started.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        on_ready: Callable[[WorkerProtocol], None],
        on_ended: Callable[[WorkerProtocol, str], None],
        keepalive_interval: float,
        keepalive_timeout: float,
        on_child_ended: Callable[[WorkerProtocol, ChildProtocol, str], None] | None = None,
        fresh_timeout: float = 5.0,
    ) -> None:
        self._reactor = reactor
        self._on_ready = on_ready
        self._on_ended = on_ended
        self._on_child_ended = on_child_ended
        self._interval = keepalive_interval
        self._timeout = keepalive_timeout
        self._fresh_timeout = fresh_timeout
        self._reader = wire.FrameReader()
        self._lines: dict[int, bytes] = {1: b"", 2: b""}
        self._child_lines: dict[int, bytes] = {}
        #: The next heartbeat challenge of the current child.
        self._challenge = Deadline(reactor, self._challenge_child)
        #: The wait for the answer to a challenge.
        self._heartbeat: IDelayedCall | None = None
        #: The wait for the zygote's next child (L{expect_child}).
        self._fresh = Deadline(reactor, self._no_fresh_child)
        #: The time limit of the request the slot runs, set by its
        #: exchange (one request at a time: one timer for all of them).
        self.time_limit = Deadline(reactor)
        self._zygote: Any = None
        self._zygote_grace: IDelayedCall | None = None
        self._children: dict[int, ChildProtocol] = {}
        self.state = "starting"
        self.pid: int | None = None
        self.child: ChildProtocol | None = None
        self.slot = 0
        self.sandbox: dict[str, Any] | None = None
        self.served = 0
        self.children_started = 0
        self.kind: str | None = None
        self.kill_reason: str | None = None
        self.started = reactor.seconds()
        self.ended: Deferred[None] = Deferred()
        #: The slot's cgroup (L{haikutx.runtime.rungroup.SlotGroup}), set
        #: by the spawner: a child whose handlers may start processes joins
        #: a group of its own beneath it before its first request (see
        #: L{_confined_alone}), and what is left in it is killed when the
        #: child ends.
        self.run_group: Any = None

    @property
    def child_pid(self) -> int | None:
        """
        The current child's pid, or C{None} between children.
        """
        return self.child.pid if self.child is not None else None

    # The zygote's process

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()
        self.log.info(
            "worker {worker_pid} started in slot {slot}", worker_pid=self.pid, slot=self.slot
        )

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD in self._lines:
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
        self._stop_heartbeat()
        self._challenge.stop()
        self._fresh.stop()
        self.time_limit.stop()
        if self._zygote_grace is not None and self._zygote_grace.active():
            self._zygote_grace.cancel()
        self.log.info(
            "worker {worker_pid} ended: {reason}", worker_pid=self.pid, reason=cause
        )
        children, self._children = self._children, {}
        self.child = None
        for child in children.values():
            self._cancel_grace(child)
            # Its zygote is gone: do not count on the parent-death signal.
            child.kill_process()
            child.release_pidfd()
            exchange, child.exchange = child.exchange, None
            child.close()
            if exchange is not None:
                exchange.lost(f"the worker process {cause}")
        if self._zygote is not None:
            self._zygote.close()
        self._on_ended(self, cause)
        self.ended.callback(None)

    # The zygote's channel

    def zygote_connected(self, channel: Any) -> None:
        """
        The zygote's channel is up: C{channel} has C{write(frame)},
        C{adopt(fd, protocol)} and C{close()} (L{ZygoteChannel}).
        """
        self._zygote = channel

    def zygote_lost(self) -> None:
        """
        The zygote's channel closed.
        """
        self._zygote = None
        if self.state != "dead":
            # Usually the zygote has died and its end is on its way; if not,
            # a zygote without a channel is of no use.
            self._zygote_grace = self._reactor.callLater(
                CHANNEL_GRACE, self.kill_zygote, "closed its channel"
            )

    def zygote_data(self, data: bytes, fds: deque[int]) -> None:
        """
        Bytes from the zygote, and the descriptors received so far.
        """
        try:
            for kind, payload in self._reader.feed(data):
                if self.state == "dead":
                    return
                self._zygote_frame(kind, payload, fds)
        except (wire.FrameError, ValueError, KeyError, TypeError, IndexError) as e:
            self.kill_zygote(f"sent a malformed frame: {e}")

    def _zygote_frame(self, kind: int, payload: bytes, fds: deque[int]) -> None:
        if kind == wire.CHILD:
            pid = child_pid(payload)
            descriptor = fds.popleft()
            pidfd = fds.popleft()
            child = ChildProtocol(self, pid, pidfd)
            self._zygote.adopt(descriptor, child)
            self._children[pid] = child
            self._child_started(child)
        elif kind == wire.ENDED:
            report = json.loads(payload)
            self._child_ended(int(report["pid"]), report.get("code"), report.get("signal"))
        elif kind == wire.OUTPUT:
            (pid,) = _PID.unpack_from(payload)
            self._log_child_output(pid, payload[_PID.size :])
        elif kind == wire.SANDBOX:
            self.sandbox = json.loads(payload)
        else:
            raise ValueError(f"unexpected frame kind {kind}")

    def _log_child_output(self, pid: int, data: bytes) -> None:
        lines = (self._child_lines.get(pid, b"") + data).split(b"\n")
        rest = lines.pop()
        if rest and pid in self._children:
            self._child_lines[pid] = rest
        else:
            # A retired child's end is not reported: keep no partial line.
            self._child_lines.pop(pid, None)
            if rest:
                lines.append(rest)
        for line in lines:
            self.log.info(
                "worker {worker_pid} process {child_pid} {stream}: {line}",
                worker_pid=self.pid,
                child_pid=pid,
                stream="output",
                line=line.decode("utf-8", "replace"),
            )

    def _child_started(self, child: ChildProtocol) -> None:
        if self.state == "dead" or self.child is not None:
            self._children.pop(child.pid, None)
            child.close()
            child.kill_process()
            child.release_pidfd()
            if self.state != "dead":
                self.kill_zygote("started a second child while one was current")
            return
        self.child = child
        self.children_started += 1
        self.served = 0
        self.kind = None
        self._cancel_deadline()
        self._schedule_heartbeat()
        self.state = "ready"
        self._on_ready(self)

    def _child_ended(self, pid: int, code: int | None, number: int | None) -> None:
        if self.run_group is not None:
            # What the child's handlers left running ends with it.
            self.run_group.child_ended(pid)
        child = self._children.pop(pid, None)
        if child is None:
            return
        self._cancel_grace(child)
        child.release_pidfd()
        rest = self._child_lines.pop(pid, b"")
        if rest:
            self._log_child_output(pid, rest + b"\n")
        cause = child.kill_reason or describe_status(code, number)
        exchange, child.exchange = child.exchange, None
        child.close()
        if child is self.child:
            self._lose_child()
        if exchange is not None:
            exchange.lost(f"the worker process {cause}")
        if self._on_child_ended is not None:
            self._on_child_ended(self, child, cause)

    def _lose_child(self) -> None:
        """
        The current child is gone: wait for the zygote's next one.
        """
        self.child = None
        self._stop_heartbeat()
        if self.state != "dead":
            self.state = "recycling"
            self.expect_child()

    def expect_child(self) -> None:
        """
        Kill the zygote if its next child does not come in time.
        """
        self._fresh.set(self._fresh_timeout)

    def _no_fresh_child(self) -> None:
        self.kill_zygote("did not start a fresh process after its last request")

    # A child's channel

    def _child_frame(self, child: ChildProtocol, kind: int, payload: bytes) -> None:
        if kind not in wire.CHILD_SENDS:
            self.kill_child(child, f"sent a frame it may not send (kind {kind})")
            return
        if kind == wire.ANSWER:
            if child is self.child and child.challenge is not None and payload == child.challenge:
                child.challenge = None
                self._schedule_heartbeat()
            else:
                self.kill_child(child, "sent an incorrect heartbeat answer")
            return
        if kind == wire.CONSOLE:
            # Logged only for a request run with --debug, and no more than
            # its console limit: a handler can forge these frames at will.
            left = child.console_left
            if left is not None:
                if left <= 0:
                    return
                payload = payload[:left]
                child.console_left = left - len(payload)
            self.log.info(
                "console of worker {worker_pid}: {console}",
                worker_pid=self.pid,
                console=payload.decode("utf-8", "replace").rstrip("\n"),
            )
            return
        if kind in (wire.HEAD, wire.FINISH, wire.FAIL) and len(payload) > wire.MAX_HEAD:
            self.kill_child(
                child,
                f"sent a response head, trailers or failure of {len(payload)} bytes "
                f"(at most {wire.MAX_HEAD})",
            )
            return
        exchange = child.exchange
        if exchange is None:
            return
        if kind == wire.HEAD:
            if child.headed:
                # Each would add to the response's headers, never sent.
                self.kill_child(child, "sent a second response head")
                return
            child.headed = True
            known = child.heads.get(payload)
            if known is None:
                head = json.loads(payload)
                status = int(head["status"])
                if not _final_status(status):
                    self.kill_child(child, f"sent an invalid status {status}")
                    return
                known = (status, _pairs(head["headers"]))
                _remember_head(child.heads, payload, known)
            exchange.head(known[0], [[name, value] for name, value in known[1]])
        elif kind == wire.DATA:
            exchange.data(payload)
        elif kind == wire.FINISH:
            trailers = (
                [] if payload == wire.NO_TRAILERS else _pairs(json.loads(payload)["trailers"])
            )
            child.exchange = None
            self._end_body(child)
            exchange.finish(trailers)
        elif kind == wire.FAIL:
            failure = json.loads(payload)
            if not isinstance(failure["message"], str):
                raise ValueError("a failure's message is not a string")
            if not _final_status(int(failure["status"])):
                self.kill_child(child, f"sent an invalid status {failure['status']}")
                return
            child.exchange = None
            self._end_body(child)
            exchange.fail(int(failure["status"]), failure["message"])

    def _child_channel_lost(self, child: ChildProtocol) -> None:
        """
        A child closed its channel (or died): give its zygote a moment to
        report its end, then kill it.
        """
        if child.pid in self._children and child.grace is None:
            child.grace = self._reactor.callLater(
                CHANNEL_GRACE, self.kill_child, child, "closed its channel"
            )
        if child is self.child:
            self._lose_child()

    def _cancel_grace(self, child: ChildProtocol) -> None:
        if child.grace is not None and child.grace.active():
            child.grace.cancel()
        child.grace = None

    # Requests

    def run(self, exchange: Any, head: dict[str, Any], body: RequestBody | bytes) -> None:
        """
        Send one request to this slot's current child; its response goes to
        C{exchange}.

        @param exchange: an L{IExchange}.
        @param head: the request head (L{haikutx.child.wire.REQUEST}).
        @param body: the request body, sent in chunks as the channel takes
            them (L{BodyFeed}).

        The C{REQUEST} frame sent is the exchange's C{frame}, if it has one
        made already (L{haikutx.runtime.frames}); else C{head}, encoded.
        """
        assert self.state == "idle" and self.child is not None, self.state
        self.state = "busy"
        self.kind = handler_kind(head.get("language", "python"))
        child = self.child
        if self.run_group is not None and not child.requested and not self._confined_alone():
            # Before its first request, so that all it starts is born there.
            self.run_group.admit(self, child)
        child.exchange = exchange
        child.requested = True
        child.headed = False
        limit = int(head.get("max_console", 0)) if head.get("debug") else 0
        child.console_left = limit if limit > 0 or not head.get("debug") else None
        consumer = child.transport if hasattr(child.transport, "registerProducer") else None
        child.feed = BodyFeed(child.send, consumer)
        frame = getattr(exchange, "frame", None)
        if frame is None:
            frame = wire.encode_json(wire.REQUEST, head)
        child.feed.start(frame, body)

    def retire(self) -> None:
        """
        Be done with the current child: close its channel and have its
        zygote kill it and fork the next (which the zygote announces).
        """
        child = self.child
        if child is None:
            return
        self._stop_heartbeat()
        self.child = None
        child.retired = True
        self._children.pop(child.pid, None)
        child.close()
        # The zygote hears first, so that it takes the death for a retirement.
        self._tell_zygote_to_end(child, report=False)
        child.kill_process()
        child.release_pidfd()
        if self.run_group is not None:
            # Its end is not reported: what its handlers left ends now.
            self.run_group.child_ended(child.pid, self._may_have_started_processes())

    def _may_have_started_processes(self) -> bool:
        """
        Whether the current child's handlers may have started processes:
        not if it ran none, nor if it ran Python handlers under the seccomp
        layer, which denies them new processes (its zygote said the layer
        is active); a stdio child may have.
        """
        if self.kind is None:
            return False
        if self.kind == "python":
            layers = (self.sandbox or {}).get("layers") or {}
            return layers.get("seccomp") != "active"
        return True

    def _confined_alone(self) -> bool:
        """
        Whether the current child, about to run handlers of its kind, is
        bounded without a cgroup of its own: Python handlers under the
        seccomp layer (no new processes: the child is all there is, its
        memory bounded by C{RLIMIT_AS}) and the uid layer (its threads
        bounded by C{RLIMIT_NPROC} of the slot's own uid).  Then it joins
        no group: that costs the server 0.15-0.2 ms of CPU per child.
        """
        if self.kind != "python":
            return False
        layers = (self.sandbox or {}).get("layers") or {}
        return layers.get("seccomp") == "active" and str(layers.get("uid", "")).startswith(
            "active"
        )

    def _tell_zygote_to_end(self, child: ChildProtocol, report: bool) -> None:
        if self._zygote is not None:
            self._zygote.write(retire_order(child.pid, report))

    def detach(self, exchange: Any) -> None:
        """
        Stop sending the response to C{exchange} (it has answered already).
        """
        for child in self._children.values():
            if child.exchange is exchange:
                child.exchange = None
                self._end_body(child)

    def _end_body(self, child: ChildProtocol) -> None:
        """
        Stop sending C{child} its request's body (the response is over): it
        gets the body's end before it can be given another request.
        """
        feed, child.feed = child.feed, None
        if feed is None:
            return
        if child.closed:
            feed.stopProducing()
        else:
            feed.stop()

    # Heartbeat and stopping

    def _schedule_heartbeat(self) -> None:
        self._stop_heartbeat()
        if self.state != "dead" and self.child is not None:
            self._challenge.set(self._interval)

    def _challenge_child(self) -> None:
        child = self.child
        if child is None:
            return
        if _reading_paused(child):
            # Its client is slow: the child waits on a full channel, and
            # its answer would not be read; the time limit still holds.
            self._schedule_heartbeat()
            return
        child.challenge = os.urandom(8).hex().encode("ascii")
        child.send(wire.encode(wire.CHALLENGE, child.challenge))
        self._heartbeat = self._reactor.callLater(self._timeout, self._missed_heartbeat, child)

    def _missed_heartbeat(self, child: ChildProtocol) -> None:
        self._heartbeat = None
        if _reading_paused(child) and child is self.child:
            # Its answer may be waiting unread behind a slow client's data.
            self._heartbeat = self._reactor.callLater(
                self._timeout, self._missed_heartbeat, child
            )
            return
        self.kill_child(
            child, f"did not answer a heartbeat within {self._timeout * 1000:.0f} ms"
        )

    def _cancel_deadline(self) -> None:
        self._fresh.clear()

    def _stop_heartbeat(self) -> None:
        self._challenge.clear()
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        self._heartbeat = None

    def kill(self, reason: str) -> None:
        """
        Kill the process running this slot's handlers: the current child
        (through its zygote), or the zygote when there is none.
        """
        if self.child is not None:
            self.kill_child(self.child, reason)
        else:
            self.kill_zygote(reason)

    def kill_child(self, child: ChildProtocol, reason: str) -> None:
        """
        Have the zygote kill C{child} at once (C{SIGKILL}), remembering why.
        """
        if child.kill_reason is None and child.pid in self._children:
            child.kill_reason = reason
            self.log.warn(
                "killing process {child_pid} of worker {worker_pid}: {reason}",
                worker_pid=self.pid,
                child_pid=child.pid,
                reason=reason,
            )
        self._cancel_grace(child)
        if child is self.child:
            self._lose_child()
        child.close()
        self._tell_zygote_to_end(child, report=True)
        child.kill_process()

    def kill_zygote(self, reason: str) -> None:
        """
        Kill the zygote at once (SIGKILL), remembering why; its children
        die with it.
        """
        if self.state == "dead":
            return
        if self.kill_reason is None:
            self.kill_reason = reason
            self.log.warn(
                "killing worker {worker_pid}: {reason}", worker_pid=self.pid, reason=reason
            )
        self._signal("KILL")

    def terminate(self) -> None:
        """
        Ask the zygote to stop (SIGTERM); its children die with it.
        """
        self._signal("TERM")

    def _signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except (ProcessExitedAlready, OSError):
            pass
