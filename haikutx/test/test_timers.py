"""
Tests for L{haikutx.runtime.timers}: time limits that fire when their own
timers would have, with fewer timers.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from haikutx.runtime.timers import Deadline


class DeadlineTests(SynchronousTestCase):
    """
    Tests for L{Deadline}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.fired: list[float] = []
        self.deadline = Deadline(self.clock, lambda: self.fired.append(self.clock.seconds()))

    def test_fires_when_set(self) -> None:
        """
        A limit runs out C{seconds} after it was set, once.
        """
        self.deadline.set(5)
        self.assertTrue(self.deadline.pending)
        self.clock.advance(4.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [5])
        self.assertFalse(self.deadline.pending)
        self.clock.advance(10)
        self.assertEqual(self.fired, [5])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cleared_never_fires(self) -> None:
        """
        A cleared limit does not run out.
        """
        self.deadline.set(5)
        self.deadline.clear()
        self.clock.advance(10)
        self.assertEqual(self.fired, [])

    def test_set_again_later(self) -> None:
        """
        A limit set again (cleared or not in between) runs out at the time
        last set, not before; no new timer is made for it until the first
        one fires early.
        """
        self.deadline.set(5)
        self.clock.advance(1)
        self.deadline.clear()
        self.deadline.set(5)
        self.clock.advance(2)
        self.deadline.set(5)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(2)
        # The first timer fired early (at 5) and was set again for 8.
        self.assertEqual(self.fired, [])
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [8])
        self.clock.advance(3)
        self.assertEqual(self.fired, [8])

    def test_set_sooner(self) -> None:
        """
        A limit set sooner than the one before runs out at its own time.
        """
        self.deadline.set(5)
        self.deadline.set(1)
        self.clock.advance(1)
        self.assertEqual(self.fired, [1])
        self.clock.advance(10)
        self.assertEqual(self.fired, [1])

    def test_many_settings_one_timer(self) -> None:
        """
        A limit set and cleared a thousand times, in less time than it
        lasts, is served by one reactor timer.
        """
        made = []
        real = self.clock.callLater

        def counting(*args, **kwargs):
            made.append(args[0])
            return real(*args, **kwargs)

        self.clock.callLater = counting  # type: ignore[method-assign]
        for _ in range(1000):
            self.deadline.set(5)
            self.clock.advance(0.001)
            self.deadline.clear()
        self.assertEqual(len(made), 1)
        self.clock.advance(10)
        self.assertEqual((self.fired, len(made)), ([], 1))

    def test_stop(self) -> None:
        """
        Stopped, it leaves no timer and fires no more.
        """
        self.deadline.set(5)
        self.deadline.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.fired, [])

    def test_owners(self) -> None:
        """
        Made without a callback, each limit is set with its own, and
        cleared only by it: a limit cleared late by an earlier owner stays
        the later owner's; once cleared or run out, the callback is not
        kept.
        """
        deadline = Deadline(self.clock)
        calls: list[str] = []

        class Owner:
            def __init__(self, name: str) -> None:
                self.name = name

            def expired(self) -> None:
                calls.append(self.name)

        first, second = Owner("first"), Owner("second")
        deadline.set(5, first.expired)
        deadline.set(5, second.expired)
        deadline.clear(first.expired)
        self.assertTrue(deadline.pending)
        self.clock.advance(5)
        self.assertEqual(calls, ["second"])
        deadline.set(5, first.expired)
        deadline.clear(first.expired)
        self.assertIsNone(deadline._expired)
        self.clock.advance(10)
        self.assertEqual(calls, ["second"])
