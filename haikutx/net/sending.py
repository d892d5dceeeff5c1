# -*- test-case-name: haikutx.test.test_sending -*-
"""
Writing at once: the one rule every product writes by when it wants its
bytes out now (the gate's kept-alive exchanges, the runtime's responses,
the job API's answers and the job launcher's orders).

C{transport.write} on a Twisted descriptor (a TCP connection, a process's
pipe) only queues: it asks the reactor to watch the descriptor for
writability (an C{epoll_ctl}), sends on the next reactor turn, and stops
watching (another C{epoll_ctl}): two system calls and a reactor event per
write that do nothing but defer a C{send}.

L{write} sends at once when nothing is queued on the transport, and hands
only what the kernel did not take to C{transport.write}, so ordering,
buffering, the producer's flow control (paused once more than the
transport's buffer is queued) and the reporting of a broken connection stay
Twisted's.  Only on Twisted's own descriptors, and not on one that started
TLS (its bytes must go through its TLS layer; a TLS endpoint's transport is
not a descriptor at all, and is written to as usual), nor while a pull
(non-streaming) producer is registered, which Twisted asks for more only
when its queue empties.  L{send_pending} sends what a transport holds now
rather than at the reactor's next turn.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import FileDescriptor


def write(transport: Any, data: bytes) -> None:
    """
    Write C{data} on C{transport} as C{transport.write} does, sending it at
    once when C{transport} is a plain descriptor with nothing queued.

    @param transport: any L{ITransport<twisted.internet.interfaces.ITransport>}.
    @param data: the bytes to write.
    """
    if (
        isinstance(transport, FileDescriptor)
        and not transport._tempDataLen
        and not transport.dataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not getattr(transport, "TLS", False)
        and (transport.producer is None or transport.streamingProducer)
    ):
        # An int (what the kernel took: 0 when full), or, for a broken
        # connection, an error that Twisted's own write finds again and
        # reports as it always does.
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


def send_pending(transport: Any) -> None:
    """
    Send what C{transport} holds now rather than at the reactor's next turn:
    the client has its answer before the server does its bookkeeping.  What
    the descriptor does not take is sent when it is writable, as always; an
    error is the reactor's to handle then (the data stays, and the
    descriptor is still watched).  A TLS connection is one too: its
    ciphertext is in the same buffer.
    """
    if (
        isinstance(transport, FileDescriptor)
        and transport.connected
        and not transport.disconnecting
    ):
        transport.doWrite()
