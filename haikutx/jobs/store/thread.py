# -*- test-case-name: haikutx.test.test_jobstore -*-
"""
One thread that owns a database connection: what a store hands it runs
there, in order, with its result given back in the reactor's thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure

#: What the thread is told to stop with.
_STOP = None


class DatabaseThread:
    """
    A thread pool of exactly one thread, as L{deferToThreadPool} uses it
    (C{start}, C{stop}, C{started}, C{callInThreadWithCallback}), without
    the general pool's bookkeeping per call: a store's every operation is one
    C{SimpleQueue.put} on the reactor's side and one call in the thread.

    @ivar started: whether L{start} was called and L{stop} was not.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.started = False

    def start(self) -> None:
        """
        Start the thread.
        """
        if self.started:
            return
        self.started = True
        self._thread = threading.Thread(target=self._work, name=self._name, daemon=False)
        self._thread.start()

    def stop(self) -> None:
        """
        Let the thread finish what it was given, then end it, and wait for
        it to end.
        """
        if not self.started:
            return
        self.started = False
        self._queue.put(_STOP)
        assert self._thread is not None
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any
    ) -> None:
        """
        Run C{f(*args)} in the thread, then C{on_result(True, result)} or
        C{on_result(False, failure)} there too.
        """
        self._queue.put((on_result, f, args))

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                return
            on_result, f, args = item
            item = None
            try:
                result = f(*args)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)
            # Nothing of this call is kept alive while the thread waits.
            on_result = f = args = result = None
