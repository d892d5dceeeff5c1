# -*- test-case-name: haikutx.test.test_isolation -*-
"""
How the zygote forks (L{fork}: the C library's fork without CPython's
at-fork work) and its forker: a process the zygote forks once, after its
warm-up, that forks the zygote's children for it, so that the zygote's own work
per child (its bookkeeping, its reports to the server) no longer writes to
pages it shares with a live child.

Every page a process writes while a child it forked still shares it is
copied (a copy-on-write fault, 2–3 µs here).  The zygote's loop writes some
140 pages per child, each copied again after each fork, since the waiting
child shares them.  The forker's loop writes a few dozen; the zygote, whose
pages are then shared with the forker alone, copies each page once and
never again.

The forker makes each child with C{clone(CLONE_PARENT)}: the child's parent
is the zygote, which reaps it, gets its exit status, holds a pidfd of it
(safe from pid reuse: only its parent can reap it), and whose death kills
it (its parent-death signal).  For each child the forker makes its channel
and output pipe, and passes the server's end and the pipe's reading end to
the zygote with the child's pid; it keeps nothing.  It runs no handler
code, holds no descriptor but its channel to the zygote (and the zygote's
standard streams), and dies with the zygote.

Standard library only.
"""

from __future__ import annotations

import _random
import _socket
import ctypes
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable

from haikutx.sandbox._libc import MACHINE, PR_SET_PDEATHSIG, close_fds_except, libc

#: C{clone}'s flag: the child's parent is the caller's parent.
CLONE_PARENT = 0x00008000

#: The forker's process name (C{ps}, C{/proc/PID/comm}); its children take
#: the zygote's back.
NAME = b"haiku-forker"

PR_SET_NAME = 15
PR_GET_NAME = 16

#: The raw C{clone} system call (not the C library's wrapper, which needs
#: a stack and a function): with no new stack it returns twice, as fork.
_CLONE = {"x86_64": 56, "aarch64": 220}.get(MACHINE)

#: Called with the GIL held, as the zygote's own fork is.
_syscall = ctypes.PyDLL(None, use_errno=True).syscall
_syscall.restype = ctypes.c_long

#: A reply: the child's pid (0 when the fork failed), the error number.
_REPLY = struct.Struct("=iI")
_FDS = struct.Struct("=ii")


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
    Only for a process with one thread (the zygote checks, once).

    @return: the child's pid in the parent, 0 in the child.
    @raise OSError: if the fork fails.
    """
    pid = _libc_fork()
    if pid < 0:
        error = ctypes.get_errno()
        raise OSError(error, f"fork: {os.strerror(error)}")
    if pid == 0:
        reseed()
    return pid


def reseed() -> None:
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


def available() -> bool:
    """
    Whether children can be made this way on this machine.
    """
    return _CLONE is not None


def _clone_parent() -> int:
    """
    Fork a child whose parent is this process's parent.

    @return: the child's pid in this process, 0 in the child, -errno on
        failure.
    """
    pid = _syscall(_CLONE, CLONE_PARENT | signal.SIGCHLD, 0, 0, 0, 0)
    if pid < 0:
        return -ctypes.get_errno()
    return pid


class Forker:
    """
    The zygote's handle on its forker.
    """

    def __init__(self, pid: int, channel: socket.socket) -> None:
        self.pid = pid
        self._channel = channel
        #: Readable once the forker has ended (the zygote must then stop).
        self.pidfd = os.pidfd_open(pid)

    @classmethod
    def start(
        cls,
        fork: Callable[[], int],
        run_child: Callable[[int, int], None],
        before_fork: Callable[[], None] | None,
    ) -> Forker:
        """
        Fork the forker.

        @param fork: how the zygote forks (the forker's own fork).
        @param run_child: called in each child with its channel and the
            writing end of its output pipe; never returns.
        @param before_fork: called in the forker before each fork (what is
            the next child's alone: its random numbers, its IPC namespace),
            or C{None}.
        """
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        zygote = os.getpid()
        pid = fork()
        if pid == 0:
            try:
                mine.detach()
                _serve(theirs.detach(), zygote, run_child, before_fork)
            except BaseException:
                sys.excepthook(*sys.exc_info())
            finally:
                os._exit(1)
        theirs.close()
        return cls(pid, mine)

    def fork(self) -> tuple[int, int, int]:
        """
        Have the forker fork the next child.

        @return: the child's pid, the server's end of its channel, and the
            reading end of its output pipe.
        @raise OSError: if the fork failed, or the forker is gone.
        """
        self._channel.sendall(b"f")
        data, fds, _, _ = socket.recv_fds(self._channel, _REPLY.size, 2)
        if len(data) != _REPLY.size:
            for fd in fds:
                os.close(fd)
            raise OSError("the forker is gone")
        pid, error = _REPLY.unpack(data)
        if pid <= 0:
            for fd in fds:
                os.close(fd)
            raise OSError(error, f"fork: {os.strerror(error)}")
        return pid, fds[0], fds[1]

    def close(self) -> None:
        """
        Stop the forker (it exits when its channel closes) and reap it.
        """
        self._channel.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.pidfd)


def _serve(
    channel: int,
    zygote: int,
    run_child: Callable[[int, int], None],
    before_fork: Callable[[], None] | None,
) -> None:
    """
    The forker's loop: for each order of the zygote, make a child's channel
    and output pipe, fork the child, pass the zygote the child's pid and
    the ends that are not the child's, and close all four.  Written to
    touch few objects: each page it writes is copied, since the child it
    has just forked shares it.
    """
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != zygote:
        os._exit(0)
    close_fds_except((0, 1, 2, channel))
    zygote_name = ctypes.create_string_buffer(16)
    set_name = libc.prctl
    set_name(PR_GET_NAME, ctypes.addressof(zygote_name), 0, 0, 0)
    own_name = ctypes.create_string_buffer(NAME)
    set_name(PR_SET_NAME, ctypes.addressof(own_name), 0, 0, 0)
    zygote_name_address = ctypes.addressof(zygote_name)
    read, pipe, close = os.read, os.pipe, os.close
    pair, unix, stream = _socket.socketpair, _socket.AF_UNIX, _socket.SOCK_STREAM
    send = _socket.socket(fileno=channel).sendmsg
    level, rights = _socket.SOL_SOCKET, _socket.SCM_RIGHTS
    reply, fds = _REPLY.pack, _FDS.pack
    clone = _clone_parent
    while True:
        if not read(channel, 1):
            os._exit(0)
        server_end, child_end = pair(unix, stream)
        output, write = pipe()
        if before_fork is not None:
            before_fork()
        pid = clone()
        if pid == 0:
            try:
                set_name(PR_SET_NAME, zygote_name_address, 0, 0, 0)
                run_child(child_end.fileno(), write)
            except BaseException:
                sys.excepthook(*sys.exc_info())
            finally:
                os._exit(1)
        if pid > 0:
            send([reply(pid, 0)], [(level, rights, fds(server_end.fileno(), output))])
        else:
            send([reply(0, -pid)])
        server_end.close()
        child_end.close()
        close(output)
        close(write)
