"""
Tests for L{haikutx.processes}: TERM, then KILL after a grace period.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from haikutx.processes import terminate


class _Process:
    def __init__(self, exited: bool = False) -> None:
        self.pid = 4242
        self.signals: list[str] = []
        self.exited = exited

    def signalProcess(self, name: str) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        self.signals.append(name)


class TerminateTests(SynchronousTestCase):
    """
    L{terminate} stops a process the one way every product does.
    """

    def test_term_then_kill(self) -> None:
        """
        TERM at once; KILL after C{kill_time} when the process has not
        ended; the result fires once it has.
        """
        clock, process, ended = Clock(), _Process(), Deferred()
        done = terminate(clock, process, ended, 5.0)
        self.assertEqual(process.signals, ["TERM"])
        clock.advance(4.9)
        self.assertEqual(process.signals, ["TERM"])
        clock.advance(0.1)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.assertNoResult(done)
        ended.callback(None)
        self.assertIsNone(self.successResultOf(done))

    def test_ends_in_time(self) -> None:
        """
        A process that ends within the grace period is not killed and no
        call is left pending; C{ended}'s result passes on.
        """
        clock, process, ended = Clock(), _Process(), Deferred()
        done = terminate(clock, process, ended, 5.0)
        ended.callback("status")
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(self.successResultOf(ended), "status")
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10)
        self.assertEqual(process.signals, ["TERM"])

    def test_already_exited(self) -> None:
        """
        A process that has already exited gets no signal and no timer.
        """
        clock, process, ended = Clock(), _Process(exited=True), Deferred()
        done = terminate(clock, process, ended, 5.0)
        self.assertEqual(clock.getDelayedCalls(), [])
        ended.callback(None)
        self.successResultOf(done)
