# -*- test-case-name: haikutx.test.test_pool -*-
"""
The heartbeat of a worker slot's current child: a random challenge every
C{--keepalive-interval}, which the child must answer, word for word, within
C{--keepalive-timeout}.  The answer comes from the code that runs handler
code, between handlers, so a handler that blocks its process stops the
answers and is caught.  No challenge is sent while the server has stopped
reading the child's channel (its client is slow: the answer would wait
unread behind the response); the request's time limit still holds then.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from haikutx.child import wire
from haikutx.runtime.timers import Deadline


def _reading_paused(child: Any) -> bool:
    """
    Whether the server has stopped reading C{child}'s channel for now (its
    response's client is not reading).
    """
    return bool(getattr(child.transport, "paused", False))


class Heartbeat:
    """
    Challenge one child at a time, and say when one missed its answer.

    @param reactor: the clock.
    @param interval: seconds from an answer (or the child's start) to the
        next challenge.
    @param timeout: seconds a child has to answer.
    @param missed: called with the child and why, when it did not answer
        in time.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        interval: float,
        timeout: float,
        missed: Callable[[Any, str], None],
    ) -> None:
        self._reactor = reactor
        self._interval = interval
        self._timeout = timeout
        self._missed = missed
        self._child: Any = None
        #: The next challenge.
        self._next = Deadline(reactor, self._challenge)
        #: The wait for the answer to the last one.
        self._wait: IDelayedCall | None = None

    def schedule(self, child: Any) -> None:
        """
        Challenge C{child} (a L{haikutx.runtime.channels.ChildProtocol})
        after the interval, whatever was scheduled before.
        """
        self.stop()
        self._child = child
        self._next.set(self._interval)

    def answered(self, child: Any, payload: bytes) -> bool:
        """
        C{child} sent an C{ANSWER} frame: if it answers the challenge it was
        sent, the next is scheduled.

        @return: whether it was the right answer to a challenge sent.
        """
        if child is not self._child or child.challenge is None or payload != child.challenge:
            return False
        child.challenge = None
        self.schedule(child)
        return True

    def stop(self) -> None:
        """
        Challenge no one (until L{schedule}).
        """
        self._next.clear()
        if self._wait is not None and self._wait.active():
            self._wait.cancel()
        self._wait = None
        self._child = None

    def close(self) -> None:
        """
        Stop for good: the slot has ended.
        """
        self.stop()
        self._next.stop()

    def _challenge(self) -> None:
        child = self._child
        if child is None:
            return
        if _reading_paused(child):
            self._next.set(self._interval)
            return
        child.challenge = os.urandom(8).hex().encode("ascii")
        child.send(wire.encode(wire.CHALLENGE, child.challenge))
        self._wait = self._reactor.callLater(self._timeout, self._no_answer, child)

    def _no_answer(self, child: Any) -> None:
        self._wait = None
        if _reading_paused(child) and child is self._child:
            # Its answer may be waiting unread behind a slow client's data.
            self._wait = self._reactor.callLater(self._timeout, self._no_answer, child)
            return
        self._missed(
            child, f"did not answer a heartbeat within {self._timeout * 1000:.0f} ms"
        )
