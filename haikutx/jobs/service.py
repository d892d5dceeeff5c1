# -*- test-case-name: haikutx.test.test_jobs -*-
"""
The job runner as the named service C{jobs} that C{twistd haiku --jobs}
runs: its store, its runner, its listener.
"""

from __future__ import annotations

import os
import pwd
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.usage import UsageError

from haikutx.interfaces import IJobStore
from haikutx.jobs.api import job_site
from haikutx.jobs.runner import JobRunner

#: Connections the job API's listener lets wait to be accepted: 300 clients
#: submitting at once must not be reset.
LISTEN_BACKLOG = 1024


def command_user(user: str | None, euid: int | None = None) -> tuple[int | None, int | None]:
    """
    The uid and gid jobs run as.

    @param user: the C{--user} option.
    @param euid: this process's effective uid (default: the real one).
    @return: C{(None, None)} unless started as root, then the uid and gid of
        C{user} (default C{nobody}); C{user} C{root} keeps root.
    @raise KeyError: for an unknown user.
    """
    if euid is None:
        euid = os.geteuid()
    if euid != 0:
        return None, None
    entry = pwd.getpwnam(user or "nobody")
    if entry.pw_uid == 0:
        return None, None
    return entry.pw_uid, entry.pw_gid


def with_backlog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """
    A TCP or TLS server endpoint description with a C{backlog} of at least
    C{backlog}, unless it sets one itself.
    """
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "ssl") or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def job_store(reactor: Any, config: Any) -> IJobStore:
    """
    The store C{config} asks for: PostgreSQL for a C{--jobstore} URL, else
    SQLite in the state directory.
    """
    if config.jobstore:
        from haikutx.jobs.store.postgresql import PostgreSQLJobStore

        return PostgreSQLJobStore(reactor, config.jobstore)
    from haikutx.jobs.store.sqlite import SQLiteJobStore

    return SQLiteJobStore(reactor, config.state / "jobs.sqlite3")


class JobService(MultiService):
    """
    The job runner as a service: its listener as a child, the runner
    started after it and stopped after it.
    """

    log = Logger()

    def __init__(self, runner: JobRunner) -> None:
        super().__init__()
        self.runner = runner
        self.setName("jobs")
        self._started: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        if self.runner.whitelist is None:
            self.log.warn(
                "the job runner has no --whitelist: every command may be started"
            )
        self._started = Deferred.fromCoroutine(self.runner.start())
        self._started.addErrback(
            lambda f: self.log.failure("the job runner failed to start", f)
        )

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await super().stopService()
        if self._started is not None:
            await self._started
        await self.runner.stop()


def build_jobs_service(reactor: Any, config: Any) -> JobService:
    """
    The C{jobs} service C{config} asks for.

    @param reactor: the reactor.
    @param config: a L{haikutx.config.Config} with C{jobs} set.
    """
    try:
        uid, gid = command_user(config.user)
    except KeyError:
        raise UsageError(f"--user: there is no user {config.user!r}") from None
    if config.user and os.geteuid() != 0:
        JobService.log.warn(
            "--user {user} ignored: not started as root, jobs run as this user",
            user=config.user,
        )
    runner = JobRunner(
        reactor,
        job_store(reactor, config),
        whitelist=config.whitelist,
        max_jobs=config.max_jobs,
        max_running=config.max_running,
        job_time=config.job_time,
        max_output=config.max_output,
        allow=config.allow,
        uid=uid,
        gid=gid,
    )
    service = JobService(runner)
    listener = strports.service(
        with_backlog(config.jobs), job_site(reactor, runner, config.token), reactor=reactor
    )
    listener.setServiceParent(service)
    return service
