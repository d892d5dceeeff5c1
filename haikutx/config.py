# -*- test-case-name: haikutx.test.test_tap -*-
"""
The frozen configuration of a haikutx process, built once from the command
line by L{haikutx.tap.Options} and passed to every service.
"""

from __future__ import annotations

import os
from pathlib import Path

from attrs import field, frozen


def default_state_directory(euid: int | None = None, home: str | None = None) -> Path:
    """
    The state directory used when C{--state} is not given.

    @param euid: the effective uid (default: this process's).
    @param home: the home directory (default: C{~}).
    @return: C{/var/lib/haikutx} for root, C{~/.haikutx} otherwise.
    """
    if euid is None:
        euid = os.geteuid()
    if euid == 0:
        return Path("/var/lib/haikutx")
    return Path(home if home is not None else os.path.expanduser("~")) / ".haikutx"


def bundled_samples() -> Path:
    """
    The directory of the bundled sample handlers: C{haikutx/samples} in an
    installed copy, the top-level C{samples/} in a source tree.
    """
    package = Path(__file__).resolve().parent
    installed = package / "samples"
    if installed.is_dir():
        return installed
    return package.parent / "samples"


@frozen
class Limits:
    """
    The limits one handler run is held to.

    @ivar max_size: largest handler source accepted, in bytes.
    @ivar max_time: wall-clock limit of one handler run, in seconds.
    @ivar max_console: console bytes kept per request; 0 keeps all.
    @ivar max_memory: address-space limit of a handler process, in bytes,
        and the limit of a stdio handler's processes together.
    @ivar max_procs: processes and threads a handler's run may have at
        once (a Python handler's threads; a stdio handler's processes).
    @ivar max_memory: address-space limit of a handler process, in bytes.
    @ivar max_body: largest request body accepted, in bytes.
    """

    max_size: int = 16384
    max_time: float = 5.0
    max_console: int = 4096
    max_memory: int = 256 * 1024 * 1024
    max_procs: int = 32
    max_body: int = 10 * 1024 * 1024


@frozen
class Config:
    """
    Everything C{twistd haiku} was told, validated.

    Listener fields hold Twisted server endpoint descriptions (or C{None}
    for no listener); durations are in seconds.
    """

    http: str | None = None
    https: str | None = None
    cert: Path | None = None
    key: Path | None = None
    generate_tls: bool = False
    workers: int = 4
    proxy: str | None = None
    no_proxy: tuple[str, ...] = ()
    limits: Limits = field(factory=Limits)
    max_requests: int = 1
    #: requests of one handler running at once (C{None}: C{workers} - 1, at least 1)
    max_concurrency: int | None = None
    #: requests of one handler waiting for a worker (C{None}: 2 x C{workers})
    max_queue: int | None = None
    keepalive_timeout: float = 5.0
    keepalive_interval: float = 5.0
    debug: bool = False
    handlers: Path = field(factory=bundled_samples)
    allow: tuple[str, ...] = ()
    cache_ttl: float = 5.0
    cafile: Path | None = None
    user: str | None = None
    sandbox: bool = True
    serve: Path | None = None
    #: listen on the first free port from the C{http} one (C{--serve} without C{--port})
    port_search: bool = False
    egress_allow: tuple[str, ...] = ()
    state: Path = field(factory=default_state_directory)
    jobs: str | None = None
    #: a PostgreSQL URL shared by several job runners; C{None}: SQLite in C{state}
    jobstore: str | None = None
    whitelist: tuple[str, ...] | None = None
    max_jobs: int = 100
    max_running: int = 2
    job_time: float | None = None
    max_output: int = 1048576
    token: str | None = None
    gates: tuple[str, ...] = ()
    names: Path | None = None
    gate_target: int | None = None
    gate_methods: tuple[str, ...] = ("GET", "POST")
    retire: float | None = None
    idle: float = 420.0
