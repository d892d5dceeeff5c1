# -*- test-case-name: haikutx.test.test_jobstore -*-
"""
Jobs of the job runner as frozen values, and their JSON form.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from attrs import evolve, field, frozen

QUEUED = "queued"
RUNNING = "running"
FINISHED = "finished"

#: The callback outcome statuses.
PENDING = "pending"


@frozen
class CallbackOutcome:
    """
    What became of a job's completion callback.

    @ivar status: C{"pending"} while it is being tried, C{"delivered"} once
        the receiver answered 2xx, C{"failed"} when retries ran out,
        C{"refused"} when the URL's address is not allowed.
    @ivar attempts: POSTs made so far.
    @ivar http_status: the last HTTP status received, if any.
    @ivar error: the last failure, as text, if any.
    """

    status: str
    attempts: int = 0
    http_status: int | None = None
    error: str | None = None


@frozen
class Job:
    """
    One job of the job runner, as it is at one moment.

    @ivar id: 40 lower-case hex characters.
    @ivar seq: the order in which jobs were accepted (for "oldest"),
        assigned by the store; 0 until stored.
    @ivar command: the command name as the client gave it.
    @ivar arguments: its arguments.
    @ivar callback: the completion callback URL, if any.
    @ivar state: L{QUEUED}, L{RUNNING} or L{FINISHED}.
    @ivar created: when it was accepted (POSIX seconds).
    @ivar started: when a runner took it, if one did.
    @ivar finished: when it finished, if it did.
    @ivar code: the exit code, once it exited normally.
    @ivar signal: the name of the signal that ended it, if one did.
    @ivar error: why it failed to run or was ended (C{"timeout"},
        C{"stopped"}, C{"interrupted"}, a spawn error), if it did.
    @ivar stdout: the most recent bytes of its standard output.
    @ivar stderr: the most recent bytes of its standard error.
    @ivar stdout_truncated: whether older stdout bytes were dropped.
    @ivar stderr_truncated: whether older stderr bytes were dropped.
    @ivar callback_outcome: what became of the callback, once tried.
    @ivar owner: the runner that runs it or delivers its callback, if any.
    """

    id: str
    seq: int
    command: str
    arguments: tuple[str, ...] = field(converter=tuple)
    callback: str | None = None
    state: str = QUEUED
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    code: int | None = None
    signal: str | None = None
    error: str | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    callback_outcome: CallbackOutcome | None = None
    owner: str | None = None


def iso_time(seconds: float | None) -> str | None:
    """
    ISO 8601 UTC text of a POSIX time, to the millisecond.
    """
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_to_json(job: Job) -> dict[str, Any]:
    """
    The JSON object of a job, as the API answers and callbacks send it.

    @param job: the job.
    @return: a dict of JSON values; output is decoded as UTF-8 with
        invalid bytes replaced.
    """
    outcome = job.callback_outcome
    return {
        "id": job.id,
        "command": job.command,
        "arguments": list(job.arguments),
        "stdout": job.stdout.decode("utf-8", "replace"),
        "stderr": job.stderr.decode("utf-8", "replace"),
        "code": job.code,
        "signal": job.signal,
        "error": job.error,
        "callback": job.callback,
        "state": job.state,
        "created": iso_time(job.created),
        "started": iso_time(job.started),
        "finished": iso_time(job.finished),
        "stdout_truncated": job.stdout_truncated,
        "stderr_truncated": job.stderr_truncated,
        "callback_outcome": (
            None
            if outcome is None
            else {
                "status": outcome.status,
                "attempts": outcome.attempts,
                "http_status": outcome.http_status,
                "error": outcome.error,
            }
        ),
    }


def interrupted(job: Job, owner: str, now: float) -> Job:
    """
    C{job} taken over by C{owner} from a runner that is gone: finished with
    the error C{"interrupted"} if it was running (its callback then
    pending), its pending callback now C{owner}'s to deliver.
    """
    if job.state != RUNNING:
        return evolve(job, owner=owner)
    outcome = job.callback_outcome
    if job.callback is not None:
        outcome = CallbackOutcome(PENDING, outcome.attempts if outcome else 0)
    return evolve(
        job,
        state=FINISHED,
        error=job.error or "interrupted",
        finished=now,
        owner=owner,
        callback_outcome=outcome,
    )
