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
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from haikutx.child import wire
from haikutx.processes import describe_exit, describe_status
from haikutx.runtime.body import BodyFeed, RequestBody
from haikutx.runtime.channels import ChannelTransport, ChildProtocol, ZygoteChannel
from haikutx.runtime.child_response import deliver
from haikutx.runtime.heartbeat import Heartbeat
from haikutx.runtime.output_lines import OutputLines
from haikutx.runtime.slot_wire import child_pid, retire_order
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
        self._fresh_timeout = fresh_timeout
        self._reader = wire.FrameReader()
        #: Lines of what the zygote and its children write.
        self._output = OutputLines(self.log, self)
        #: The current child's heartbeat.
        self._heartbeat = Heartbeat(
            reactor, keepalive_interval, keepalive_timeout, self.kill_child
        )
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
        self._output.zygote_wrote(childFD, data)

    def processEnded(self, reason: Failure) -> None:
        cause = self.kill_reason or describe_exit(reason)
        self.state = "dead"
        self._heartbeat.close()
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
            self._output.child_wrote(pid, payload[_PID.size :], pid in self._children)
        elif kind == wire.SANDBOX:
            self.sandbox = json.loads(payload)
        else:
            raise ValueError(f"unexpected frame kind {kind}")

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
        self._output.child_ended(pid)
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

    def child_frame(self, child: ChildProtocol, kind: int, payload: bytes) -> None:
        """
        A frame from C{child}'s channel.
        """
        if kind not in wire.CHILD_SENDS:
            self.kill_child(child, f"sent a frame it may not send (kind {kind})")
            return
        if kind == wire.ANSWER:
            if child is not self.child or not self._heartbeat.answered(child, payload):
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
        reason = deliver(child, kind, payload)
        if reason is not None:
            self.kill_child(child, reason)

    def child_channel_lost(self, child: ChildProtocol) -> None:
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
                child.end_body()

    # Heartbeat and stopping

    def _schedule_heartbeat(self) -> None:
        if self.state != "dead" and self.child is not None:
            self._heartbeat.schedule(self.child)
        else:
            self._heartbeat.stop()

    def _cancel_deadline(self) -> None:
        self._fresh.clear()

    def _stop_heartbeat(self) -> None:
        self._heartbeat.stop()

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
