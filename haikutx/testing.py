"""
In-memory doubles for tests of code built on haikutx.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from twisted.internet.error import ConnectionDone, ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from zope.interface import implementer

from haikutx.child import wire
from haikutx.interfaces import IWorkerSpawner
from haikutx.jobs.store.memory import MemoryJobStore

__all__ = ["FakeSpawner", "FakeWorkerTransport", "MemoryJobStore"]


class FakeChildTransport:
    """
    The server's end of a fake child's channel: it records what the server
    writes.
    """

    def __init__(self, protocol: Any, pid: int) -> None:
        self.protocol = protocol
        self.pid = pid
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def loseConnection(self) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def frames(self) -> list[tuple[int, bytes]]:
        """
        The frames written to this child so far.
        """
        return list(wire.FrameReader().feed(self.written))

    def send(self, kind: int, payload: bytes = b"") -> None:
        """
        Deliver a frame from the child to the server.
        """
        self.protocol.dataReceived(wire.encode(kind, payload))


class FakeZygoteChannel:
    """
    A fake zygote's channel (the part of L{haikutx.runtime.worker.ZygoteChannel}
    the slot uses): frames the server writes are recorded, and a child's
    channel is adopted as a L{FakeChildTransport}.
    """

    def __init__(self, owner: FakeWorkerTransport) -> None:
        self._owner = owner
        self.written = b""
        self.closed = False

    def write(self, frame: bytes) -> None:
        self.written += frame

    def adopt(self, descriptor: int, protocol: Any) -> None:
        transport = FakeChildTransport(protocol, self._owner.pending_pid)
        self._owner.children[transport.pid] = transport
        protocol.makeConnection(transport)

    def close(self) -> None:
        self.closed = True


class FakeWorkerTransport:
    """
    The process transport of a fake worker slot (its zygote): it records
    the signals the server sends, plays the zygote's channel, and starts
    and ends fake children.

    @ivar children: the transports of the children started, by pid.
    @ivar child: the transport of the child started last.
    """

    def __init__(self, protocol: Any, pid: int) -> None:
        self.protocol = protocol
        self.pid = pid
        self.signals: list[str] = []
        self.stdin_closed = False
        self.exited = False
        self.children: dict[int, FakeChildTransport] = {}
        self.child: FakeChildTransport | None = None
        self.pending_pid = 0
        self.channel = FakeZygoteChannel(self)
        self._next_pid = pid * 100

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        from twisted.internet.error import ProcessExitedAlready

        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def zygote(self, kind: int, payload: bytes = b"") -> None:
        """
        Deliver a frame from the zygote to the server.
        """
        self.protocol.zygote_data(wire.encode(kind, payload), deque([-1]))

    def start_child(self, pid: int | None = None) -> FakeChildTransport:
        """
        Have the zygote report a new child (with its channel).
        """
        if pid is None:
            self._next_pid += 1
            pid = self._next_pid
        self.pending_pid = pid
        self.protocol.zygote_data(
            wire.encode_json(wire.CHILD, {"pid": pid}), deque([-1, -1])
        )
        self.child = self.children[pid]
        return self.child

    def end_child(self, pid: int | None = None, code: int | None = 0,
                  signal: int | None = None) -> None:
        """
        Have the zygote report a child's end (the last one by default).
        """
        if pid is None:
            assert self.child is not None
            pid = self.child.pid
        report = {"pid": pid, "code": code, "signal": signal}
        self.zygote(wire.ENDED, json.dumps(report).encode())

    def zygote_frames(self) -> list[tuple[int, Any]]:
        """
        The frames the server wrote to the zygote, JSON payloads decoded.
        """
        return [
            (kind, json.loads(payload))
            for kind, payload in wire.FrameReader().feed(self.channel.written)
        ]

    def frames(self) -> list[tuple[int, bytes]]:
        """
        The frames written to the last child.
        """
        return self.child.frames() if self.child is not None else []

    def send(self, kind: int, payload: bytes = b"") -> None:
        """
        Deliver a frame from the last child to the server.
        """
        assert self.child is not None
        self.child.send(kind, payload)

    def exit(self, code: int = 0, signal: int | None = None) -> None:
        """
        End the fake zygote.
        """
        self.exited = True
        if code == 0 and signal is None:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(code, signal))
        self.protocol.processEnded(reason)


@implementer(IWorkerSpawner)
class FakeSpawner:
    """
    Starts fake worker slots: each protocol gets a L{FakeWorkerTransport}
    and its fake zygote channel.

    @ivar started: the transports of every worker started, in order.
    """

    def __init__(self) -> None:
        self.started: list[FakeWorkerTransport] = []

    def spawn(self, protocol: Any, max_requests: int) -> None:
        transport = FakeWorkerTransport(protocol, 1000 + len(self.started))
        self.started.append(transport)
        protocol.makeConnection(transport)
        protocol.zygote_connected(transport.channel)
