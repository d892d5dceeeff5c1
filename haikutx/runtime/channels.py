# -*- test-case-name: haikutx.test.test_pool -*-
"""
The server's ends of the channels of a worker slot: the zygote's
(L{ZygoteChannel}, a unix socket that also carries descriptors) and each
child's (L{ChildProtocol}).  Both hand what they read to the slot's
L{haikutx.runtime.worker.WorkerProtocol}, which decides what it means.
"""

from __future__ import annotations

import os
import signal
import socket
import typing
from collections import deque
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IFileDescriptorReceiver,
    IPushProducer,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from haikutx.child import wire


class Slot(typing.Protocol):
    """
    What a slot's channels tell their slot
    (L{haikutx.runtime.worker.WorkerProtocol}), which decides what it means.
    """

    def child_frame(self, child: ChildProtocol, kind: int, payload: bytes) -> None:
        """
        A frame from C{child}.
        """

    def child_channel_lost(self, child: ChildProtocol) -> None:
        """
        C{child} closed its channel, or died.
        """

    def kill_child(self, child: ChildProtocol, reason: str) -> None:
        """
        Have C{child} killed, for C{reason}.
        """

    def zygote_connected(self, channel: ZygoteChannel) -> None:
        """
        The zygote's channel is up.
        """

    def zygote_data(self, data: bytes, fds: deque[int]) -> None:
        """
        Bytes from the zygote, and the descriptors received so far.
        """

    def zygote_lost(self) -> None:
        """
        The zygote's channel closed.
        """


class ChildProtocol(Protocol):
    """
    The server's end of one child's channel.

    @ivar pid: the child's pid, as its zygote reported it.
    @ivar exchange: the L{IExchange} of the request it is running, if any.
    @ivar requested: whether a request was ever sent to it.
    @ivar kill_reason: why the server had it killed, if it did.
    @ivar retired: whether the server retired it (its routine end).
    @ivar closed: whether the channel is closed.
    """

    def __init__(self, slot: Slot, pid: int, pidfd: int = -1) -> None:
        self.slot = slot
        self.pid = pid
        self.pidfd = pidfd
        self.exchange: Any = None
        self.requested = False
        self.kill_reason: str | None = None
        self.retired = False
        self.closed = False
        self.challenge: bytes | None = None
        #: Whether it sent the head of its current request's response.
        self.headed = False
        #: Console bytes still to be logged for its request (C{None}: no
        #: limit, with --debug and --maxconsole 0).
        self.console_left: int | None = 0
        self.grace: IDelayedCall | None = None
        #: The L{haikutx.runtime.body.BodyFeed} sending its request's body,
        #: while it does.
        self.feed: Any = None
        #: The valid response heads it sent, by their bytes, decoded
        #: (L{haikutx.runtime.worker}): its own, never another child's.
        self.heads: dict[bytes, tuple[int, Any]] = {}
        self._reader = wire.FrameReader()

    def dataReceived(self, data: bytes) -> None:
        try:
            for kind, payload in self._reader.feed(data):
                if self.closed:
                    break
                self.slot.child_frame(self, kind, payload)
        except (wire.FrameError, ValueError, KeyError, TypeError) as e:
            self.slot.kill_child(self, f"sent a malformed frame: {e}")
        # What the response's body brought in this read goes to its client
        # now (a response that ended in it has been written whole).
        exchange = self.exchange
        if exchange is not None:
            exchange.flush()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.closed:
            self.closed = True
            self.slot.child_channel_lost(self)

    def send(self, data: bytes) -> None:
        """
        Write frames to the child, unless the channel is closed.
        """
        if not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        """
        Close the channel: the child gets no more requests on it.
        """
        if not self.closed:
            self.closed = True
            feed, self.feed = self.feed, None
            if feed is not None:
                # A registered producer would keep the channel open.
                feed.stopProducing()
            self.transport.loseConnection()

    def end_body(self) -> None:
        """
        Stop sending the child its request's body (the response is over):
        it gets the body's end before it can be given another request.
        """
        feed, self.feed = self.feed, None
        if feed is None:
            return
        if self.closed:
            feed.stopProducing()
        else:
            feed.stop()

    def kill_process(self) -> None:
        """
        Kill the child through its pidfd (safe from pid reuse; works when
        its zygote is gone).
        """
        if self.pidfd >= 0:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except OSError:
                pass

    def release_pidfd(self) -> None:
        """
        Close the pidfd (the child has ended or is being killed).
        """
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


@implementer(IReadDescriptor, IWriteDescriptor, IPushProducer)
class ChannelTransport:
    """
    A lean transport for a child's channel, one per request with
    C{--maxrequests 1}: reads with C{recv}, writes at once when the socket
    takes them (buffering only the rest), and closes without a further
    trip through the reactor.  A full Twisted transport costs several times
    as much to set up and tear down for a connection that carries one
    request.

    With C{receive_fds}, it also takes descriptors passed with
    C{SCM_RIGHTS} (the zygote's channel) and gives each to the protocol's
    C{fileDescriptorReceived} before the bytes they came with.

    @ivar disconnected: whether it is closed.
    """

    #: Descriptors taken per read at most (a zygote passes two per child).
    MAX_FDS = 16

    def __init__(
        self, reactor: Any, descriptor: int, protocol: Protocol, receive_fds: bool = False
    ) -> None:
        self._reactor = reactor
        # Named, not asked of the kernel (three system calls per child).
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, descriptor)
        self._socket.setblocking(False)
        self._protocol = protocol
        self._receive_fds = receive_fds
        self._pending = b""
        self._producer: Any = None
        self._producing = False
        self._writes = 0
        #: Whether the reactor watches the socket for writing (what it did
        #: not take waits in C{_pending}).
        self._writing = False
        self.disconnected = False
        #: Whether reading is paused (L{pauseProducing}).
        self.paused = False
        reactor.addReader(self)

    # IReadDescriptor, IWriteDescriptor

    def fileno(self) -> int:
        return self._socket.fileno() if not self.disconnected else -1

    def logPrefix(self) -> str:
        return "ChildChannel"

    def doRead(self) -> Any:
        fds: list[int] = []
        try:
            if self._receive_fds:
                data, fds, _, _ = socket.recv_fds(self._socket, 65536, self.MAX_FDS)
            else:
                data = self._socket.recv(65536)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        for fd in fds:
            self._protocol.fileDescriptorReceived(fd)  # type: ignore[attr-defined]
        if not data:
            self._close(ConnectionDone())
            return None
        self._protocol.dataReceived(data)
        return None

    def doWrite(self) -> Any:
        self._send()
        return None

    def connectionLost(self, reason: Failure) -> None:
        self._close(reason.value)

    # ITransport, the part a ChildProtocol uses

    def write(self, data: bytes) -> None:
        if self.disconnected:
            return
        self._writes += 1
        self._pending += data
        self._send()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """
        Take a pull producer (a request body's L{BodyFeed}): it is asked
        for more each time what it wrote has gone into the socket, so no
        more than a frame of it waits in this transport.
        """
        assert not streaming, "only pull producers feed a child's channel"
        self._producer = producer
        self._send()

    def unregisterProducer(self) -> None:
        self._producer = None

    # IPushProducer: the response's client is slow, so the child waits

    def pauseProducing(self) -> None:
        """
        Stop reading the child's frames (its client's connection is full):
        the child's writes block instead of the server buffering them.
        """
        if not self.disconnected and not self.paused:
            self.paused = True
            self._reactor.removeReader(self)

    def resumeProducing(self) -> None:
        """
        Read the child's frames again.
        """
        if self.paused:
            self.paused = False
            if not self.disconnected:
                self._reactor.addReader(self)

    def stopProducing(self) -> None:
        """
        The response's client is gone: read on (the exchange decides what
        becomes of the child).
        """
        self.resumeProducing()

    def loseConnection(self) -> None:
        self._close(ConnectionDone())

    def _send(self) -> None:
        while not self.disconnected:
            if self._pending:
                try:
                    sent = self._socket.send(self._pending)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    self._close(ConnectionDone())
                    return
                self._pending = self._pending[sent:]
                if self._pending:
                    if not self._writing:
                        self._writing = True
                        self._reactor.addWriter(self)
                    return
            if self._writing:
                self._writing = False
                self._reactor.removeWriter(self)
            if self._producer is None or self._producing:
                return
            # Drained: pull the producer's next piece (in this loop, not by
            # recursion; a producer that writes nothing is asked no more).
            writes = self._writes
            self._producing = True
            try:
                self._producer.resumeProducing()
            finally:
                self._producing = False
            if self._writes == writes:
                return

    def _close(self, reason: Exception) -> None:
        if self.disconnected:
            return
        if not self.paused:
            self._reactor.removeReader(self)
        if self._writing:
            self._writing = False
            self._reactor.removeWriter(self)
        self.disconnected = True
        self._socket.close()
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        self._protocol.connectionLost(Failure(reason))


@implementer(IFileDescriptorReceiver)
class ZygoteChannel(Protocol):
    """
    The server's end of a zygote's channel: frames to and from
    its L{Slot}, and the descriptors passed with them.
    """

    def __init__(self, reactor: Any, slot: Slot) -> None:
        self._reactor = reactor
        self._slot = slot
        self._fds: deque[int] = deque()

    def connectionMade(self) -> None:
        self._slot.zygote_connected(self)

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self._fds.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        self._slot.zygote_data(data, self._fds)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        while self._fds:
            os.close(self._fds.popleft())
        self._slot.zygote_lost()

    def write(self, frame: bytes) -> None:
        """
        Send a frame to the zygote.
        """
        self.transport.write(frame)

    def adopt(self, descriptor: int, protocol: Protocol) -> None:
        """
        Connect C{protocol} to a child's channel passed by the zygote (the
        descriptor is owned by the new L{ChannelTransport} from here on).
        """
        protocol.makeConnection(ChannelTransport(self._reactor, descriptor, protocol))

    def close(self) -> None:
        """
        Close the channel (the zygote then kills its children and exits).
        """
        self.transport.loseConnection()
