# -*- test-case-name: haikutx.test.test_runtime -*-
"""
A child process's main loop: it reads requests from its own channel (fd 3,
L{haikutx.child.wire}), runs each Python handler (L{PythonRun}) or hands it
to an interpreter (L{haikutx.child.stdio}), and writes the response back on
the same channel.

A process serves synchronously for as long as its handlers do: it reads
its channel with blocking reads and runs each handler as its request
arrives; a handler that answers before it returns (C{res.end} called, no
task, timer or callback left) never starts the asyncio loop, whose
descriptors (an epoll and a self-pipe) are not even made.  The first
handler that leaves something for later (a coroutine, a timer, a task, a
thread, a stdio interpreter) moves the process to its asyncio loop for good
(L{Worker.run}).  Either way, heartbeat challenges are answered by the
code that runs handler code, between handlers, so a handler that blocks
stops the answers and is caught.

The child decides nothing about its own lifecycle: it serves until the
server closes its channel, and its zygote, told by the server, kills it.

Standard library only, so that the process starts and forks fast.
"""

from __future__ import annotations

import _thread
import asyncio
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from haikutx.child import wire
from haikutx.child.lazyloop import LoopDescriptors
from haikutx.child.params import parses_body
from haikutx.child.python_run import CodeCache, PythonRun
from haikutx.child.run import HandlerFailed, HandlerRun

#: The child's end of its channel to the server.
CHANNEL = 3

#: Bytes of frames queued for the server before they are written at once.
FLUSH_SIZE = 64 * 1024

__all__ = ["CHANNEL", "CodeCache", "HandlerFailed", "HandlerRun", "PythonRun", "Worker"]

#: The json module's own scanner, without json.loads' frames and its two
#: regular expressions (their pages are a forked child's to copy).
_scan_json = json.decoder.JSONDecoder().scan_once


def _load_head(payload: bytes) -> Any:
    """
    A request head from its JSON (the server's compact form, which starts
    with its object); anything else goes through C{json.loads}, which
    raises as it would have.
    """
    text = payload.decode("utf-8")
    try:
        head, end = _scan_json(text, 0)
    except StopIteration:
        end = -1
    if end != len(text):
        return json.loads(text)
    return head


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


class Worker:
    """
    The child process's main loop.

    @ivar max_requests: requests served before the loop stops by itself; 0
        (what the zygote passes) never: the server decides, by closing the
        channel.
    """

    def __init__(
        self, max_requests: int = 0, control_in: int = CHANNEL, control_out: int | None = None
    ) -> None:
        self.max_requests = max_requests
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._unhandled)
        self._descriptors = LoopDescriptors(self.loop)
        #: The request quota is reached: serve no more.
        self._stopped = False
        self._in = control_in
        self._out = control_in if control_out is None else control_out
        self._reader = wire.FrameReader()
        self._outgoing: list[bytes] = []
        self._outgoing_size = 0
        self._flush_due = False
        #: Whether the loop is in L{_readable} (which flushes at its end).
        self._reading = False
        self._codes = CodeCache()
        self._served = 0
        self._head: dict[str, Any] | None = None
        self._body: list[bytes] = []
        #: The stdio run whose body is still arriving.
        self._streaming: Any = None
        self.current: HandlerRun | None = None
        self.server_gone = False
        #: Set by the zygote: called with C{"python"} or C{"stdio"} before
        #: the first request runs, to apply the kernel sandbox's last layer.
        self.confine: Callable[[str], None] | None = None
        self.confined_for: str | None = None
        #: Set by the zygote for stdio children: called in each
        #: interpreter's process before C{exec}.
        self.exec_sandbox: Callable[[], None] | None = None
        #: Set by the zygote for stdio children when it is safe: kills
        #: every process of this child's runs (C{kill(-1)} as the slot's
        #: own uid, its signals scoped to its Landlock domain).
        self.end_run_processes: Callable[[], None] | None = None
        self._stdout, self._stderr = sys.stdout, sys.stderr

    def send(self, frame: bytes) -> None:
        """
        Queue one frame for the server.  The frames queued are written
        together (L{flush}) once the loop's current callback is done, when
        a response ends, or when L{FLUSH_SIZE} bytes are queued: a
        response written at once goes out in one write, which the server
        takes in one read.
        """
        self._outgoing.append(frame)
        self._outgoing_size += len(frame)
        if self._outgoing_size >= FLUSH_SIZE:
            self.flush()
        elif not self._flush_due and not self._reading:
            # Written from a task, a timer or a pipe's callback.
            self._flush_due = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """
        Write the queued frames to the server (blocking: the channel is the
        back-pressure).
        """
        self._flush_due = False
        outgoing = self._outgoing
        if not outgoing:
            return
        data = outgoing[0] if len(outgoing) == 1 else b"".join(outgoing)
        outgoing.clear()
        self._outgoing_size = 0
        view = memoryview(data)
        while view:
            written = os.write(self._out, view)
            view = view[written:]

    def run(self) -> None:
        """
        Serve until the server closes the channel (or the request quota, if
        one was given, is reached): synchronously while every handler
        answers before it returns, then on the asyncio loop.
        """
        try:
            if self._serve_synchronously():
                self.loop.add_reader(self._in, self._readable)
                self.loop.run_forever()
        finally:
            sys.stdout, sys.stderr = self._stdout, self._stderr
            if not self.server_gone:
                try:
                    self.flush()
                except OSError:
                    pass

    def _serve_synchronously(self) -> bool:
        """
        Read the channel with blocking reads and handle its frames, for as
        long as nothing is left for the asyncio loop to do.  Handler code
        runs with the loop as the running loop, as it would on the loop.

        @return: whether the loop must take over; C{False} when the server
            has gone or the worker has stopped.
        """
        loop: Any = self.loop
        # Running, as far as handler code can tell (run_forever's marks).
        loop._thread_id = threading.get_ident()
        asyncio._set_running_loop(loop)
        try:
            while not self._stopped and not loop._stopping:
                try:
                    data = os.read(self._in, 1 << 16)
                except OSError:
                    data = b""
                if not data:
                    self.server_gone = True
                    return False
                try:
                    self._handle(data)
                except Exception as e:
                    # As the loop would have: to its exception handler.
                    self._unhandled(loop, {"message": "unhandled", "exception": e})
                if self._loop_has_work():
                    return not self._stopped
            return False
        finally:
            asyncio._set_running_loop(None)
            loop._thread_id = None

    def _loop_has_work(self) -> bool:
        """
        Whether the asyncio loop has something to do, or may have: a run
        not finished, a body still arriving, callbacks or timers queued,
        descriptors that something made it make, or threads.
        """
        if self.current is not None or self._streaming is not None:
            return True
        if self._descriptors.opened or _thread._count():
            # (A handler's thread may hand the loop work at any time: the
            # loop wakes for it, a blocking read would not.)
            return True
        loop: Any = self.loop
        if loop._ready:
            return True
        scheduled = loop._scheduled
        if scheduled:
            if any(not handle.cancelled() for handle in scheduled):
                return True
            # Only the cancelled timers of finished runs: drop them.
            for handle in scheduled:
                handle._scheduled = False
            scheduled.clear()
            loop._timer_cancelled_count = 0
        return False

    def _readable(self) -> None:
        try:
            data = os.read(self._in, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.server_gone = True
            self.loop.stop()
            return
        self._handle(data)

    def _handle(self, data: bytes) -> None:
        """
        Handle the frames of bytes read from the channel, then write what
        they made.
        """
        self._reading = True
        try:
            for kind, payload in self._reader.feed(data):
                self._frame(kind, payload)
        finally:
            self._reading = False
            self.flush()

    def _frame(self, kind: int, payload: bytes) -> None:
        if kind == wire.CHALLENGE:
            self.send(wire.encode(wire.ANSWER, payload))
        elif kind == wire.REQUEST:
            self._head = _load_head(payload)
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
            run = PythonRun(self, head, body)
        if self.confine is not None and self.confined_for != kind:
            if self.confined_for is not None:
                # Confined for the other kind (the server does not send
                # such a request; this is a guard).
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
        Called when C{run} has answered: restore the streams; stop at the
        request quota, if one was given.
        """
        if self.current is run:
            self.current = None
        sys.stdout, sys.stderr = self._stdout, self._stderr
        # The response is complete: it goes out now, whatever the handler
        # does next.
        self.flush()
        self._served += 1
        if self.max_requests and self._served >= self.max_requests:
            self._stopped = True
            self.loop.stop()
            return
        if run.has_tasks():
            self.loop.call_soon(run.abandon)

    def _unhandled(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if self.current is not None and error is not None:
            self.current.fail_with(error)
