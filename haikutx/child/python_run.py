# -*- test-case-name: haikutx.test.test_runner -*-
"""
A Python handler's run in a child process (L{PythonRun}): its globals
(C{req}, C{res}, C{console}, the timer functions), its timers and tasks;
and the process's compiled handlers (L{CodeCache}).

Standard library only (the zygote imports it).
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import inspect
import linecache
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from haikutx.child.api import Console
from haikutx.child.run import HandlerFailed, HandlerRun, RunHost, one_line

_COMPILE_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


class CodeCache:
    """
    Compiled handlers of this process, keyed by URL and source, so a
    worker that serves many requests compiles each handler once.

    The source itself is the key (dict lookups compare it whole when the
    hashes match): no digest to compute, and none of a hash module's pages
    for a freshly forked child to copy; the cache keeps each source's text
    for tracebacks anyway.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._codes: OrderedDict[tuple[str, bytes], Any] = OrderedDict()

    def compile(self, url: str, source: bytes) -> Any:
        """
        Compile C{source} as the body of a request function named by C{url}.

        @raise HandlerFailed: (500) when it does not compile.
        """
        key = (url, source)
        entry = self._codes.get(key)
        if entry is None:
            try:
                code = compile(source, url, "exec", flags=_COMPILE_FLAGS, dont_inherit=True)
            except (SyntaxError, ValueError) as e:
                detail = "".join(traceback.format_exception_only(type(e), e)).rstrip()
                raise HandlerFailed(
                    500, f"Handler {url} could not be compiled: {one_line(e)}\n{detail}"
                ) from e
            text = source.decode("utf-8", "replace")
            entry = self._codes[key] = (code, (len(text), None, text.splitlines(True), url))
            if len(self._codes) > self._size:
                self._codes.popitem(last=False)
        else:
            self._codes.move_to_end(key)
        # Its lines, for tracebacks (a handler may have changed the cache).
        linecache.cache[url] = entry[1]
        return entry[0]


class _Interval:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, seconds: float, call: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._seconds = seconds
        self._call = call
        self._handle: asyncio.TimerHandle | None = None
        self.cancelled = False
        self._arm()

    def _arm(self) -> None:
        self._handle = self._loop.call_later(self._seconds, self._fire)

    def _fire(self) -> None:
        self._arm()
        self._call()

    def cancel(self) -> None:
        self.cancelled = True
        if self._handle is not None:
            self._handle.cancel()


class PythonRun(HandlerRun):
    """
    One request answered by a Python handler run in this process: the
    handler's globals, its timers, its tasks.
    """

    def __init__(self, worker: RunHost, head: dict[str, Any], body: bytes) -> None:
        super().__init__(worker, head, body)
        self._source: bytes = head["source"].encode("utf-8", "surrogateescape")

    # Globals

    def _globals(self) -> dict[str, Any]:
        loop = self._loop

        def set_timeout(fn: Callable[..., Any], ms: float = 0, *args: Any) -> Any:
            handle = loop.call_later(max(float(ms or 0), 0) / 1000.0, self._call, fn, args)
            self._timers.add(handle)
            return handle

        def set_interval(fn: Callable[..., Any], ms: float = 0, *args: Any) -> Any:
            interval = _Interval(
                loop, max(float(ms or 0), 1) / 1000.0, lambda: self._call(fn, args)
            )
            self._timers.add(interval)
            return interval

        def clear(timer: Any) -> None:
            if timer is not None:
                timer.cancel()
                self._timers.discard(timer)

        return {
            "__name__": "__haiku__",
            "__builtins__": builtins,
            "req": self.request,
            "res": self.response,
            "console": Console(self.console_write),
            "set_timeout": set_timeout,
            "clear_timeout": clear,
            "set_interval": set_interval,
            "clear_interval": clear,
            "setTimeout": set_timeout,
            "clearTimeout": clear,
            "setInterval": set_interval,
            "clearInterval": clear,
        }

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self.done:
            return
        try:
            result = fn(*args)
            if inspect.iscoroutine(result):
                self._track(self._loop.create_task(result))
        except BaseException as e:
            self.fail_with(e)

    # Running

    def start(self, codes: CodeCache) -> None:
        """
        Compile and run the handler; its response streams as it is written.
        """
        try:
            code = codes.compile(self.url, self._source)
        except HandlerFailed as e:
            self.fail(e.status, e.message)
            return
        try:
            result = eval(code, self._globals())
        except BaseException as e:
            self.fail_with(e)
            return
        if inspect.iscoroutine(result):
            self._track(self._loop.create_task(result))
