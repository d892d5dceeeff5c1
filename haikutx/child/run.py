# -*- test-case-name: haikutx.test.test_runtime -*-
"""
One request in a child process, whatever runs it: the base of the Python
run (L{haikutx.child.python_run.PythonRun}) and the stdio run
(L{haikutx.child.stdio.StdioRun}).  It holds the request, the response and
its console, and turns them into frames for the server.

Standard library only: this runs in the child.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Protocol

from haikutx.child import wire
from haikutx.child.api import Request, Response, ResponseSink
from haikutx.child.console import CONSOLE_HEADER, ConsoleBuffer, encode_console
from haikutx.child.params import BadRequestBody


class HandlerFailed(Exception):
    """
    The runtime answers for the handler: C{status} and a plain-text message.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def one_line(error: BaseException) -> str:
    """
    An exception as one line: its type and message.
    """
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return text.replace("\r", " ").replace("\n", " ")


def _encode_head(status: Any, pairs: list[list[str]]) -> bytes:
    """
    The L{wire.HEAD} frame of a response: what C{wire.encode_json} makes of
    C{{"status": status, "headers": pairs}}, made by hand for an int status
    and string pairs (the json module's encoder, made anew for each call,
    writes pages a forked child would copy).
    """
    if type(status) is int and all(
        type(name) is str and type(value) is str for name, value in pairs
    ):
        quote = encode_basestring_ascii
        headers = ",".join([f"[{quote(name)},{quote(value)}]" for name, value in pairs])
        payload = f'{{"status":{status},"headers":[{headers}]}}'.encode("ascii")
        return wire.encode(wire.HEAD, payload)
    return wire.encode_json(wire.HEAD, {"status": status, "headers": pairs})


class RunHost(Protocol):
    """
    What a run needs of the process that hosts it
    (L{haikutx.child.runner.Worker}).
    """

    loop: asyncio.AbstractEventLoop
    exec_sandbox: Callable[[], None] | None

    def send(self, frame: bytes) -> None:
        """
        Write one frame to the server.
        """

    def run_finished(self, run: HandlerRun) -> None:
        """
        C{run} has answered.
        """


class HandlerRun(ResponseSink):
    """
    One request: its console, its response and the tasks it started.
    Subclasses say how the handler starts (L{start}).
    """

    def __init__(self, worker: RunHost, head: dict[str, Any], body: bytes) -> None:
        self._worker = worker
        self._loop = worker.loop
        self.url: str = head["handler_url"]
        self._mode: str = head.get("console", "none")
        self._debug: bool = bool(head.get("debug"))
        self.console = ConsoleBuffer(int(head.get("max_console", 4096)))
        self.request = Request(head, body)
        self.response = Response(self)
        self.done = False
        self._timers: set[Any] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, codes: Any) -> None:
        """
        Start the handler; its response streams as it is written.

        @param codes: the process's compiled handlers (Python runs use it).
        """
        raise NotImplementedError

    # Console

    def console_write(self, text: str) -> None:
        """
        Add C{text} to the console (and send it to the server's log with
        C{--debug}).
        """
        if self.done:
            return
        if self._mode != "none":
            self.console.append(text)
        if self._debug and text:
            self._worker.send(wire.encode(wire.CONSOLE, text.encode("utf-8", "replace")))

    # Tasks

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

    # Failing

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
            f"{one_line(error)}\n{trace}",
        )

    def fail(self, status: int, message: str) -> None:
        """
        Let the runtime answer with C{status} and C{message}.
        """
        if self.done:
            return
        # Within what the server takes (wire.MAX_HEAD; a character is at most
        # 12 bytes of JSON).
        message = message[: wire.MAX_HEAD // 12 - 16]
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
        self._worker.send(_encode_head(response.status_code, response.header_pairs()))

    def body(self, data: bytes) -> None:
        if self.done or self._mode == "body":
            return
        for start in range(0, len(data), wire.CHUNK):
            self._worker.send(wire.encode(wire.DATA, data[start : start + wire.CHUNK]))

    def flush(self) -> None:
        self._worker.flush()

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
        self._worker.send(
            wire.encode_json(wire.FINISH, {"trailers": trailers})
            if trailers
            else wire.FINISH_NO_TRAILERS
        )
        self._finish_run()

    def _finish_run(self) -> None:
        self.done = True
        for timer in list(self._timers):
            timer.cancel()
        self._timers.clear()
        self._worker.run_finished(self)

    def has_tasks(self) -> bool:
        """
        Whether tasks the handler started may still run (L{abandon} cancels
        them).
        """
        return bool(self._tasks)

    def abandon(self) -> None:
        """
        Cancel what the handler left running after its response ended.
        """
        for task in list(self._tasks):
            task.cancel()
