# -*- test-case-name: haikutx.test.test_processes -*-
"""
Stopping a child process, the one way every haikutx product does it:
C{SIGTERM}, then C{SIGKILL} if it has not ended after a grace period
(procmon's rule); and how a process ended, said one way for logs and
error messages (L{describe_exit}, L{describe_status}).
"""

from __future__ import annotations

import signal

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


def send_signal(process: IProcessTransport, name: str) -> bool:
    """
    Send signal C{name} (C{"TERM"}, C{"KILL"}, ...) to C{process}.

    @return: C{False} when the process had already exited.
    """
    try:
        process.signalProcess(name)
    except ProcessExitedAlready:
        return False
    return True


def terminate(
    reactor: IReactorTime,
    process: IProcessTransport,
    ended: Deferred[object],
    kill_time: float,
) -> Deferred[None]:
    """
    Stop C{process}: C{TERM} now, C{KILL} after C{kill_time} seconds unless
    C{ended} has fired by then.

    @param reactor: schedules the C{KILL}.
    @param process: the process (what C{spawnProcess} returned).
    @param ended: fires when the process has ended (its protocol's
        C{processEnded}); it is not consumed: its result passes on.
    @param kill_time: the grace period, in seconds.
    @return: a Deferred firing with C{None} once C{ended} has fired.
    """
    done: Deferred[None] = Deferred()
    if not send_signal(process, "TERM"):
        kill = None
    else:
        kill = reactor.callLater(kill_time, _kill, process, kill_time)

    def fired(result: object) -> object:
        if kill is not None and kill.active():
            kill.cancel()
        done.callback(None)
        return result

    ended.addBoth(fired)
    return done


def _kill(process: IProcessTransport, kill_time: float) -> None:
    if send_signal(process, "KILL"):
        log.info(
            "process {pid} did not end {kill_time}s after TERM: killed",
            pid=getattr(process, "pid", None),
            kill_time=kill_time,
        )


def describe_exit(reason: Failure) -> str:
    """
    Name how a process ended, for logs and error messages.

    @param reason: the failure given to C{processEnded}.
    @return: for example C{"was killed by signal 9 (SIGKILL)"} or
        C{"exited with status 1"}.
    """
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exited with status 0"
    if isinstance(value, ProcessTerminated):
        return describe_status(value.exitCode, value.signal)
    return str(value)


def describe_status(code: int | None, number: int | None) -> str:
    """
    Name how a process ended from its exit status or signal.
    """
    if number is not None:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown"
        return f"was killed by signal {number} ({name})"
    return f"exited with status {code}"
