# -*- test-case-name: haikutx.test.test_jobstore -*-
"""
One job as one table row, the same for every SQL store: the column names,
and the conversions between a L{Job} and a row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from haikutx.jobs.job import CallbackOutcome, Job

#: Every column of the jobs table, in the order L{to_row} gives them.
COLUMNS: tuple[str, ...] = (
    "id",
    "seq",
    "command",
    "arguments",
    "callback",
    "state",
    "created",
    "started",
    "finished",
    "code",
    "signal",
    "error",
    "stdout",
    "stderr",
    "stdout_truncated",
    "stderr_truncated",
    "callback_status",
    "callback_attempts",
    "callback_http_status",
    "callback_error",
    "owner",
)

#: The columns a new job is inserted with (C{seq} is the table's).
INSERTED: tuple[str, ...] = tuple(c for c in COLUMNS if c != "seq")

#: The columns L{save} replaces (everything but the key and the order).
UPDATED: tuple[str, ...] = tuple(c for c in COLUMNS if c not in ("id", "seq"))


def to_row(job: Job) -> dict[str, Any]:
    """
    The column values of C{job}.
    """
    outcome = job.callback_outcome
    return {
        "id": job.id,
        "seq": job.seq,
        "command": job.command,
        "arguments": json.dumps(list(job.arguments)),
        "callback": job.callback,
        "state": job.state,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "code": job.code,
        "signal": job.signal,
        "error": job.error,
        "stdout": bytes(job.stdout),
        "stderr": bytes(job.stderr),
        "stdout_truncated": bool(job.stdout_truncated),
        "stderr_truncated": bool(job.stderr_truncated),
        "callback_status": None if outcome is None else outcome.status,
        "callback_attempts": None if outcome is None else outcome.attempts,
        "callback_http_status": None if outcome is None else outcome.http_status,
        "callback_error": None if outcome is None else outcome.error,
        "owner": job.owner,
    }


def from_row(row: Sequence[Any]) -> Job:
    """
    The L{Job} of a row selected as L{COLUMNS}.
    """
    values = dict(zip(COLUMNS, row, strict=True))
    status = values.pop("callback_status")
    attempts = values.pop("callback_attempts")
    http_status = values.pop("callback_http_status")
    error = values.pop("callback_error")
    outcome = (
        None if status is None else CallbackOutcome(status, attempts or 0, http_status, error)
    )
    values["arguments"] = tuple(json.loads(values["arguments"]))
    values["stdout"] = bytes(values["stdout"])
    values["stderr"] = bytes(values["stderr"])
    values["stdout_truncated"] = bool(values["stdout_truncated"])
    values["stderr_truncated"] = bool(values["stderr_truncated"])
    return Job(callback_outcome=outcome, **values)
