# -*- test-case-name: haikutx.test.test_runner -*-
"""
An asyncio event loop's descriptors (its selector's epoll, the two ends of
its self-pipe), made when first used (L{LoopDescriptors}): a worker made
before a fork carries none of its maker's, and a process that never runs
its loop never makes them.

Standard library only: this runs in the child.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
from typing import Any


class _Unopened:
    """
    Stands for one of an event loop's descriptors (its selector, the two
    ends of its self-pipe) until something uses it: then the loop's
    descriptors are made (L{LoopDescriptors.open}) and the use goes on
    with the real object.  A process that serves only synchronous
    handlers never makes them.
    """

    __slots__ = ("_descriptors", "_name")

    def __init__(self, descriptors: LoopDescriptors, name: str) -> None:
        self._descriptors = descriptors
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        loop = self._descriptors.open()
        return getattr(getattr(loop, self._name), attribute)


class LoopDescriptors:
    """
    An event loop's descriptors, made when first needed: the loop is made
    with them, which are closed at once and replaced by L{_Unopened}
    stand-ins.  So a worker made before a fork (by the zygote, for its
    next child) carries none of its maker's descriptors, and its child
    makes its own only if it runs the loop or a handler uses it.

    @ivar opened: whether the descriptors have been made.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop: Any = loop
        self._lock = threading.Lock()
        self.opened = False
        loop = self._loop
        loop._close_self_pipe()
        loop._selector.close()
        loop._selector = _Unopened(self, "_selector")
        loop._ssock = _Unopened(self, "_ssock")
        loop._csock = _Unopened(self, "_csock")

    def open(self) -> Any:
        """
        Make the loop's selector and self-pipe (once; a handler's thread
        may get here first).

        @return: the loop.
        """
        with self._lock:
            if not self.opened:
                loop = self._loop
                loop._selector = selectors.DefaultSelector()
                loop._make_self_pipe()
                self.opened = True
        return self._loop
