# -*- test-case-name: haikutx.test.test_timers -*-
"""
Time limits set and given up on every request, without a reactor timer
each time.

A reactor timer (C{callLater}, then C{cancel}) costs a dozen Python calls
(the timer, its place in the reactor's heap, compared in Python, and its
removal).  The server sets several per request and almost never lets one
fire: the request's time limit, a fresh child's heartbeat, the wait for a
slot's next child.  Here one reactor timer stands for many settings of the
same limit, set and cleared again and again (L{Deadline}).  A limit still
fires at the very time it would have with its own timer; what is saved is
the timer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    """
    One time limit, set and cleared often: its callback is called when the
    limit last set runs out, unless it was cleared first.

    Its reactor timer is kept between settings, moved sooner when a limit
    comes sooner, and, when it fires early (the limit was cleared, or set
    later since), set again for what is left.

    @param clock: the reactor, for time.
    @param expired: called with no arguments when a limit runs out; or
        C{None}, for limits each set with a callback of its own (then
        cleared by it, and forgotten once cleared or run out: a limit
        given up by one owner, say a request, is not another's).
    """

    def __init__(
        self, clock: IReactorTime, expired: Callable[[], Any] | None = None
    ) -> None:
        self._clock = clock
        self._fixed = expired
        self._expired = expired
        self._due: float | None = None
        self._call: IDelayedCall | None = None
        #: When the reactor timer fires.
        self._at = 0.0

    @property
    def pending(self) -> bool:
        """
        Whether a limit is set and has not run out.
        """
        return self._due is not None

    @property
    def due(self) -> float | None:
        """
        When the limit set runs out (in the clock's seconds), if one is.
        """
        return self._due

    def set(self, seconds: float, expired: Callable[[], Any] | None = None) -> None:
        """
        Run out C{seconds} from now, instead of any limit set before.

        @param expired: this limit's callback, for a L{Deadline} made
            without one.
        """
        if expired is not None:
            self._expired = expired
        due = self._clock.seconds() + seconds
        if self._call is None:
            call = self._call = self._clock.callLater(seconds, self._fire)
        elif self._at > due:
            call = self._call
            call.reset(seconds)
        else:
            self._due = due
            return
        self._due = self._at = call.getTime()

    def clear(self, expired: Callable[[], Any] | None = None) -> None:
        """
        Give up the limit set, if any; given C{expired}, only if the limit
        is the one set with that callback.
        """
        if expired is None:
            self._due = None
        elif self._expired == expired:
            self._due = None
            self._expired = self._fixed

    def stop(self) -> None:
        """
        Give up the limit and the reactor timer (the owner is done).
        """
        self._due = None
        self._expired = self._fixed
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _fire(self) -> None:
        self._call = None
        due = self._due
        if due is None:
            return
        left = due - self._clock.seconds()
        if left > 0:
            call = self._call = self._clock.callLater(left, self._fire)
            self._due = self._at = call.getTime()
            return
        expired, self._expired = self._expired, self._fixed
        self._due = None
        if expired is not None:
            expired()
