"""
Tests of L{haikutx.net.dates}: the C{Date} header's value, formatted once a
second.
"""

from __future__ import annotations

import time

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import datetimeToString

from haikutx.net.dates import HTTPDate, http_date


class HTTPDateTests(SynchronousTestCase):
    """
    L{HTTPDate} gives twisted.web's HTTP date of its clock's second.
    """

    def test_formatted_once_a_second(self) -> None:
        """
        Within one second, the same value is given without formatting it
        again; the next second gives the next value.
        """
        clock = Clock()
        clock.advance(1_764_633_600.25)
        date = HTTPDate(clock.seconds)
        first = date()
        self.assertEqual(first, datetimeToString(1_764_633_600))
        clock.advance(0.7)
        self.assertIs(date(), first)
        clock.advance(0.05)
        self.assertEqual(date(), datetimeToString(1_764_633_601))

    def test_now(self) -> None:
        """
        L{http_date} is the wall clock's: what C{datetimeToString} gives now
        (or a second later, if one went by meanwhile).  Both sides read
        C{time.time()}: C{datetimeToString()} without an argument reads the
        C library's coarse clock, which may still be in the previous second
        a few milliseconds after C{time.time()} has left it.
        """
        before = datetimeToString(time.time())
        value = http_date()
        after = datetimeToString(time.time())
        self.assertIn(value, (before, after))
