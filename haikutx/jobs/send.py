# -*- test-case-name: haikutx.test.test_jobs -*-
"""
Writes sent at once: to a socket or a pipe whose buffer in the reactor is
empty, what is written goes straight to the descriptor (no wait for the
reactor's next turn, no change of what the reactor watches: two
C{epoll_ctl} less per write); anything else is written as Twisted does.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import FileDescriptor


def send_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}: straight to the socket when nothing is
    waiting to be sent before it (no wait for the reactor's next turn, no
    change of what the reactor watches), else after what is waiting.
    """
    if (
        isinstance(transport, FileDescriptor)
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


def send_pending(transport: Any) -> None:
    """
    Send what C{transport} holds now rather than at the reactor's next turn
    (what the socket does not take is sent when it is writable, as always).
    """
    if (
        isinstance(transport, FileDescriptor)
        and transport.connected
        and not transport.disconnecting
    ):
        transport.doWrite()
