# -*- test-case-name: haikutx.test.test_gate_sending -*-
"""
Writing at once: the gate's writes on plain TCP connections.

C{transport.write} on a Twisted TCP transport only queues: it asks the
reactor to watch the socket for writability (an C{epoll_ctl}), sends on the
next reactor turn, and stops watching (another C{epoll_ctl}). A kept-alive
request through the gate makes two writes (the request head to the
application, the response to the client), so that is four system calls and
two reactor events per request that do nothing but defer a C{send}.

L{write} sends at once when nothing is queued on the transport, and hands
only what the kernel did not take to C{transport.write}, so ordering,
buffering, the producer's flow control (paused once more than the
transport's buffer is queued) and the reporting of a broken connection stay
Twisted's. Only on plain TCP transports: a TLS transport's bytes must go
through its TLS layer, and any other transport is written to as usual; and
not while a pull (non-streaming) producer is registered, which Twisted asks
for more only when its queue empties.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

#: The transports L{write} may send on directly (Twisted's plain TCP ones).
PLAIN_TCP = (tcp.Server, tcp.Client)


def write(transport: Any, data: bytes) -> None:
    """
    Write C{data} on C{transport} as C{transport.write} does, sending it at
    once when C{transport} is plain TCP with nothing queued.

    @param transport: any L{ITransport<twisted.internet.interfaces.ITransport>}.
    @param data: the bytes to write.
    """
    if (
        type(transport) in PLAIN_TCP
        and not transport._tempDataLen
        and not transport.dataBuffer
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport.TLS
        and (transport.producer is None or transport.streamingProducer)
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # Full (EAGAIN) or broken: Twisted's own write finds out which,
            # and reports a broken connection as it always does.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
