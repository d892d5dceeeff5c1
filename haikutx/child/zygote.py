# -*- test-case-name: haikutx.test.test_isolation -*-
"""
The zygote: one per worker slot, and the only party the server trusts about
that slot's processes.  It runs no handler code.

It prepares the kernel sandbox once, applies the layers common to all its
children to itself (L{haikutx.sandbox.slot}), imports what handlers need,
then forks one child at a time.  For each child it makes a socketpair: the
child gets one end as its fd 3 and nothing else of the zygote's; the
server gets the other end, passed over the zygote's own channel (its fd 3,
which no child keeps) with C{SCM_RIGHTS}, with the child's pid and a
pidfd of it (so that the server can kill it itself, safe from pid reuse,
even when the zygote is gone: a backstop to the parent-death signal).  The
zygote reports each child's end (exit status or signal) and forwards what
children write to their stdout and stderr (their fds 1 and 2, a pipe of
their own).

The server gives a child's channel at most C{--maxrequests} requests, then
closes it and tells the zygote to retire the child: the zygote kills it
(C{SIGKILL}: nothing is left to do in it) and forks the next.  The zygote
reports the end of every child the server did not retire, and of those it
killed with a request still to answer.  A child
never says it is fresh; a channel the zygote passed is fresh because the
zygote made it for a process it had just forked.

Standard library only (no Twisted): forking a small process is fast.
Everything a child would otherwise do first, and slowly, in each fresh
process (lazy imports, first calls through ctypes, a garbage collection
that touches every inherited object) is done once here before the first
fork; see L{haikutx.child.warmup}.
"""

from __future__ import annotations

import _random
import ctypes
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

from haikutx.child import forker, runner, warmup, wire
from haikutx.child.forker import Forker
from haikutx.sandbox._libc import PR_SET_PDEATHSIG, close_fds_except, libc

PR_SET_CHILD_SUBREAPER = 36

#: The zygote's channel to the server.
CONTROL = 3

#: A child's exit status when its zygote was gone before it started.
EXIT_SERVER_GONE = 3

#: A child's exit status when the sandbox could not be applied.
EXIT_SANDBOX_FAILED = 70

#: A child's exit status when zygote code failed in it.
EXIT_CHILD_FAILED = 1

#: Output bytes forwarded per child; the rest is dropped (and said so).
MAX_OUTPUT = 64 * 1024

_PID = struct.Struct(">I")

#: The C library's C{fork}, called with the GIL held (a L{ctypes.PyDLL}
#: function): see L{fork}.
_libc_fork = ctypes.PyDLL(None, use_errno=True).fork
_libc_fork.restype = ctypes.c_int
_libc_fork.argtypes = []


def fork() -> int:
    """
    Fork this single-threaded process, as L{os.fork} does but without
    CPython's at-fork work, which a child of the zygote does not need and
    which costs it more than anything else it does: C{os.fork} runs the
    hooks registered with L{os.register_at_fork} (C{threading}'s, which
    rebuilds its thread bookkeeping, C{logging}'s, which renews every
    handler's lock, C{random}'s reseeding) and the interpreter's own
    re-initialisation of its locks, all for the sake of threads that a
    single-threaded process does not have.  Measured on the 2-core VM, from
    the warmed-up zygote: 226 page faults and 0.6 ms in each child before
    its first line of Python, against 27 faults and 0.01 ms.

    What a child does need of it is done here: C{random} is reseeded, so
    that no two children share their random numbers.  The C library's
    own at-fork work (its locks, the new thread id) runs as for any fork.
    Only for a process with one thread (L{Zygote} checks, once).

    @return: the child's pid in the parent, 0 in the child.
    @raise OSError: if the fork fails.
    """
    pid = _libc_fork()
    if pid < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"fork: {os.strerror(error)}")
    if pid == 0:
        _reseed()
    return pid


def _reseed() -> None:
    """
    Random numbers of its own for a freshly forked child, or for the next
    child the forker forks (what C{random.seed()} does, without its Python
    frame, which writes 30 more pages: fresh state from C{os.urandom}, and
    no cached Gaussian).  Done in the forker, it costs the forker 12 pages
    per child and spares the child 22.
    """
    generator = sys.modules.get("random")
    if generator is not None:
        shared = generator._inst
        _random.Random.seed(shared, None)
        if shared.gauss_next is not None:
            shared.gauss_next = None


def _prepare(options: dict[str, Any]) -> Any:
    """
    Prepare this slot's sandbox (L{haikutx.sandbox.SlotSandbox}), or
    C{None} when disabled.
    """
    if not options.get("sandbox", True):
        return None
    from haikutx.sandbox import ResourceLimits, SandboxPolicy, identity_for, prepare_slot

    off = tuple(options.get("off", ()))
    identity = identity_for(options.get("user"), options.get("slot", 0), options.get("base_uid"))
    limits = ResourceLimits(
        address_space=int(options.get("max_memory", 256 << 20)),
        cpu_seconds=int(options.get("cpu_seconds", 6)),
    )
    egress = options.get("egress")
    policy = SandboxPolicy(
        limits=limits,
        identity=identity,
        connect_ports=(int(egress["port"]),) if egress else None,
        max_threads=options.get("max_threads") if options.get("base_uid") is not None else None,
        # Shell handlers send what they do not want to /dev/null.
        write_paths=("/dev/null",) if options.get("exec_paths") else (),
    )
    return prepare_slot(
        policy,
        exec_paths=tuple(options.get("exec_paths", ())),
        exec_read_paths=tuple(options.get("exec_read_paths", ())),
        off=off,
    )


def _run_group(options: dict[str, Any]) -> str:
    """
    Make (or empty) this slot's cgroup (L{haikutx.sandbox.cgroup.RunGroup}),
    as root, before the zygote enters its sandbox: the server puts each
    child in a group of its own beneath it, before the child's first
    request, so every process a handler starts is in it, at most
    C{max_procs} tasks (besides the child's own) and C{max_memory}
    together, and killed with the run.

    @return: how that layer stands, for the start-up report.
    """
    from haikutx.sandbox.cgroup import CONTROLLERS, RunGroup

    settings = options.get("cgroup") or {}
    parents = settings.get("directories") or {}
    missing = dict(settings.get("missing") or {})
    if not parents:
        reasons = "; ".join(missing.values()) or "no cgroups were set up by the server"
        return (
            f"unavailable: {reasons}: the processes of a stdio handler are bounded one "
            "by one (RLIMIT_NPROC, RLIMIT_AS), and one that leaves the run's process "
            "group may outlive its run"
        )
    max_procs = int(options.get("max_procs", 32))
    max_memory = int(options.get("max_memory", 256 << 20))
    try:
        group = RunGroup.create(parents, f"slot{options.get('slot', 0)}", None, None)
    except OSError as e:
        return f"unavailable: cannot create this slot's cgroup: {e}"
    have = [c for c in CONTROLLERS if c in group.directories]
    text = (
        f"active: cgroup v1 {' and '.join(have)}: at most {max_procs} tasks and "
        f"{max_memory >> 20} MiB together per run; every process ends with its run"
    )
    if missing:
        text = "partial: " + text[len("active: "):] + "; missing: " + "; ".join(missing.values())
    return text


def _enter_egress(options: dict[str, Any], zygote: int) -> str:
    """
    Move this zygote (and so its children) into a network namespace of its
    own whose only way out is the server's egress proxy, reached through a
    relay on 127.0.0.1 inside the namespace; handlers get C{HTTP_PROXY} and
    C{HTTPS_PROXY} naming it.

    @return: how the network layer stands, for the start-up report.
    """
    egress = options.get("egress")
    if "network" in options.get("off", ()):
        return "turned off by name: handlers reach what this machine reaches"
    if not egress:
        return "disabled"
    from haikutx.sandbox import EgressRelay, enter_network_namespace

    channel = socket.socket(fileno=int(egress["fd"]))
    try:
        kind = enter_network_namespace()
    except OSError as e:
        channel.close()
        return f"unavailable: cannot create a network namespace ({e})"
    relay = EgressRelay(channel, int(egress["port"]))
    pid = os.fork()
    if pid == 0:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != zygote:
            os._exit(0)
        close_fds_except({relay.fileno(), channel.fileno()})
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        relay.serve_forever()
        os._exit(0)
    os.environ.update(relay.proxy_environ())
    relay.close()
    return f"active: {kind} namespace, egress through the server's proxy"


def _confiner(sandbox: Any, worker: runner.Worker) -> Any:
    """
    The function a child calls when it learns what it will run: the last
    layer for Python handlers, or for the stdio runner and its
    interpreters.
    """

    def confine(kind: str) -> None:
        try:
            if kind == "python":
                sandbox.confine_python()
            else:
                sandbox.confine_stdio()
                worker.exec_sandbox = sandbox.confine_interpreter
                if _signals_stay_in_slot(sandbox):
                    # What a handler leaves is reparented to this child,
                    # which reaps it (a zombie counts against --maxprocs).
                    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
                    worker.end_run_processes = _kill_all_i_may
        except Exception as e:
            os.write(2, f"sandbox could not be applied: {e}\n".encode())
            os._exit(EXIT_SANDBOX_FAILED)

    return confine


#: Whether each child runs as a uid of its slot's own (set by L{main}).
_OWN_UID = False

#: The worker each child serves with, made once by L{main} before the
#: first fork (each child gets its own copy; its event loop's descriptors
#: are made in the child, if it ever runs the loop).
_next_worker: runner.Worker | None = None


def _signals_stay_in_slot(sandbox: Any) -> bool:
    """
    Whether a stdio child may end its run's processes with C{kill(-1)}:
    it runs as its slot's own uid (not root, not a shared C{--user}), and
    Landlock scopes its signals to its own domain (ABI 6+), which its
    interpreters share: then C{kill(-1)} reaches those and nothing else.
    """
    return _OWN_UID and sandbox.landlock_abi >= 6 and os.getuid() != 0


def _kill_all_i_may(wait: float = 0.5) -> None:
    """
    Kill every process this stdio child may signal (see
    L{_signals_stay_in_slot}): what its handlers left running; then reap
    them (this child is their subreaper), waiting at most C{wait} seconds.
    """
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    deadline = time.monotonic() + wait
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.001)


def _child(sandbox: Any, channel: int, output: int, zygote: int) -> None:
    """
    In a freshly forked child, zygote code only: give it its own
    descriptors (0 C{/dev/null}, 1 and 2 its output pipe, 3 its channel)
    and nothing else, apply the per-child layers, then serve.  (C{SIGTERM}
    is at its default already: L{main} set it so in the zygote.)  Its
    C{/dev/null} is an open file of its own: one shared with the zygote
    would carry a handler's C{fcntl} flags to the next child.
    """
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != zygote:
        # The zygote died before the parent-death signal was set.
        os._exit(EXIT_SERVER_GONE)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.dup2(channel, runner.CHANNEL)
    keep = (0, 1, 2, runner.CHANNEL)
    if sandbox is None:
        close_fds_except(keep)
    else:
        try:
            sandbox.enter_child(keep, signal.SIGKILL)
        except Exception as e:
            os.write(2, f"sandbox could not be applied: {e}\n".encode())
            os._exit(EXIT_SANDBOX_FAILED)
    worker = _next_worker
    if worker is None:
        worker = runner.Worker(0, runner.CHANNEL)
        if sandbox is not None:
            worker.confine = _confiner(sandbox, worker)
    # (Else its confiner was made with it, in the zygote.)
    worker.run()
    sys.stdout.flush()
    os._exit(0)


def _retire_order(payload: bytes) -> tuple[int, bool]:
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

    def __init__(self, control: socket.socket, sandbox: Any) -> None:
        self._control = control
        self._sandbox = sandbox
        self._zygote = os.getpid()
        self._reader = wire.FrameReader()
        self._poll = select.poll()
        self._children: dict[int, _Child] = {}
        self._by_fd: dict[int, tuple[str, _Child]] = {}
        self._current: _Child | None = None
        # Chosen once: the zygote starts no thread.
        self._fork_process = fork if threading.active_count() == 1 else os.fork
        #: What forks the children, once L{serve} has started it.
        self._forker: Forker | None = None

    def serve(self) -> None:
        """
        Serve until the server closes the channel; then kill every child.
        """
        self._poll.register(self._control.fileno(), select.POLLIN)
        if self._fork_process is fork and forker.available():
            self._forker = Forker.start(fork, self._run_child, self._before_fork)
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
        Become the child the forker has just forked (L{_child}); never
        returns.
        """
        _child(self._sandbox, channel, output, self._zygote)

    def _before_fork(self) -> None:
        """
        In the forker, before each fork: random numbers for the next child
        alone, and its IPC namespace.
        """
        _reseed()
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
                _child(self._sandbox, child_end.fileno(), write, self._zygote)
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
                    self._retire(*_retire_order(payload))
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


def main(argv: list[str]) -> None:
    """
    Run a zygote: C{python -m haikutx.child.zygote OPTIONS_JSON}, with its
    channel to the server (a unix socket) as fd 3.
    """
    options = json.loads(argv[1]) if len(argv) > 1 else {}
    control = socket.socket(fileno=CONTROL)
    control.setblocking(True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    zygote = os.getpid()
    global _OWN_UID
    _OWN_UID = (
        os.geteuid() == 0
        and options.get("base_uid") is not None
        and not {"uid", "landlock"} & set(options.get("off", ()))
    )
    sandbox = _prepare(options)
    network = _enter_egress(options, zygote) if sandbox is not None else "disabled"
    if sandbox is not None:
        if "ipc" in options.get("off", ()):
            sandbox.ipc = "turned off by name"
        else:
            sandbox.enter_ipc_namespace(per_child=options.get("ipc_per_child", True))
        report = sandbox.describe()
    else:
        report = {"layers": {"all": "disabled"}}
    report.setdefault("layers", {})["network"] = network
    if sandbox is not None:
        if "processes" in options.get("off", ()):
            processes = "turned off by name: a run's processes are bounded one by one"
        elif not options.get("exec_paths"):
            processes = "no stdio interpreters"
        else:
            processes = _run_group(options)
        report["layers"]["processes"] = processes
    warmup.warm_up()
    if sandbox is not None:
        try:
            sandbox.enter_zygote()
        except Exception as e:
            os.write(2, f"sandbox could not be applied to the zygote: {e}\n".encode())
            os._exit(EXIT_SANDBOX_FAILED)
    control.sendall(wire.encode_json(wire.SANDBOX, report))
    global _next_worker
    _next_worker = runner.Worker(0, runner.CHANNEL)
    if sandbox is not None:
        _next_worker.confine = _confiner(sandbox, _next_worker)
    warmup.freeze()
    Zygote(control, sandbox).serve()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
