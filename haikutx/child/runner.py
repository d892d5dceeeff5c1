# -*- test-case-name: haikutx.test.test_runtime -*-
"""
The worker process: it reads requests from fd 3, runs each Python handler
on an asyncio loop and writes the response to fd 4 (L{haikutx.child.wire}).

Heartbeat challenges are answered from the same loop that runs handler
code, so a handler that blocks the loop stops the answers and is caught.

Standard library only, so that the process starts and forks fast.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import hashlib
import inspect
import linecache
import os
import sys
import traceback
from collections import OrderedDict
from typing import Any, Callable

from haikutx.child import wire
from haikutx.child.api import Console, Request, Response, ResponseSink
from haikutx.child.console import CONSOLE_HEADER, ConsoleBuffer, encode_console
from haikutx.child.params import BadRequestBody, parses_body

CONTROL_IN = 3
CONTROL_OUT = 4

_COMPILE_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


class HandlerFailed(Exception):
    """
    The runtime answers for the handler: C{status} and a plain-text message.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class CodeCache:
    """
    Compiled handlers of this process, keyed by URL and source digest, so a
    worker that serves many requests compiles each handler once.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._codes: OrderedDict[tuple[str, bytes], Any] = OrderedDict()

    def compile(self, url: str, source: bytes) -> Any:
        """
        Compile C{source} as the body of a request function named by C{url}.

        @raise HandlerFailed: (500) when it does not compile.
        """
        key = (url, hashlib.sha256(source).digest())
        code = self._codes.get(key)
        if code is None:
            try:
                code = compile(source, url, "exec", flags=_COMPILE_FLAGS, dont_inherit=True)
            except (SyntaxError, ValueError) as e:
                detail = "".join(traceback.format_exception_only(type(e), e)).rstrip()
                raise HandlerFailed(
                    500, f"Handler {url} could not be compiled: {_one_line(e)}\n{detail}"
                )
            self._codes[key] = code
            if len(self._codes) > self._size:
                self._codes.popitem(last=False)
        else:
            self._codes.move_to_end(key)
        text = source.decode("utf-8", "replace")
        linecache.cache[url] = (len(text), None, text.splitlines(True), url)
        return code


def _streams_body(head: dict[str, Any]) -> bool:
    """
    Whether a request's run starts before its body is in: a stdio handler
    gets the body on stdin as it arrives, unless the body makes params
    (C{HAIKU_PARAMS} is set before the interpreter starts).
    """
    if head.get("language", "python") == "python":
        return False
    content_type = ""
    for name, value in head.get("headers", ()):
        if name.lower() == "content-type":
            content_type = value
    return not parses_body(content_type)


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text.replace("\r", " ").replace("\n", " ")


class _ConsoleStream:
    """
    A text stream that writes to the current run's console (C{print} and
    C{sys.stdout}/C{sys.stderr} while a handler runs).
    """

    def __init__(self, write: Callable[[str], None]) -> None:
        self.write_text = write

    def write(self, text: str) -> int:
        self.write_text(str(text))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class _Interval:
    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, call: Callable[[], None]) -> None:
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


class HandlerRun(ResponseSink):
    """
    One request: the handler's globals, its console and its response.
    """

    def __init__(self, worker: "Worker", head: dict[str, Any], body: bytes) -> None:
        self._worker = worker
        self._loop = worker.loop
        self.url: str = head["handler_url"]
        self._source: bytes = head["source"].encode("utf-8", "surrogateescape")
        self._mode: str = head.get("console", "none")
        self._debug: bool = bool(head.get("debug"))
        self.console = ConsoleBuffer(int(head.get("max_console", 4096)))
        self.request = Request(head, body)
        self.response = Response(self)
        self.done = False
        self._timers: set[Any] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # Console

    def console_write(self, text: str) -> None:
        if self.done:
            return
        if self._mode != "none":
            self.console.append(text)
        if self._debug and text:
            self._worker.send(wire.encode(wire.CONSOLE, text.encode("utf-8", "replace")))

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

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.fail_with(error)

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

    def fail_with(self, error: BaseException) -> None:
        """
        Answer a handler's exception: 400 for a malformed body it did not
        catch, 500 with its traceback otherwise.
        """
        if self.done:
            return
        if isinstance(error, BadRequestBody):
            self.fail(400, f"Bad request body: {error}")
            return
        summary = traceback.TracebackException.from_exception(error)
        summary.stack = traceback.StackSummary.from_list(
            [frame for frame in summary.stack if frame.filename == self.url]
        )
        trace = "".join(summary.format()).rstrip()
        self.fail(
            500,
            f"Handler {self.url} generated an exception at runtime: "
            f"{_one_line(error)}\n{trace}",
        )

    def fail(self, status: int, message: str) -> None:
        """
        Let the runtime answer with C{status} and C{message}.
        """
        if self.done:
            return
        self._worker.send(wire.encode_json(wire.FAIL, {"status": status, "message": message}))
        self._finish_run()

    # ResponseSink

    def head(self, response: Response) -> None:
        if self._mode == "body":
            return
        if self._mode == "header":
            response.set_header(CONSOLE_HEADER, encode_console(self.console.text()))
        elif self._mode == "trailer":
            response.remove_header("content-length")
            response.set_header("Trailer", CONSOLE_HEADER)
        self._send_head(response)

    def _send_head(self, response: Response) -> None:
        self._worker.send(
            wire.encode_json(
                wire.HEAD,
                {"status": response.status_code, "headers": response.header_pairs()},
            )
        )

    def body(self, data: bytes) -> None:
        if self.done or self._mode == "body":
            return
        for start in range(0, len(data), wire.CHUNK):
            self._worker.send(wire.encode(wire.DATA, data[start : start + wire.CHUNK]))

    def end(self) -> None:
        if self.done:
            return
        trailers: list[list[str]] = []
        if self._mode == "body":
            self.response.remove_header("content-length")
            self._send_head(self.response)
            self._mode = "none"
            self.body(self.console.text().encode("utf-8"))
        elif self._mode == "trailer":
            trailers.append([CONSOLE_HEADER, encode_console(self.console.text())])
        self._worker.send(wire.encode_json(wire.FINISH, {"trailers": trailers}))
        self._finish_run()

    def _finish_run(self) -> None:
        self.done = True
        for timer in list(self._timers):
            timer.cancel()
        self._timers.clear()
        self._worker.run_finished(self)

    def abandon(self) -> None:
        """
        Cancel what the handler left running after its response ended.
        """
        for task in list(self._tasks):
            task.cancel()


class Worker:
    """
    The worker process's main loop.

    @ivar max_requests: requests served before the process exits; 0 never.
    """

    def __init__(self, max_requests: int, control_in: int = CONTROL_IN, control_out: int = CONTROL_OUT) -> None:
        self.max_requests = max_requests
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._unhandled)
        self._in = control_in
        self._out = control_out
        self._reader = wire.FrameReader()
        self._codes = CodeCache()
        self._served = 0
        self._head: dict[str, Any] | None = None
        self._body: list[bytes] = []
        #: The stdio run whose body is still arriving.
        self._streaming: Any = None
        self.current: HandlerRun | None = None
        self.server_gone = False
        #: Set by the zygote: called with C{"python"} or C{"stdio"} before
        #: the first request runs, to apply the kernel sandbox.
        self.confine: Callable[[str], None] | None = None
        self.confined_for: str | None = None
        self.exec_sandbox: Callable[[], None] | None = None
        self._stdout, self._stderr = sys.stdout, sys.stderr

    def send(self, frame: bytes) -> None:
        """
        Write one frame to the server (blocking: the pipe is the back-pressure).
        """
        view = memoryview(frame)
        while view:
            written = os.write(self._out, view)
            view = view[written:]

    def run(self) -> None:
        """
        Announce readiness and serve until the server closes fd 3 or the
        request quota is reached.
        """
        self.loop.add_reader(self._in, self._readable)
        self.send(wire.encode_json(wire.READY, {"pid": os.getpid()}))
        try:
            self.loop.run_forever()
        finally:
            sys.stdout, sys.stderr = self._stdout, self._stderr

    def _readable(self) -> None:
        try:
            data = os.read(self._in, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self.server_gone = True
            self.loop.stop()
            return
        for kind, payload in self._reader.feed(data):
            self._frame(kind, payload)

    def _frame(self, kind: int, payload: bytes) -> None:
        if kind == wire.CHALLENGE:
            self.send(wire.encode(wire.ANSWER, payload))
        elif kind == wire.RETIRE and self.current is None:
            self.loop.stop()
        elif kind == wire.REQUEST:
            import json

            self._head = json.loads(payload)
            self._body = []
            if _streams_body(self._head):
                head, self._head = self._head, None
                self._streaming = self._start(head, b"", streaming=True)
        elif kind == wire.BODY:
            if self._streaming is not None:
                self._streaming.body_received(payload)
            else:
                self._body.append(payload)
        elif kind == wire.BODY_END:
            if self._streaming is not None:
                run, self._streaming = self._streaming, None
                run.body_ended()
            elif self._head is not None:
                head, body = self._head, b"".join(self._body)
                self._head, self._body = None, []
                self._start(head, body)

    def _start(self, head: dict[str, Any], body: bytes, streaming: bool = False) -> Any:
        """
        Start the run of one request and return it.

        @param streaming: the body is still to come (a stdio run, fed as
            L{wire.BODY} frames arrive); else C{body} is all of it.
        """
        run: HandlerRun
        kind = "python" if head.get("language", "python") == "python" else "stdio"
        if kind == "stdio":
            from haikutx.child.stdio import StdioRun

            run = StdioRun(self, head, body, streaming=streaming)
        else:
            run = HandlerRun(self, head, body)
        if self.confine is not None and self.confined_for != kind:
            if self.confined_for is not None:
                # Confined for the other kind: answer, exit, and let the
                # zygote fork a fresh process for the next request.
                self.max_requests = self._served + 1
                self.current = run
                run.fail(503, f"Service unavailable: this worker process runs "
                              f"{self.confined_for} handlers; try again.")
                return run
            self.confine(kind)
            self.confined_for = kind
        self.current = run
        stream = _ConsoleStream(run.console_write)
        sys.stdout = sys.stderr = stream  # type: ignore[assignment]
        run.start(self._codes)
        return run

    def run_finished(self, run: HandlerRun) -> None:
        """
        Called when C{run} has answered: restore the streams, and exit when
        the request quota is reached.
        """
        if self.current is run:
            self.current = None
        sys.stdout, sys.stderr = self._stdout, self._stderr
        self._served += 1
        if self.max_requests and self._served >= self.max_requests:
            self.loop.stop()
            return
        self.loop.call_soon(run.abandon)

    def _unhandled(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if self.current is not None and error is not None:
            self.current.fail_with(error)


