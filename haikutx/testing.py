"""
In-memory doubles for tests of code built on haikutx.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from zope.interface import implementer

from haikutx.child import wire
from haikutx.interfaces import IWorkerSpawner
from haikutx.jobs.store.memory import MemoryJobStore

__all__ = ["FakeSpawner", "FakeWorkerTransport", "MemoryJobStore"]


class FakeWorkerTransport:
    """
    The process transport of a fake worker: it records what the server
    writes to each child fd and the signals it sends.
    """

    def __init__(self, protocol: Any, pid: int) -> None:
        self.protocol = protocol
        self.pid = pid
        self.written: dict[int, bytes] = {}
        self.signals: list[str] = []
        self.stdin_closed = False
        self.exited = False

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written[fd] = self.written.get(fd, b"") + data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        from twisted.internet.error import ProcessExitedAlready

        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def frames(self, fd: int = 3) -> list[tuple[int, bytes]]:
        """
        The frames written to C{fd} so far.
        """
        return list(wire.FrameReader().feed(self.written.get(fd, b"")))

    def send(self, kind: int, payload: bytes = b"") -> None:
        """
        Deliver a frame from the worker to the server.
        """
        self.protocol.childDataReceived(4, wire.encode(kind, payload))

    def exit(self, code: int = 0, signal: int | None = None) -> None:
        """
        End the fake process.
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
    Starts fake workers: each protocol gets a L{FakeWorkerTransport}.

    @ivar started: the transports of every worker started, in order.
    """

    def __init__(self) -> None:
        self.started: list[FakeWorkerTransport] = []

    def spawn(self, protocol: Any, max_requests: int) -> None:
        transport = FakeWorkerTransport(protocol, 1000 + len(self.started))
        self.started.append(transport)
        protocol.makeConnection(transport)
