# -*- test-case-name: haikutx.test.test_stdio -*-
"""
Stdio handlers (SPEC §3.3): the worker runs the handler's interpreter as a
child process with the request body on its stdin, the request described in
CGI/1.1 meta-variables and C{HAIKU_PARAMS}, its stdout streamed as the
response (after an optional CGI header block) and its stderr as the console.

Standard library only: this runs in the worker process.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import json
import os
import re
import signal
import subprocess
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from haikutx.child.params import BadRequestBody, merge_params
from haikutx.child.run import HandlerRun

if TYPE_CHECKING:
    from haikutx.child.run import RunHost as Worker

#: The environment every interpreter gets besides the request's variables.
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": "/",
    "GATEWAY_INTERFACE": "CGI/1.1",
    "SERVER_SOFTWARE": "haikutx",
}

#: Largest CGI header block read before the output is taken as all body.
MAX_HEADER_BLOCK = 16384

#: Largest environment value passed (Linux refuses a string over 128 KiB).
MAX_ENV_VALUE = 65536

#: Largest total of the C{HAIKU_PARAM_*} values.
MAX_PARAM_ENV = 262144

#: stderr bytes kept for the message of a failed run.
STDERR_TAIL = 2048

#: The variables that name the egress proxy (set in the worker by its
#: zygote) and are passed on to every stdio handler.
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY")

#: Request headers that never become C{HTTP_*} variables: C{Proxy} would
#: become C{HTTP_PROXY}, which programs take as their proxy (httpoxy).
_UNPASSED_HEADERS = ("content-type", "content-length", "proxy")

#: The content type of output without one of its own: never HTML by accident.
DEFAULT_CONTENT_TYPE = "text/plain"

#: Seconds the output of a run is still read once its interpreter has
#: exited and its processes were killed; a process that escaped the kill
#: (without the slot's own uid, say) cannot hold the response open.
DRAIN_WAIT = 0.5

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*\Z")
_CGI_NAMES = (b"status", b"content-type", b"location")
_PR_SET_PDEATHSIG = 1


def request_environment(
    head: dict[str, Any], body: bytes, proxy: dict[str, str] | None = None
) -> dict[str, str]:
    """
    The environment of a stdio handler: CGI/1.1 meta-variables, C{HTTP_*}
    for each request header (but C{Proxy}: httpoxy), C{HAIKU_PARAMS} (the
    merged params as JSON) and C{HAIKU_PARAM_<name>} for each param whose
    name is an identifier, and the egress proxy's variables.  Values are
    passed as environment values only, never as code.  Values too large
    for the environment (L{MAX_ENV_VALUE}, L{MAX_PARAM_ENV}) are left out
    and named in C{HAIKU_OMITTED}; the body is still on stdin.

    @param proxy: the proxy variables (L{PROXY_VARIABLES}) to pass on.
    @raise BadRequestBody: for a malformed body.
    """
    parts = urlsplit(head["url"])
    headers: dict[str, str] = {}
    for name, value in head["headers"]:
        key = name.lower()
        headers[key] = headers[key] + ", " + value if key in headers else value
    params = merge_params(parts.query, headers.get("content-type", ""), body)
    env = dict(BASE_ENV)
    env.update(
        {
            "REQUEST_METHOD": head["method"],
            "REQUEST_URI": head["url"],
            "SCRIPT_NAME": "",
            "PATH_INFO": parts.path,
            "QUERY_STRING": parts.query,
            "CONTENT_TYPE": headers.get("content-type", ""),
            "CONTENT_LENGTH": _content_length(head, headers, body),
            "REMOTE_ADDR": head.get("remote_addr", ""),
            "SERVER_PROTOCOL": head.get("protocol", "HTTP/1.1"),
            "SERVER_NAME": headers.get("host", "").rsplit(":", 1)[0],
            "HAIKU_HANDLER": head["handler_url"],
            "HAIKU_LANGUAGE": head.get("language", ""),
        }
    )
    omitted = []
    encoded = json.dumps(params)
    if len(encoded.encode("utf-8", "surrogatepass")) <= MAX_ENV_VALUE:
        env["HAIKU_PARAMS"] = encoded
    else:
        omitted.append("HAIKU_PARAMS")
    for name, value in headers.items():
        if name in _UNPASSED_HEADERS:
            continue
        env["HTTP_" + re.sub(r"[^A-Z0-9_]", "_", name.upper().replace("-", "_"))] = value
    env.pop("HTTP_PROXY", None)  # from no header, whatever its spelling
    for name in PROXY_VARIABLES:
        if proxy and name in proxy:
            env[name] = proxy[name]
    budget = MAX_PARAM_ENV
    for name, value in params.items():
        if _IDENTIFIER.match(name):
            text = value if isinstance(value, str) else json.dumps(value)
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > MAX_ENV_VALUE or size > budget:
                omitted.append("HAIKU_PARAM_" + name)
                continue
            budget -= size
            env["HAIKU_PARAM_" + name] = text
    if omitted:
        env["HAIKU_OMITTED"] = " ".join(omitted)
    return {k: v.replace("\0", "") for k, v in env.items()}


def _content_length(head: dict[str, Any], headers: dict[str, str], body: bytes) -> str:
    """
    C{CONTENT_LENGTH}: the body's length, which the server tells when the
    body is still arriving (else the client's C{Content-Length}; empty for a
    chunked body of unknown length: stdin ends with it).
    """
    if body:
        return str(len(body))
    if isinstance(head.get("body_length"), int):
        return str(head["body_length"])
    if "content-length" in headers:
        return headers["content-length"].strip()
    if "transfer-encoding" in headers:
        return ""
    return "0"


def parse_cgi_headers(block: bytes) -> tuple[int, list[tuple[str, str]]] | None:
    """
    Parse a CGI header block (the lines before the blank line, C{\\n} or
    C{\\r\\n} ended).

    @return: the status and the other headers, or C{None} when C{block} is
        not a header block (a line that is not C{Name: value}, or none of
        C{Status}, C{Content-Type}, C{Location}).
    @raise ValueError: for a C{Status} that is not a number from 200 to 599.
    """
    status = 200
    headers: list[tuple[str, str]] = []
    names = set()
    lines = block.split(b"\n")
    for line in lines:
        match = _HEADER_LINE.match(line.rstrip(b"\r"))
        if match is None:
            return None
        name = match.group(1).lower()
        names.add(name)
        value = match.group(2).decode("utf-8", "replace")
        if name == b"status":
            code = value.split(None, 1)[0] if value.split() else ""
            if not code.isdigit() or not 200 <= int(code) <= 599:
                raise ValueError(f"invalid CGI Status header {value!r}")
            status = int(code)
        else:
            headers.append((match.group(1).decode("latin-1"), value))
    if not names.intersection(_CGI_NAMES):
        return None
    if b"location" in names and b"status" not in names:
        status = 302
    return status, headers


def _die_with_parent() -> None:
    """
    In the interpreter's process before exec: die with the worker.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


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
            end = _blank_line(pending)
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
            elif len(pending) > MAX_HEADER_BLOCK or not _could_be_headers(pending):
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


def _blank_line(data: bytes) -> tuple[int, int] | None:
    """
    Where the first blank line is: the end of the header block and the start
    of the body.
    """
    if data.startswith(b"\r\n"):
        return 0, 2
    if data.startswith(b"\n"):
        return 0, 1
    match = re.search(rb"\r?\n\r?\n", data)
    if match is None:
        return None
    return match.start(), match.end()


def _could_be_headers(data: bytes) -> bool:
    """
    Whether the output so far may still be a header block: every complete
    line is C{Name: value}.
    """
    lines = data.split(b"\n")
    for line in lines[:-1]:
        if _HEADER_LINE.match(line.rstrip(b"\r")) is None:
            return False
    last = lines[-1]
    return not last or re.match(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*(:.*)?\Z", last) is not None
