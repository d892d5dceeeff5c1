"""
The job launcher: a small process of the job runner's own that starts the
jobs, reads their output, reaps them and reports it all over one pipe.

The runner's reactor then handles one message per event of a job instead of
a spawn, three pipes, a SIGCHLD and a reap of its own; the launcher waits for
each C{exec} on its own core. Standard library only: it runs as
C{python -I launcher.py <runner pid>}, never importing haikutx or Twisted.

Frames, both ways: a 4-byte big-endian length, then a C{marshal}led tuple.

From the runner (stdin):
    - C{("env", environ)}: the environment of the jobs started after it;
    - C{("start", handle, executable, argv)}: start a job (no shell; stdin
      C{/dev/null}, stdout and stderr pipes, signals at their defaults, no
      other descriptor);
    - C{("kill", handle, signum)}: signal a job that has not been reaped;
    - C{("close", handle)}: close a job's pipes (a grandchild kept them);
    - C{("which", handle, command, path)}: look a command up on a C{PATH}.

To the runner (stdout):
    - C{("started", handle, pid)} or C{("failed", handle, errno, text, path)}
      (a start, and what its job does next, is reported within L{HOLD}
      seconds, or as soon as the job has ended: a short job's start, output
      and end come in one write);
    - C{("out", handle, fd, data)}: output of fd 1 or 2;
    - C{("exited", handle)}: the job exited but its pipes are still open;
    - C{("ended", handle, wait_status)}: reaped and its pipes closed;
    - C{("found", handle, executable or None)}: the answer to C{which}.

When the runner goes away (its end of the pipe closes, it dies: the launcher
asks for SIGTERM at its parent's death, or it gets SIGTERM), every job that
has not been reaped gets SIGKILL and the launcher exits: jobs never outlive
their runner. A SIGTERM is seen by the loop (through the signal module's
wake-up descriptor), never raised as an exception: one that arrives while a
job is being started or while the jobs are being killed (the parent-death
signal comes just after the pipe's end) interrupts neither.
"""

import ctypes
import errno as errno_module
import marshal
import os
import select
import shutil
import signal
import struct
import sys
import time

HEADER = struct.Struct("!I")

#: Bytes read from a pipe at a time.
READ_SIZE = 65536

#: Reads from one pipe before the loop turns to the others.
MAX_READS = 16

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4

#: Seconds the reports of a job just started (its start, its output) may
#: wait for its end: a short job's start, output and end reach the runner in
#: one write (one read and one wake-up of the runner instead of two or
#: three).
HOLD = 0.002

#: The scheduling of the jobs: the usual one (the launcher's is not).
_SCHEDULER = (os.SCHED_OTHER, os.sched_param(0))


class _Job:
    __slots__ = ("handle", "pid", "pidfd", "pipes", "status")

    def __init__(self, handle, pid, pidfd, pipes):
        self.handle = handle
        self.pid = pid
        self.pidfd = pidfd
        #: The open read ends: descriptor -> 1 or 2.
        self.pipes = pipes
        self.status = None


class Launcher:
    """
    The launcher's state and its event loop.
    """

    def __init__(self, commands, reports, stop=None):
        """
        @param commands: the pipe from the runner.
        @param reports: the pipe to the runner.
        @param stop: a descriptor that becomes readable when the launcher
            must go (a SIGTERM), or C{None}.
        """
        self._commands = commands
        self._reports = reports
        self._stop = stop
        self._poll = select.epoll()
        self._poll.register(commands, select.EPOLLIN)
        if stop is not None:
            self._poll.register(stop, select.EPOLLIN)
        self._environ = {}
        self._jobs = {}
        #: Descriptor -> (job, fd number in the job or 0 for its pidfd).
        self._fds = {}
        self._buffer = b""
        self._out = []
        #: Whether only reports of jobs started in the hold are waiting,
        #: until when they may wait, and those jobs (that have not ended).
        self._holding = False
        self._hold_until = 0.0
        self._young = set()
        self._defaults = [
            n
            for n in range(1, signal.NSIG)
            if n == signal.SIGINT or _ignored(n)
        ]

    def run(self):
        """
        Serve until the runner goes away.
        """
        try:
            while True:
                timeout = -1.0
                if self._out:
                    timeout = max(0.0, self._hold_until - time.monotonic())
                try:
                    events = self._poll.poll(timeout)
                except InterruptedError:
                    continue
                for fd, _ in events:
                    if fd == self._stop:
                        return
                    if fd == self._commands:
                        if not self._read_commands():
                            return
                        continue
                    found = self._fds.get(fd)
                    if found is None:
                        continue
                    job, which = found
                    if which == 0:
                        self._reap(job)
                    else:
                        self._read(job, fd)
                if (
                    not self._holding
                    or not self._young
                    or time.monotonic() >= self._hold_until
                ):
                    self._flush()
        finally:
            self._kill_all()

    # -- commands --

    def _read_commands(self):
        try:
            data = os.read(self._commands, READ_SIZE)
        except BlockingIOError:
            return True
        if not data:
            return False
        buffer = self._buffer + data
        start = 0
        while len(buffer) - start >= 4:
            (length,) = HEADER.unpack_from(buffer, start)
            end = start + 4 + length
            if end > len(buffer):
                break
            self._command(marshal.loads(buffer[start + 4 : end]))
            start = end
        self._buffer = buffer[start:]
        return True

    def _command(self, message):
        kind = message[0]
        if kind == "start":
            self._start(message[1], message[2], message[3])
        elif kind == "kill":
            job = self._jobs.get(message[1])
            if job is not None and job.status is None:
                try:
                    signal.pidfd_send_signal(job.pidfd, message[2])
                except ProcessLookupError:
                    pass
        elif kind == "close":
            job = self._jobs.get(message[1])
            if job is not None:
                for fd in list(job.pipes):
                    self._close_pipe(job, fd)
                self._maybe_ended(job)
        elif kind == "which":
            found = shutil.which(message[2], os.F_OK | os.X_OK, message[3])
            self._send(("found", message[1], found))
        elif kind == "env":
            self._environ = message[1]

    def _start(self, handle, executable, argv):
        out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        err_r, err_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(out_w, True)
        os.set_blocking(err_w, True)
        try:
            pid = os.posix_spawn(
                executable,
                argv,
                self._environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                ],
                setsigdef=self._defaults,
                setsigmask=(),
                scheduler=_SCHEDULER,
            )
        except (OSError, ValueError, TypeError) as e:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            number = getattr(e, "errno", None) or errno_module.EINVAL
            text = getattr(e, "strerror", None) or str(e)
            self._send(("failed", handle, number, text, executable))
            return
        os.close(out_w)
        os.close(err_w)
        pidfd = os.pidfd_open(pid)
        job = _Job(handle, pid, pidfd, {out_r: 1, err_r: 2})
        self._jobs[handle] = job
        for fd, which in ((pidfd, 0), (out_r, 1), (err_r, 2)):
            self._fds[fd] = (job, which)
            self._poll.register(fd, select.EPOLLIN)
        self._send(("started", handle, pid))

    # -- jobs --

    def _read(self, job, fd, drain=False):
        """
        Read what C{fd} has now (all of it when C{drain}: the writer has
        exited); close it at its end.
        """
        which = job.pipes.get(fd)
        if which is None:
            return
        # Bounded: a job that writes without end does not hold the loop.
        for _ in range(MAX_READS):
            try:
                chunk = os.read(fd, READ_SIZE)
            except BlockingIOError:
                return
            if not chunk:
                self._close_pipe(job, fd)
                self._maybe_ended(job)
                return
            self._send(("out", job.handle, which, chunk))
            if len(chunk) < READ_SIZE and not drain:
                return

    def _reap(self, job):
        self._poll.unregister(job.pidfd)
        del self._fds[job.pidfd]
        _, status = os.waitpid(job.pid, 0)
        os.close(job.pidfd)
        job.pidfd = -1
        job.status = status
        # What the job wrote before it exited comes before its end.
        for fd in list(job.pipes):
            self._read(job, fd, drain=True)
        if job.pipes:
            self._send(("exited", job.handle))
        else:
            self._maybe_ended(job)

    def _close_pipe(self, job, fd):
        del job.pipes[fd]
        del self._fds[fd]
        self._poll.unregister(fd)
        os.close(fd)

    def _maybe_ended(self, job):
        if job.status is not None and not job.pipes and job.handle in self._jobs:
            del self._jobs[job.handle]
            self._send(("ended", job.handle, job.status))

    def _kill_all(self):
        for job in self._jobs.values():
            if job.status is None:
                try:
                    signal.pidfd_send_signal(job.pidfd, signal.SIGKILL)
                except OSError:
                    pass

    # -- reports --

    def _send(self, message):
        kind = message[0]
        if kind == "started":
            if not self._out:
                self._holding = True
                self._hold_until = time.monotonic() + HOLD
            self._young.add(message[1])
        elif message[1] not in self._young or kind not in ("out", "exited", "ended"):
            self._holding = False
        elif kind == "ended":
            # Its start, output and end go now, together.
            self._young.discard(message[1])
        body = marshal.dumps(message)
        self._out.append(HEADER.pack(len(body)) + body)

    def _flush(self):
        self._holding = False
        self._young.clear()
        if not self._out:
            return
        data = b"".join(self._out)
        self._out = []
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._reports, view)
            except InterruptedError:
                continue
            view = view[written:]


def _ignored(number):
    try:
        return signal.getsignal(number) == signal.SIG_IGN
    except (ValueError, OSError):
        return False


def _prctl(*arguments):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(*arguments, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl")


def _become(uid, gid, groups):
    """
    Become C{uid} with C{gid} and the supplementary C{groups}, for good
    (real, effective and saved ids), and not dumpable.
    """
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError(errno_module.EPERM, "the user did not change")
    _prctl(_PR_SET_DUMPABLE, 0)


def _die_with(parent):
    """
    Ask for SIGTERM when the parent dies (after any change of user: a change
    of credentials clears that request); exit if it already has.
    """
    try:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        sys.exit(0)


def _noted(number, frame):
    """
    A SIGTERM's handler: nothing (the loop sees the wake-up descriptor).
    """


def main(argv):
    """
    Run the launcher for the runner whose pid is C{argv[1]}: commands on
    stdin, reports on stdout; as the user C{argv[2]} with the group
    C{argv[3]} and the comma-separated groups C{argv[4]} when they are given.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM writes a byte to a pipe the loop watches: it ends the loop at
    # its next turn, with no exception in the middle of a start or a kill.
    stop, woken = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(woken, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _noted)
    if len(argv) > 2:
        _become(int(argv[2]), int(argv[3]), [int(g) for g in argv[4].split(",") if g])
    _die_with(int(argv[1]))
    # A batch process's wake-up does not preempt the runner: a job is
    # started when a core is free, not in the middle of the runner's answer.
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        pass
    # The pipes to the runner move off 0 and 1 (to descriptors no job
    # inherits); 0 and 1 become /dev/null, so no pipe of a job is ever 0-2.
    commands = os.dup(0)
    reports = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    Launcher(commands, reports, stop).run()


if __name__ == "__main__":
    main(sys.argv)
