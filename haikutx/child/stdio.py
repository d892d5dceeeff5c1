# -*- test-case-name: haikutx.test.test_stdio -*-
"""
Stdio handlers (SPEC §3.3): the worker runs the handler's interpreter as a
child process with the request body on its stdin, the request described in
CGI/1.1 meta-variables and C{HAIKU_PARAMS}, its stdout streamed as the
response (after an optional CGI header block) and its stderr as the console.
The CGI mapping itself is L{haikutx.child.cgi}'s.

Standard library only: this runs in the worker process.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import os
import signal
import subprocess
import sys
import weakref
from typing import TYPE_CHECKING, Any

from haikutx.child.cgi import (
    DEFAULT_CONTENT_TYPE,
    MAX_HEADER_BLOCK,
    PROXY_VARIABLES,
    STDERR_TAIL,
    blank_line,
    could_be_headers,
    parse_cgi_headers,
    request_environment,
)
from haikutx.child.params import BadRequestBody
from haikutx.child.run import HandlerRun

if TYPE_CHECKING:
    from haikutx.child.run import RunHost as Worker

#: Seconds the output of a run is still read once its interpreter has
#: exited and its processes were killed; a process that escaped the kill
#: (without the slot's own uid, say) cannot hold the response open.
DRAIN_WAIT = 0.5

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """
    In the interpreter's process before exec: die with the worker.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


#: The loop asyncio's child watcher is attached to (Python 3.11), if any.
_watched_loop: weakref.ref[asyncio.AbstractEventLoop] | None = None


def watch_interpreters(loop: asyncio.AbstractEventLoop) -> None:
    """
    Have asyncio learn of an interpreter's exit from a pidfd that C{loop}
    polls, not from Python 3.11's default child watcher, which waits in a
    thread of its own for each process.  That thread is a task of the
    run's cgroup, started only once the interpreter runs: a handler that
    forked up to C{--maxprocs} first left the worker none, and the run
    failed ("can't start new thread") with its interpreter still running.
    Python 3.12 and later watch with pidfds by default where the kernel
    has them.
    """
    global _watched_loop
    if sys.version_info >= (3, 12):
        return
    if _watched_loop is not None and _watched_loop() is loop:
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(loop)
    asyncio.set_child_watcher(watcher)
    _watched_loop = weakref.ref(loop)


class StdioRun(HandlerRun):
    """
    One request answered by an interpreter process.  Console modes, the
    response head and the body go through L{HandlerRun}'s sink.

    The run ends when the interpreter exits: whatever it left running is
    killed then (L{end_processes}), before the response ends.  The server
    keeps the worker and all its processes in a cgroup of the slot's
    (L{haikutx.sandbox.cgroup}), which bounds them together and empties it
    when the worker ends.
    """

    def __init__(
        self, worker: Worker, head: dict[str, Any], body: bytes, streaming: bool = False
    ) -> None:
        super().__init__(worker, head, body)
        self._head_data = head
        self._body_data = body
        #: Body pieces that arrived before stdin was open (streaming only).
        self._pending: list[bytes] = [body] if body else []
        self._body_complete = not streaming
        self._stdin: asyncio.StreamWriter | None = None
        self._argv: list[str] = list(head.get("argv") or [])
        self._language: str = head.get("language", "")
        self._process: asyncio.subprocess.Process | None = None
        self._stderr_tail = b""
        self._output = False

    def start(self, codes: Any) -> None:
        """
        Start the interpreter; the response streams as it writes.
        """
        proxy = {name: os.environ[name] for name in PROXY_VARIABLES if name in os.environ}
        try:
            env = request_environment(self._head_data, self._body_data, proxy)
        except BadRequestBody as e:
            self.fail(400, f"Bad request body: {e}")
            return
        self._track(self._loop.create_task(self._run(env)))

    async def _run(self, env: dict[str, str]) -> None:
        if not self._argv:
            self.fail(500, f"Handler {self.url}: no interpreter for {self._language!r}")
            return
        exited: asyncio.Future[None] = self._loop.create_future()
        watch_interpreters(self._loop)
        try:
            transport, protocol = await self._loop.subprocess_exec(
                lambda: _InterpreterProtocol(exited, self._loop),
                *self._argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd="/",
                preexec_fn=self._before_exec,
                start_new_session=True,
            )
        except (OSError, subprocess.SubprocessError) as e:
            cause = getattr(e, "strerror", None) or e
            self.fail(
                500,
                f"Handler {self.url} could not be run: the {self._language} "
                f"interpreter failed to start: {cause}",
            )
            return
        process = asyncio.subprocess.Process(transport, protocol, self._loop)
        self._process = process
        assert process.stdin and process.stdout and process.stderr
        feeding = self._loop.create_task(self._feed(process.stdin))
        reading = asyncio.gather(
            self._read_stdout(process.stdout), self._read_stderr(process.stderr)
        )
        try:
            await exited
            code = transport.get_returncode()
            # The run ends with its interpreter: what it left running
            # (in the background, in a new session, forked twice) ends too,
            # and then its output pipes reach their end.
            self.end_processes()
            try:
                await asyncio.wait_for(reading, DRAIN_WAIT)
            except TimeoutError:
                pass
        finally:
            feeding.cancel()
        self._exited(code)

    def _before_exec(self) -> None:
        """
        In the forked interpreter process, before exec: die with the worker,
        then apply the worker's C{exec_sandbox} (the interpreter's own
        seccomp filter, which lets it start processes but no namespace).
        """
        _die_with_parent()
        sandbox = getattr(self._worker, "exec_sandbox", None)
        if sandbox is not None:
            sandbox()

    def end_processes(self) -> None:
        """
        Kill every process of this run that is still running: all of them
        with the worker's C{end_run_processes} (set by the zygote when the
        worker has a uid of its slot's own and scoped signals), or else the
        interpreter's process group (which misses those that left it: the
        server's cgroup catches them when the worker ends).
        """
        ender = getattr(self._worker, "end_run_processes", None)
        if ender is not None:
            ender()
            return
        process = self._process
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass

    # Input and output

    async def _feed(self, stdin: asyncio.StreamWriter) -> None:
        pending, self._pending = self._pending, []
        self._stdin = stdin
        for data in pending:
            self.body_received(data)
        if self._body_complete:
            self.body_ended()

    def body_received(self, data: bytes) -> None:
        """
        A piece of the request body arrived: on to the interpreter's stdin
        (kept until stdin is open).
        """
        if self.done:
            return
        stdin = self._stdin
        if stdin is None:
            self._pending.append(data)
        elif not stdin.is_closing():
            try:
                stdin.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

    def body_ended(self) -> None:
        """
        The request body is complete: close the interpreter's stdin.
        """
        self._body_complete = True
        self._body_data = b""
        stdin = self._stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()

    async def _read_stderr(self, stderr: asyncio.StreamReader) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            data = await stderr.read(65536)
            if not data:
                text = decoder.decode(b"", final=True)
                if text:
                    self.console_write(text)
                return
            self._stderr_tail = (self._stderr_tail + data)[-STDERR_TAIL:]
            text = decoder.decode(data)
            if text:
                self.console_write(text)

    async def _read_stdout(self, stdout: asyncio.StreamReader) -> None:
        pending = b""
        deciding = True
        while True:
            data = await stdout.read(65536)
            if not data:
                break
            if not deciding:
                self._send(data)
                continue
            pending += data
            end = blank_line(pending)
            if end is not None:
                block, rest = pending[: end[0]], pending[end[1] :]
                deciding = False
                if not self._apply_headers(block):
                    rest = pending
                pending = b""
                if self.done:
                    return
                if rest:
                    self._send(rest)
            elif len(pending) > MAX_HEADER_BLOCK or not could_be_headers(pending):
                deciding = False
                self._send(pending)
                pending = b""
        if pending:
            self._send(pending)

    def _apply_headers(self, block: bytes) -> bool:
        try:
            parsed = parse_cgi_headers(block)
        except ValueError as e:
            self.fail(500, f"Handler {self.url} wrote a bad header block: {e}")
            return True
        if parsed is None:
            return False
        status, headers = parsed
        response = self.response
        response.status_code = status
        for name, value in headers:
            existing = response.get_header(name)
            if existing is None:
                response.set_header(name, value)
            else:
                values = existing if isinstance(existing, list) else [existing]
                response.set_header(name, values + [value])
        self._output = True
        return True

    def head(self, response: Any) -> None:
        if response.get_header("content-type") is None:
            response.set_header("Content-Type", DEFAULT_CONTENT_TYPE)
        super().head(response)

    def _send(self, data: bytes) -> None:
        if self.done or self.response.finished:
            return
        self._output = True
        self.response.write(data)

    def _exited(self, code: int) -> None:
        """
        End the response: cleanly after an exit with status 0, otherwise
        with the runtime's 500 naming the cause, which, once output has
        begun, leaves the response visibly cut off (the server closes the
        connection without ending the body).
        """
        if self.done:
            return
        if code == 0:
            self.response.end()
            return
        cause = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        message = f"Handler {self.url} {cause}"
        if not self._output and not self.response.headers_sent:
            tail = self._stderr_tail.decode("utf-8", "replace").strip()
            if tail:
                message += f": {tail}"
        elif self._output and not self.response.headers_sent:
            message += " after its output began"
        self.fail(500, message)

    def abandon(self) -> None:
        super().abandon()
        self.kill()

    def kill(self) -> None:
        """
        Kill the interpreter and every process it started.
        """
        process = self._process
        if process is not None and process.returncode is None:
            try:
                process.kill()
            except ProcessLookupError:
                pass
        self.end_processes()


class _InterpreterProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """
    asyncio's protocol of a subprocess with pipes, which also tells when the
    process itself has exited (L{asyncio.subprocess.Process.wait} waits for
    its pipes to close too, which processes it left could hold open).
    """

    def __init__(self, exited: asyncio.Future[None], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=2**16, loop=loop)
        self._exited = exited

    def process_exited(self) -> None:
        super().process_exited()
        if not self._exited.done():
            self._exited.set_result(None)
