# -*- test-case-name: haikutx.test.test_gate -*-
"""
The gate: PicoLisp httpGate's front door as a Twisted service.

C{GET /<port>/<rest>} is forwarded to C{127.0.0.1:<port>/<rest>} and
C{/<name>/<rest>} to the port of a names-file application, started on demand.

Forwarding is done by L{GateProtocol}, an HTTP/1.1 forwarder that parses each
request head itself (so every request of a kept-alive connection is routed by
its own path) and passes bodies through as bytes, framed by their
C{Content-Length} or chunked encoding, with two-way flow control: the side
that reads is paused while the side that writes has more than one transport
buffer queued. Nothing holds a whole body. After a C{101} response the
connection becomes a raw tunnel (WebSocket).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

from attrs import define, field, frozen
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from haikutx.gate.names import NamesEntry, NamesFile, NamesFileError

#: Largest request head accepted, in bytes (larger: 431).
MAX_HEAD = 16384
#: Largest response head accepted from an application, in bytes.
MAX_RESPONSE_HEAD = 65536
#: Client bytes buffered while a request waits for its response (pipelining)
#: before reading from the client pauses.
MAX_PENDING = 65536
#: The address applications are reached at.
BACKEND_HOST = "127.0.0.1"
#: Seconds between two probes of a starting application's port.
PROBE_INTERVAL = 0.1

_HOP_BY_HOP = frozenset(
    [b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade",
     b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"]
)
_RESPONSE_HOP = frozenset([b"connection", b"keep-alive", b"proxy-connection"])
_REASONS = {
    301: "Moved Permanently",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class BadMessage(ValueError):
    """
    A message head or body framing is malformed.
    """


# --- framing -----------------------------------------------------------------


class _Framer:
    """
    Finds where one message body ends in a stream of bytes, without
    buffering the body: C{consume} says how many bytes of a chunk belong to
    the body.

    @ivar done: the body is complete.
    """

    __slots__ = ("mode", "remaining", "done", "_state", "_line")

    def __init__(self, mode: str, length: int = 0) -> None:
        self.mode = mode  # "none", "length", "chunked", "close"
        self.remaining = length
        self.done = mode == "none" or (mode == "length" and length == 0)
        self._state = "size"
        self._line = b""

    def consume(self, data: bytes | bytearray, start: int = 0) -> int:
        """
        Account for C{data[start:]}.

        @return: the index in C{data} just past the last byte of the body.
        @raise BadMessage: for a malformed chunked encoding.
        """
        if self.done:
            return start
        if self.mode == "close":
            return len(data)
        if self.mode == "length":
            take = min(self.remaining, len(data) - start)
            self.remaining -= take
            if not self.remaining:
                self.done = True
            return start + take
        return self._chunked(data, start)

    def _chunked(self, data: bytes | bytearray, i: int) -> int:
        n = len(data)
        while i < n and not self.done:
            if self._state == "data":
                take = min(self.remaining, n - i)
                i += take
                self.remaining -= take
                if not self.remaining:
                    self._state = "crlf"
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._line += bytes(data[i:])
                if len(self._line) > 4096:
                    raise BadMessage("chunk line too long")
                return n
            line = (self._line + bytes(data[i:j])).rstrip(b"\r")
            self._line = b""
            i = j + 1
            if self._state == "size":
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise BadMessage(f"bad chunk size {line[:40]!r}")
                if size < 0:
                    raise BadMessage("negative chunk size")
                if size:
                    self.remaining, self._state = size, "data"
                else:
                    self._state = "trailer"
            elif self._state == "crlf":
                if line:
                    raise BadMessage("chunk data longer than its size")
                self._state = "size"
            elif not line:  # trailer
                self.done = True
        return i


def _parse_head(head: bytes) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """
    Split a message head into its first line's parts and its header fields.

    @raise BadMessage: for a malformed head.
    """
    lines = head.split(b"\r\n")
    first = lines[0].split(b" ", 2)
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise BadMessage(f"bad header line {line[:40]!r}")
        headers.append((name.lower(), value.strip()))
    return first, headers


def _body_framer(headers: list[tuple[bytes, bytes]], default: str) -> _Framer:
    length = None
    chunked = False
    for name, value in headers:
        if name == b"transfer-encoding":
            if value.lower() != b"chunked":
                raise BadMessage(f"unsupported transfer-encoding {value[:40]!r}")
            chunked = True
        elif name == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise BadMessage(f"bad content-length {value[:40]!r}")
            length = int(value)
    if chunked:
        if length is not None:
            raise BadMessage("both content-length and chunked")
        return _Framer("chunked")
    if length is not None:
        return _Framer("length", length)
    return _Framer(default)


def _tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> set[bytes]:
    found: set[bytes] = set()
    for n, value in headers:
        if n == name:
            found.update(t.strip().lower() for t in value.split(b","))
    return found


# --- routing -----------------------------------------------------------------


@frozen
class Route:
    """
    Where one request goes.

    @ivar port: the local port to forward to (0: no forwarding).
    @ivar target: the request target sent to the application.
    @ivar app: the names-file entry, if the request named one.
    @ivar status: for a request the gate answers itself, its status.
    @ivar message: the body of that answer.
    @ivar location: for a redirect, the URL.
    """

    port: int = 0
    target: bytes = b"/"
    app: NamesEntry | None = None
    status: int = 0
    message: str = ""
    location: str | None = None


def route(target: bytes, names: NamesFile, single_port: int | None = None) -> Route:
    """
    Route one request target (httpGate's rules).

    @param target: the origin-form request target, C{/first/rest?query}.
    @param names: the names file in force.
    @param single_port: C{--gate-target}: forward everything here, unchanged.
    @return: the route.
    """
    if not target.startswith(b"/"):
        return Route(status=400, message="only origin-form request targets")
    if single_port is not None:
        return Route(port=single_port, target=target)
    path, qmark, query = target.partition(b"?")
    first, slash, rest = path[1:].partition(b"/")
    forwarded = b"/" + rest + qmark + query
    if first.isdigit():
        port = int(first)
        if not 1024 <= port <= 65535:
            return Route(status=403, message=f"port {port} is not in 1024-65535")
        return Route(port=port, target=forwarded)
    entry = names.get(first.decode("utf-8", "replace")) if first else None
    if entry is None:
        entry = names.default
        forwarded = target
        if entry is None:
            return Route(status=404, message="no such port or application")
    if entry.redirect is not None:
        return Route(status=301, app=entry, location=entry.redirect,
                     message="moved")
    return Route(port=entry.port, target=forwarded, app=entry)


# --- applications ------------------------------------------------------------


class _AppProcess(ProcessProtocol):
    """
    The process of one started application: reports its end, and logs its
    output line by line when it has no log file.
    """

    log = Logger()

    def __init__(self, app: "Application") -> None:
        self._app = app
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            self.log.info(
                "{app}: {line}", app=self._app.entry.name, port=self._app.entry.port,
                line=line.decode("utf-8", "replace"), stream="stdout" if fd == 1 else "stderr",
            )

    def processEnded(self, reason: Failure) -> None:
        self._app._ended(self, reason)


@define
class Application:
    """
    An application of the names file the gate may start, stop and
    supervise.

    @ivar entry: its names-file entry (replaced on reload).
    @ivar reactor: provides time, process spawning and TCP.
    @ivar retire: seconds of idleness after which it is stopped (C{None}:
        never).
    @ivar start_timeout: seconds to wait for its port to accept.
    @ivar kill_time: seconds between TERM and KILL when stopping it.
    """

    log = Logger()

    entry: NamesEntry
    reactor: Any
    retire: float | None = None
    start_timeout: float = 30.0
    kill_time: float = 5.0
    active: int = 0
    process: Any = None
    _protocol: _AppProcess | None = None
    _waiters: list[Deferred] | None = None
    _ended_waiters: list[Deferred] = field(factory=list)
    _retire_call: Any = None
    _kill_call: Any = None
    _stopping: bool = False

    @property
    def running(self) -> bool:
        """
        Whether a process the gate started is alive.
        """
        return self._protocol is not None

    def start_and_wait(self) -> Deferred:
        """
        Start the application unless it is already starting or running, and
        wait until its port accepts. Concurrent callers share one start.

        @return: a Deferred firing with C{None} once the port accepts, or
            failing when it does not within C{start_timeout}.
        """
        d: Deferred = Deferred()
        if self._waiters is not None:
            self._waiters.append(d)
            return d
        self._waiters = [d]
        try:
            if not self.running:
                self._spawn()
        except Exception as e:
            self.log.error("{app}: cannot start: {reason}", app=self.entry.name,
                           port=self.entry.port, reason=str(e))
            self._fire(Failure(e))
            return d
        Deferred.fromCoroutine(self._poll()).addErrback(self._fire)
        return d

    def _spawn(self) -> None:
        entry = self.entry
        argv = list(entry.command)
        directory = entry.dir or None
        executable = argv[0]
        if "/" not in executable:
            found = shutil.which(executable)
            if found is None:
                raise FileNotFoundError(f"command {executable!r} not found")
            executable = found
        elif directory and not os.path.isabs(executable):
            executable = os.path.join(directory, executable)
        uid = gid = None
        env = dict(os.environ)
        if entry.user:
            record = pwd.getpwnam(entry.user)
            if record.pw_uid != os.geteuid():
                uid, gid = record.pw_uid, record.pw_gid
            env.update(HOME=record.pw_dir, USER=entry.user, LOGNAME=entry.user)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        logfd = None
        if entry.log:
            logpath = entry.log
            if directory and not os.path.isabs(logpath):
                logpath = os.path.join(directory, logpath)
            logfd = os.open(logpath, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            if uid is not None:
                os.fchown(logfd, uid, gid)
            child_fds.update({1: logfd, 2: logfd})
        protocol = _AppProcess(self)
        try:
            self.process = self.reactor.spawnProcess(
                protocol, executable, argv, env=env, path=directory,
                uid=uid, gid=gid, childFDs=child_fds,
            )
        finally:
            if logfd is not None:
                os.close(logfd)
        self._protocol = protocol
        self._stopping = False
        self.log.info(
            "{app}: started pid {pid} on port {port}", app=entry.name, port=entry.port,
            pid=self.process.pid, command=" ".join(argv),
        )

    async def _poll(self) -> None:
        deadline = self.reactor.seconds() + self.start_timeout
        endpoint = TCP4ClientEndpoint(self.reactor, BACKEND_HOST, self.entry.port,
                                      timeout=5)
        while True:
            try:
                probe_factory = Factory.forProtocol(Protocol)
                probe_factory.noisy = False
                probe = await endpoint.connect(probe_factory)
            except (ierror.ConnectError, ierror.ConnectionRefusedError):
                pass
            else:
                probe.transport.abortConnection()
                self._fire(None)
                return
            if self._waiters is None:
                return
            if not self.running:
                raise ierror.ConnectError(string="application exited while starting")
            if self.reactor.seconds() >= deadline:
                raise ierror.ConnectError(
                    string=f"port {self.entry.port} did not accept within "
                    f"{self.start_timeout}s"
                )
            d: Deferred = Deferred()
            self.reactor.callLater(PROBE_INTERVAL, d.callback, None)
            await d

    def _fire(self, result: Any) -> None:
        waiters, self._waiters = self._waiters or [], None
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def request_started(self) -> None:
        """
        Note a request forwarded to this application.
        """
        self.active += 1
        if self._retire_call is not None and self._retire_call.active():
            self._retire_call.cancel()
        self._retire_call = None

    def request_finished(self) -> None:
        """
        Note the end of a forwarded request; arms the retirement timer when
        the application is idle.
        """
        self.active = max(0, self.active - 1)
        self._arm_retire()

    def _arm_retire(self) -> None:
        if self.retire is None or self.active or not self.running:
            return
        if self._retire_call is not None and self._retire_call.active():
            self._retire_call.reset(self.retire)
        else:
            self._retire_call = self.reactor.callLater(self.retire, self._retired)

    def _retired(self) -> None:
        self._retire_call = None
        if self.active or not self.running:
            return
        self.log.info("{app}: idle for {idle}s, retiring", app=self.entry.name,
                      port=self.entry.port, idle=self.retire)
        self.stop()

    def stop(self) -> Deferred:
        """
        Stop the process the gate started: TERM, then KILL after
        C{kill_time}.

        @return: a Deferred firing once it has ended.
        """
        if self._retire_call is not None and self._retire_call.active():
            self._retire_call.cancel()
        self._retire_call = None
        if not self.running:
            return succeed(None)
        d: Deferred = Deferred()
        self._ended_waiters.append(d)
        if not self._stopping:
            self._stopping = True
            try:
                self.process.signalProcess("TERM")
            except ierror.ProcessExitedAlready:
                pass
            self._kill_call = self.reactor.callLater(self.kill_time, self._kill)
        return d

    def _kill(self) -> None:
        self._kill_call = None
        try:
            self.process.signalProcess("KILL")
        except ierror.ProcessExitedAlready:
            pass

    def _ended(self, protocol: _AppProcess, reason: Failure) -> None:
        if protocol is not self._protocol:
            return
        self._protocol = None
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        if self._retire_call is not None and self._retire_call.active():
            self._retire_call.cancel()
        self._retire_call = None
        status = getattr(reason.value, "exitCode", None)
        if self._stopping:
            self.log.info("{app}: stopped", app=self.entry.name, port=self.entry.port,
                          reason=str(reason.value))
        else:
            self.log.error(
                "{app}: exited unexpectedly ({reason}); the next request starts it again",
                app=self.entry.name, port=self.entry.port, reason=str(reason.value),
                status=status,
            )
        self._stopping = False
        waiters, self._ended_waiters = self._ended_waiters, []
        for d in waiters:
            d.callback(None)


# --- the forwarding protocol -------------------------------------------------


@implementer(IPushProducer)
class _Valve:
    """
    Pauses a transport's reading while any reason to pause holds.
    """

    __slots__ = ("transport", "reasons", "on_stop")

    def __init__(self, transport: Any, on_stop: Callable[[], None] | None = None) -> None:
        self.transport = transport
        self.reasons: set[str] = set()
        self.on_stop = on_stop

    def pause(self, reason: str) -> None:
        if not self.reasons:
            self.transport.pauseProducing()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.transport.resumeProducing()

    def pauseProducing(self) -> None:
        self.pause("consumer")

    def resumeProducing(self) -> None:
        self.resume("consumer")

    def stopProducing(self) -> None:
        if self.on_stop is not None:
            self.on_stop()


class BackendProtocol(Protocol):
    """
    One connection from the gate to an application; reads its responses
    and hands them to the L{GateProtocol}.
    """

    def __init__(self, gate: "GateProtocol", port: int) -> None:
        self.gate = gate
        self.port = port
        self.valve: _Valve | None = None
        self.connected_ = False
        self.reusable = True
        self.closed: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.connected_ = True
        self.valve = _Valve(self.transport, self.transport.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        self.gate.backend_data(self, data)

    def connectionLost(self, reason: Failure = None) -> None:
        self.connected_ = False
        self.gate.backend_lost(self)
        self.closed.callback(None)


class GateProtocol(Protocol):
    """
    One client connection of the gate: parses each request head, routes it,
    and streams its body and its response between client and application.
    """

    log = Logger()

    # states
    _HEAD, _ROUTING, _BODY, _WAIT, _TUNNEL, _CLOSED = range(6)

    def __init__(self, factory: "GateFactory") -> None:
        self.factory = factory
        self._reactor = factory.reactor
        self._buffer = bytearray()
        self._state = self._HEAD
        self._backend: BackendProtocol | None = None
        self._idle_backend: BackendProtocol | None = None
        self._request_framer: _Framer | None = None
        self._response_framer: _Framer | None = None
        self._response_head = True
        self._response_buffer = bytearray()
        self._rechunk = False
        self._keep_alive = True
        self._method = b""
        self._http10 = False
        self._upgrade = False
        self._app: Application | None = None
        self._last_activity = 0.0
        self._idle_call: Any = None
        self.valve: _Valve | None = None
        #: Largest number of bytes this connection held at once (tests).
        self.max_buffered = 0
        #: Fires when the client connection is gone.
        self.closed: Deferred = Deferred()

    # connection

    def connectionMade(self) -> None:
        self.valve = _Valve(self.transport)
        self._https = ISSLTransport.providedBy(self.transport)
        peer = self.transport.getPeer()
        self._peer = getattr(peer, "host", "").encode("ascii", "replace")
        self._last_activity = self._reactor.seconds()
        self._idle_call = self._reactor.callLater(self.factory.idle, self._idle_check)
        self.factory.connections.add(self)

    def _idle_check(self) -> None:
        now = self._reactor.seconds()
        left = self._last_activity + self.factory.idle - now
        if left > 0:
            self._idle_call = self._reactor.callLater(left, self._idle_check)
            return
        self._idle_call = None
        self.log.info("connection from {peer} idle for {idle}s, closed",
                      peer=self._peer.decode(), idle=self.factory.idle)
        self.transport.loseConnection()
        if self._backend is not None and self._backend.transport:
            self._backend.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        self._state = self._CLOSED
        self.factory.connections.discard(self)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        for backend in (self._backend, self._idle_backend):
            if backend is not None and backend.transport is not None:
                backend.transport.loseConnection()
        self._finish_app()
        self.closed.callback(None)

    def all_closed(self) -> list[Deferred]:
        """
        Deferreds that fire once this connection and its application
        connections are gone.
        """
        found = [self.closed]
        for backend in (self._backend, self._idle_backend):
            if backend is not None and backend.connected_:
                found.append(backend.closed)
        return found

    # client side

    def dataReceived(self, data: bytes) -> None:
        self._last_activity = self._reactor.seconds()
        if self._state == self._TUNNEL:
            self._backend.transport.write(data)
            return
        self._buffer += data
        if len(self._buffer) > self.max_buffered:
            self.max_buffered = len(self._buffer)
        self._process()

    def _process(self) -> None:
        while self._buffer and self._state != self._CLOSED:
            state = self._state
            if state == self._HEAD:
                if not self._read_head():
                    return
            elif state == self._BODY:
                self._forward_body()
                if self._state == self._BODY:
                    return
            elif state == self._TUNNEL:
                data, self._buffer = bytes(self._buffer), bytearray()
                self._backend.transport.write(data)
            else:  # routing or waiting: keep what came (pipelining), bounded
                if len(self._buffer) > MAX_PENDING:
                    self.valve.pause("pending")
                return

    def _read_head(self) -> bool:
        buffer = self._buffer
        while buffer[:2] == b"\r\n":
            del buffer[:2]
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._refuse(431, "request head larger than %d bytes" % MAX_HEAD)
            return False
        if end > MAX_HEAD:
            self._refuse(431, "request head larger than %d bytes" % MAX_HEAD)
            return False
        head = bytes(buffer[:end])
        del buffer[: end + 4]
        try:
            first, headers = _parse_head(head)
            if len(first) != 3 or not first[2].startswith(b"HTTP/1."):
                raise BadMessage("bad request line")
            method, target, version = first
            framer = _body_framer(headers, "none")
        except BadMessage as e:
            self._refuse(400, str(e))
            return False
        self._method = method
        self._http10 = version == b"HTTP/1.0"
        connection = _tokens(headers, b"connection")
        if version == b"HTTP/1.0":
            self._keep_alive = b"keep-alive" in connection
        else:
            self._keep_alive = b"close" not in connection
        if method.decode("ascii", "replace") not in self.factory.methods:
            self._refuse(
                405, f"method {method.decode('ascii', 'replace')} is not forwarded",
                [(b"Allow", ", ".join(self.factory.methods).encode())],
            )
            return False
        where = route(target, self.factory.gate.names, self.factory.gate.target)
        if where.status:
            if where.status >= 400:
                self.log.warn("{method} {target} refused: {status} {reason}",
                              method=method.decode("ascii", "replace"),
                              target=target.decode("ascii", "replace"),
                              status=where.status, reason=where.message)
            extra = [(b"Location", where.location.encode())] if where.location else []
            self._refuse(where.status, where.message, extra)
            return False
        self._upgrade = b"upgrade" in connection and any(
            n == b"upgrade" for n, _ in headers
        )
        self._request_framer = framer
        out = [method, b" ", where.target, b" HTTP/1.1\r\n"]
        host = None
        for name, value in headers:
            if name in _HOP_BY_HOP:
                continue
            if name == b"host":
                host = value
            out += [name, b": ", value, b"\r\n"]
        if host is None:
            out.append(b"host: localhost:%d\r\n" % where.port)
        if self._upgrade:
            out.append(b"connection: upgrade\r\n")
            for name, value in headers:
                if name == b"upgrade":
                    out += [b"upgrade: ", value, b"\r\n"]
        out += [
            b"x-forwarded-for: ", self._peer, b"\r\n",
            b"x-forwarded-proto: ", b"https" if self._https else b"http", b"\r\n",
        ]
        if host is not None:
            out += [b"x-forwarded-host: ", host, b"\r\n"]
        out.append(b"\r\n")
        self._state = self._ROUTING
        self._response_head = True
        self._response_buffer = bytearray()
        backend = self._idle_backend
        self._idle_backend = None
        if backend is not None and backend.port == where.port and backend.connected_:
            self._start_request(backend, where, b"".join(out))
        else:
            if backend is not None:
                backend.transport.loseConnection()
            self.valve.pause("routing")
            Deferred.fromCoroutine(self._connect(where, b"".join(out))).addErrback(
                self._connect_failed, where
            )
        return True

    async def _connect(self, where: Route, head: bytes) -> None:
        endpoint = TCP4ClientEndpoint(self._reactor, BACKEND_HOST, where.port, timeout=10)
        factory = Factory.forProtocol(lambda: BackendProtocol(self, where.port))
        factory.noisy = False
        app = self.factory.gate.application(where.app) if where.app else None
        try:
            backend = await endpoint.connect(factory)
        except (ierror.ConnectError, ierror.ConnectionRefusedError):
            if app is None or not where.app.command:
                raise
            await app.start_and_wait()
            backend = await endpoint.connect(factory)
        if self._state == self._CLOSED:
            backend.transport.loseConnection()
            return
        self.valve.resume("routing")
        self._start_request(backend, where, head)
        self._process()

    def _connect_failed(self, failure: Failure, where: Route) -> None:
        if self._state == self._CLOSED:
            return
        self.valve.resume("routing")
        reason = failure.getErrorMessage()
        app = where.app.name if where.app else None
        self.log.error("{app} port {port} unreachable: {reason}", app=app,
                       port=where.port, reason=reason)
        if where.app is not None and where.app.dir:
            void = Path(where.app.dir) / "void"
            try:
                with void.open("rb") as f:
                    body = f.read(1 << 20)
            except OSError:
                pass
            else:
                self._respond(503, body, b"text/html")
                return
        self._refuse(502, f"port {where.port} is unreachable")

    def _start_request(self, backend: BackendProtocol, where: Route, head: bytes) -> None:
        previous = self._backend
        if previous is not backend:
            if previous is not None:
                self.transport.unregisterProducer()
            self.valve.resume("consumer")
            self.transport.registerProducer(backend.valve, True)
            backend.transport.registerProducer(self.valve, True)
        self._backend = backend
        if where.app is not None:
            self._app = self.factory.gate.application(where.app)
            self._app.request_started()
        backend.transport.write(head)
        self._state = self._WAIT if self._request_framer.done else self._BODY

    def _forward_body(self) -> None:
        buffer = self._buffer
        try:
            end = self._request_framer.consume(buffer)
        except BadMessage as e:
            self.log.warn("bad request body: {reason}", reason=str(e))
            self.transport.abortConnection()
            return
        if end:
            if end == len(buffer):
                chunk, self._buffer = bytes(buffer), bytearray()
            else:
                chunk = bytes(buffer[:end])
                del buffer[:end]
            self._backend.transport.write(chunk)
        if self._request_framer.done:
            self._state = self._WAIT

    # application side

    def backend_data(self, backend: BackendProtocol, data: bytes) -> None:
        """
        Bytes from an application: a response head, body, or tunnel data.
        """
        self._last_activity = self._reactor.seconds()
        if backend is not self._backend or self._state == self._CLOSED:
            backend.transport.loseConnection()
            return
        if self._state == self._TUNNEL:
            self.transport.write(data)
            return
        if self._response_head:
            self._response_buffer += data
            if not self._read_response_head():
                return
            data, self._response_buffer = bytes(self._response_buffer), bytearray()
            if self._state == self._TUNNEL:
                if data:
                    self.transport.write(data)
                self._process()
                return
            if not data:
                if self._response_framer.done:
                    self._response_done()
                return
        framer = self._response_framer
        end = framer.consume(data)
        if end:
            body = data if end == len(data) else data[:end]
            if self._rechunk:
                self.transport.write(b"%x\r\n%s\r\n" % (len(body), body))
            else:
                self.transport.write(body)
        if framer.done:
            if end < len(data):
                backend.reusable = False
            self._response_done()

    def _read_response_head(self) -> bool:
        while True:
            buffer = self._response_buffer
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_RESPONSE_HEAD:
                    self._backend_failed("response head too large")
                return False
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            try:
                first, headers = _parse_head(head)
                if len(first) < 2 or not first[0].startswith(b"HTTP/1."):
                    raise BadMessage("bad status line")
                status = int(first[1])
            except (BadMessage, ValueError) as e:
                self._backend_failed(f"bad response: {e}")
                return False
            reason = first[2] if len(first) > 2 else b""
            if status == 101 and self._upgrade:
                self.transport.write(head + b"\r\n\r\n")
                self._state = self._TUNNEL
                return True
            if 100 <= status < 200:
                self.transport.write(head + b"\r\n\r\n")
                continue
            break
        connection = _tokens(headers, b"connection")
        backend = self._backend
        if first[0] == b"HTTP/1.0":
            backend.reusable = b"keep-alive" in connection
        elif b"close" in connection:
            backend.reusable = False
        try:
            if self._method == b"HEAD" or status in (204, 304):
                framer = _Framer("none")
            else:
                framer = _body_framer(headers, "close")
        except BadMessage as e:
            self._backend_failed(f"bad response: {e}")
            return False
        self._response_framer = framer
        self._rechunk = False
        out = [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
        for name, value in headers:
            if name not in _RESPONSE_HOP:
                out += [name, b": ", value, b"\r\n"]
        if framer.mode == "close":
            backend.reusable = False
            if self._keep_alive:
                self._rechunk = True
                out.append(b"transfer-encoding: chunked\r\n")
        if not self._keep_alive:
            out.append(b"connection: close\r\n")
        elif self._http10:
            out.append(b"connection: keep-alive\r\n")
        out.append(b"\r\n")
        self.transport.write(b"".join(out))
        self._response_head = False
        return True

    def _response_done(self) -> None:
        backend = self._backend
        self._finish_app()
        if self._state in (self._BODY, self._ROUTING):
            # The application answered before reading the whole request.
            self._keep_alive = False
        if not self._keep_alive:
            self._state = self._CLOSED
            self.transport.loseConnection()
            return
        self._state = self._HEAD
        self._response_head = True
        if backend is not None and backend.reusable and backend.connected_:
            self._idle_backend = backend
        elif backend is not None:
            backend.transport.loseConnection()
        self.valve.resume("pending")
        if self._buffer:
            self._process()

    def _finish_app(self) -> None:
        if self._app is not None:
            app, self._app = self._app, None
            app.request_finished()

    def backend_lost(self, backend: BackendProtocol) -> None:
        """
        An application connection closed.
        """
        if backend is self._idle_backend:
            self._idle_backend = None
        if backend is not self._backend:
            return
        self.valve.resume("consumer")
        if self._state == self._CLOSED:
            return
        self._backend = None
        self.transport.unregisterProducer()
        if self._state == self._TUNNEL:
            self.transport.loseConnection()
        elif self._state in (self._BODY, self._WAIT):
            if self._response_head:
                self._backend_failed("closed before answering")
            elif self._response_framer.mode == "close":
                if self._rechunk:
                    self.transport.write(b"0\r\n\r\n")
                self._response_done()
            else:
                self._finish_app()
                self.transport.loseConnection()

    def _backend_failed(self, reason: str) -> None:
        self.log.error("port {port}: {reason}", port=self._backend.port if
                       self._backend else None, reason=reason)
        if self._backend is not None and self._backend.transport is not None:
            self._backend.transport.abortConnection()
        if self._response_head:
            self._refuse(502, reason)
        else:
            self.transport.loseConnection()

    # answers of the gate itself

    def _refuse(self, status: int, message: str,
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
        body = (f"{status} {_REASONS.get(status, '')}: {message}\n").encode()
        self._respond(status, body, b"text/plain; charset=utf-8", headers)

    def _respond(self, status: int, body: bytes, content_type: bytes,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        out = [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, "").encode()),
            b"Content-Type: ", content_type, b"\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n",
        ]
        for name, value in headers or ():
            out += [name, b": ", value, b"\r\n"]
        out += [b"\r\n", body]
        self._finish_app()
        self._state = self._CLOSED
        self.transport.write(b"".join(out))
        self.transport.loseConnection()


class GateFactory(Factory):
    """
    Builds L{GateProtocol}s for one listener of a L{GateService}.

    @ivar connections: the open client connections.
    """

    noisy = False

    def __init__(self, reactor: Any, gate: "GateService") -> None:
        self.reactor = reactor
        self.gate = gate
        self.idle = gate.idle
        self.methods = gate.methods
        self.connections: set[GateProtocol] = set()

    def buildProtocol(self, addr: Any) -> GateProtocol:
        return GateProtocol(self)


# --- the service -------------------------------------------------------------


class GateService(MultiService):
    """
    The gate: its listeners as children, the names file in force, and the
    applications it started.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        listeners: tuple[str, ...] = (),
        names_path: Path | None = None,
        target: int | None = None,
        methods: tuple[str, ...] = ("GET", "POST"),
        retire: float | None = None,
        idle: float = 420.0,
        start_timeout: float = 30.0,
        install_sighup: bool = True,
    ) -> None:
        super().__init__()
        self.setName("gate")
        self.reactor = reactor
        self.names_path = names_path
        self.target = target
        self.methods = tuple(methods)
        self.retire = retire
        self.idle = idle
        self.start_timeout = start_timeout
        self.install_sighup = install_sighup
        self.names = NamesFile()
        if names_path is not None:
            self.names = NamesFile.parse(names_path.read_text())
        self.applications: dict[str, Application] = {}
        self.factory = GateFactory(reactor, self)
        self.listeners = tuple(listeners)
        for description in listeners:
            strports.service(description, self.factory, reactor=reactor).setServiceParent(
                self
            )
        self._previous_handler: Any = None

    @classmethod
    def from_config(cls, reactor: Any, config: Any) -> "GateService":
        """
        Build the gate from a L{haikutx.config.Config}.
        """
        return cls(
            reactor,
            listeners=config.gates,
            names_path=config.names,
            target=config.gate_target,
            methods=config.gate_methods,
            retire=config.retire,
            idle=config.idle,
        )

    def application(self, entry: NamesEntry) -> Application:
        """
        The L{Application} of a names-file entry (created on first use).
        """
        app = self.applications.get(entry.name)
        if app is None:
            app = self.applications[entry.name] = Application(
                entry, self.reactor, retire=self.retire,
                start_timeout=self.start_timeout,
            )
        elif app.entry != entry and not app.running:
            app.entry = entry
        return app

    def reload(self) -> bool:
        """
        Read the names file again; a file that does not parse leaves the old
        one in force.

        @return: whether the new file is in force.
        """
        if self.names_path is None:
            return False
        try:
            names = NamesFile.parse(self.names_path.read_text())
        except (OSError, UnicodeDecodeError, NamesFileError) as e:
            self.log.error("names file {path} not reloaded, keeping the old one: "
                           "{reason}", path=str(self.names_path), reason=str(e))
            return False
        self.names = names
        self.log.info("names file {path} reloaded: {count} entries",
                      path=str(self.names_path), count=len(names.entries))
        return True

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def startService(self) -> None:
        if self.install_sighup:
            self._previous_handler = signal.signal(signal.SIGHUP, self._sighup)
        super().startService()
        self.log.info("gate started on {listeners}", listeners=list(self.listeners))

    def stopService(self) -> Deferred:
        if self.install_sighup and self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        stopped = super().stopService()
        closing = []
        for connection in list(self.factory.connections):
            closing.extend(connection.all_closed())
            connection.transport.loseConnection()
        apps = [app.stop() for app in self.applications.values()]
        d = DeferredList([stopped, *closing, *apps], consumeErrors=True)
        d.addCallback(lambda _: self.log.info("gate stopped"))
        return d
