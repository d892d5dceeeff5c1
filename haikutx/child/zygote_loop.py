# -*- test-case-name: haikutx.test.test_isolation -*-
"""
The zygote's loop (L{Zygote}): fork a child (by the forker,
L{haikutx.child.forker}), pass the server its channel, retire children
when the server says so, report their ends, forward their output.

Standard library only (the zygote imports it).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

from haikutx.child import forker, wire
from haikutx.child.forker import Forker

#: A child's exit status when zygote code failed in it.
EXIT_CHILD_FAILED = 1

#: Output bytes forwarded per child; the rest is dropped (and said so).
MAX_OUTPUT = 64 * 1024

_PID = struct.Struct(">I")


def retire_order(payload: bytes) -> tuple[int, bool]:
    """
    The pid and the report flag of a C{RETIRE} frame's payload.  The
    server's two forms, C{{"pid":N}} and C{{"pid":N,"report":true}}, are
    read by hand: the json module's path writes 22 pages of the zygote per
    child, each copied while that child lives.  Anything else is JSON.

    @raise ValueError: if it is not a JSON object with a C{pid}.
    @raise KeyError: if it has no C{pid}.
    """
    if payload.startswith(b'{"pid":') and payload.endswith(b"}"):
        number, _, report = payload[7:-1].partition(b",")
        if number.isdigit() and report in (b"", b'"report":true', b'"report":false'):
            return int(number), report == b'"report":true'
    order = json.loads(payload)
    return int(order["pid"]), bool(order.get("report"))


class _Child:
    """
    A child the zygote has forked and not yet reaped.
    """

    __slots__ = ("pid", "pidfd", "output", "forwarded", "retired", "report")

    def __init__(self, pid: int, pidfd: int, output: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.output: int | None = output
        self.forwarded = 0
        self.retired = False
        self.report = True


class Zygote:
    """
    The zygote's loop: fork a child, pass its channel to the server, retire
    children when the server says so, report their ends, forward their
    output.  Blocking and single-threaded, on L{select.poll}.
    """

    def __init__(
        self, control: socket.socket, sandbox: Any, become_child: Callable[[int, int], None]
    ) -> None:
        """
        @param control: the channel to the server.
        @param sandbox: the slot's sandbox, or C{None} (its IPC namespace
            per child).
        @param become_child: what each freshly forked child runs, with its
            channel and the writing end of its output pipe; never returns.
        """
        self._control = control
        self._sandbox = sandbox
        self._become_child = become_child
        self._reader = wire.FrameReader()
        self._poll = select.poll()
        self._children: dict[int, _Child] = {}
        self._by_fd: dict[int, tuple[str, _Child]] = {}
        self._current: _Child | None = None
        # Chosen once: the zygote starts no thread.
        self._fork_process = forker.fork if threading.active_count() == 1 else os.fork
        #: What forks the children, once L{serve} has started it.
        self._forker: Forker | None = None

    def serve(self) -> None:
        """
        Serve until the server closes the channel; then kill every child.
        """
        self._poll.register(self._control.fileno(), select.POLLIN)
        if self._fork_process is forker.fork and forker.available():
            self._forker = Forker.start(forker.fork, self._run_child, self._before_fork)
            self._poll.register(self._forker.pidfd, select.POLLIN)
        self._fork()
        while True:
            try:
                events = self._poll.poll()
            except InterruptedError:
                continue
            # The server's orders first: a retirement must be known before
            # the retired child's death is seen.
            control = self._control.fileno()
            events.sort(key=lambda event: event[0] != control)
            for fd, _ in events:
                if fd == self._control.fileno():
                    if not self._commands():
                        self._stop()
                        return
                    continue
                if self._forker is not None and fd == self._forker.pidfd:
                    # It never ends by itself: no child can be forked now.
                    os.write(2, b"the zygote's forker has ended\n")
                    self._stop()
                    return
                entry = self._by_fd.get(fd)
                if entry is None:
                    continue
                what, child = entry
                if what == "output":
                    self._forward(child)
                else:
                    self._reap(child)

    def _send(self, frame: bytes, fds: list[int] | None = None) -> None:
        if fds:
            socket.send_fds(self._control, [frame], fds)
        else:
            self._control.sendall(frame)

    def _run_child(self, channel: int, output: int) -> None:
        """
        Become the child the forker has just forked; never returns.
        """
        self._become_child(channel, output)

    def _before_fork(self) -> None:
        """
        In the forker, before each fork: random numbers for the next child
        alone, and its IPC namespace.
        """
        forker.reseed()
        if self._sandbox is not None:
            self._sandbox.new_ipc_namespace()

    def _fork(self) -> None:
        """
        Fork the next child, with a channel and an output pipe of its own:
        by the forker (L{haikutx.child.forker}), or here.
        """
        if self._forker is not None:
            pid, server_fd, read = self._forker.fork()
            server_end = socket.socket(fileno=server_fd)
        else:
            pid, server_end, read = self._fork_here()
        self._forked(pid, server_end, read)

    def _fork_here(self) -> tuple[int, socket.socket, int]:
        """
        Fork the next child from this process.

        @return: its pid, the server's end of its channel and the reading
            end of its output pipe.
        """
        server_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        read, write = os.pipe()
        if self._sandbox is not None:
            self._sandbox.new_ipc_namespace()
        pid = self._fork_process()
        if pid == 0:
            # This frame never returns, and never unwinds: no socket
            # object of the zygote's is ever closed in the child, where
            # its number may be another descriptor by then.
            try:
                self._become_child(child_end.fileno(), write)
            except BaseException:
                sys.excepthook(*sys.exc_info())
            finally:
                os._exit(EXIT_CHILD_FAILED)
        child_end.close()
        os.close(write)
        return pid, server_end, read

    def _forked(self, pid: int, server_end: socket.socket, read: int) -> None:
        """
        Take charge of a child just forked: watch its end and its output,
        and pass the server its channel.
        """
        # Never block on a child's pipe: an event of a batch may name a
        # descriptor number closed and reused since.
        os.set_blocking(read, False)
        pidfd = os.pidfd_open(pid)
        child = _Child(pid, pidfd, read)
        self._children[pid] = child
        self._by_fd[pidfd] = ("pid", child)
        self._by_fd[read] = ("output", child)
        self._poll.register(pidfd, select.POLLIN)
        self._poll.register(read, select.POLLIN)
        self._current = child
        try:
            # Made by hand, not by the json module: each page the zygote
            # writes while its child lives is copied (30 pages fewer).
            self._send(wire.encode(wire.CHILD, b'{"pid":%d}' % pid), [server_end.fileno(), pidfd])
        finally:
            server_end.close()

    def _commands(self) -> bool:
        """
        Read the server's frames.

        @return: C{False} once the server has closed the channel.
        """
        try:
            data = self._control.recv(65536)
        except (ConnectionResetError, InterruptedError):
            data = b""
        if not data:
            return False
        try:
            for kind, payload in self._reader.feed(data):
                if kind == wire.RETIRE:
                    self._retire(*retire_order(payload))
        except (wire.FrameError, ValueError, KeyError, TypeError):
            return False
        return True

    def _retire(self, pid: int, report: bool) -> None:
        """
        Kill a child the server is done with, and fork the next if it was
        the current one.

        @param report: report its end (the server killed it with a request
            still to answer); a routine retirement is not reported.
        """
        child = self._children.get(pid)
        if child is None or child.retired:
            return
        child.retired = True
        child.report = report
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if child is self._current:
            self._current = None
            self._fork()

    def _forward(self, child: _Child, final: bool = False) -> None:
        """
        Forward what C{child} wrote to its stdout and stderr, up to
        L{MAX_OUTPUT} bytes in all: one read when the pipe is readable, or
        everything left (without waiting) when C{final}.
        """
        fd = child.output
        if fd is None:
            return
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._poll.unregister(fd)
                del self._by_fd[fd]
                os.close(fd)
                child.output = None
                return
            room = MAX_OUTPUT - child.forwarded
            child.forwarded += len(data)
            if room > 0:
                piece = data[:room]
                if len(data) > room:
                    piece += f"\n[output beyond {MAX_OUTPUT} bytes dropped]\n".encode()
                self._send(wire.encode(wire.OUTPUT, _PID.pack(child.pid) + piece))
            if not final:
                return

    def _reap(self, child: _Child) -> None:
        """
        A child has ended: reap it, report its end (after what it wrote),
        and fork the next if the server had not retired it.
        """
        reaped, status = os.waitpid(child.pid, os.WNOHANG)
        if reaped == 0:
            return  # a stale event for a reused descriptor number
        self._poll.unregister(child.pidfd)
        del self._by_fd[child.pidfd]
        os.close(child.pidfd)
        self._forward(child, final=True)
        if child.output is not None:
            # A process the child started keeps the pipe open: stop reading.
            self._poll.unregister(child.output)
            del self._by_fd[child.output]
            os.close(child.output)
        del self._children[child.pid]
        if child.report:
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            number = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            self._send(
                wire.encode_json(
                    wire.ENDED,
                    {"pid": child.pid, "code": code, "signal": number,
                     "retired": child.retired},
                )
            )
        if child is self._current:
            self._current = None
            self._fork()

    def _stop(self) -> None:
        if self._forker is not None:
            self._forker.close()
        for child in list(self._children.values()):
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for child in list(self._children.values()):
            try:
                os.waitpid(child.pid, 0)
            except ChildProcessError:
                pass
