"""
A real PostgreSQL server for tests: C{initdb} and C{postgres} in a temporary
directory, listening on a unix socket only (no TCP), stopped when the test
process exits. Each test gets a database of its own.

Started as root, the server runs as the C{postgres} user (PostgreSQL refuses
to run as root), and its directory is given to that user.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

BIN_DIRS = tuple(f"/usr/lib/postgresql/{v}/bin" for v in (15, 16, 17))


def find_binaries() -> Path | None:
    """
    The directory holding C{initdb} and C{postgres}, or C{None}.
    """
    for name in BIN_DIRS:
        directory = Path(name)
        if (directory / "initdb").exists() and (directory / "postgres").exists():
            return directory
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).parent
    return None


def why_unavailable() -> str | None:
    """
    Why a test server cannot be started here, or C{None} when it can.
    """
    if find_binaries() is None:
        return "PostgreSQL server binaries (initdb, postgres) are not installed"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run the server as"
    return None


class PostgresServer:
    """
    One PostgreSQL server in a temporary directory.

    @ivar socket_dir: the directory of its unix socket.
    """

    def __init__(self) -> None:
        self._bin = find_binaries()
        assert self._bin is not None
        self._root = Path(tempfile.mkdtemp(prefix="haikutx-pg-"))
        self._data = self._root / "data"
        self.socket_dir = self._root / "socket"
        self._process: subprocess.Popen[bytes] | None = None
        self._databases = 0
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self._root, entry.pw_uid, entry.pw_gid)
            self._user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _run(self, *argv: str) -> None:
        subprocess.run(
            argv,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=120,
            cwd=self._root,
            **self._user,
        )

    def start(self) -> None:
        """
        Create the cluster and start the server; wait (at most 60 s) until
        it accepts connections.
        """
        self._run("mkdir", "-m", "0700", str(self.socket_dir))
        self._run(
            str(self._bin / "initdb"),
            "-D",
            str(self._data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )
        self._process = subprocess.Popen(
            [
                str(self._bin / "postgres"),
                "-D",
                str(self._data),
                "-k",
                str(self.socket_dir),
                "-h",
                "",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=100",
                "-c",
                "shared_buffers=16MB",
                "-c",
                "log_min_messages=fatal",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self._root,
            start_new_session=True,
            **self._user,
        )
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self._process.returncode}")
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def url(self, database: str) -> str:
        """
        The URL of C{database} on this server (over its unix socket).
        """
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"

    def new_database(self) -> str:
        """
        Create an empty database and return its URL.
        """
        import psycopg

        self._databases += 1
        name = f"test_{os.getpid()}_{self._databases}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """
        Stop the server (SIGTERM, then SIGKILL after 10 s) and remove its
        directory.
        """
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)  # "fast" shutdown
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(10)
        shutil.rmtree(self._root, ignore_errors=True)


_server: PostgresServer | None = None


def server() -> PostgresServer:
    """
    The test process's PostgreSQL server, started on first use and stopped
    when the process exits.
    """
    global _server
    if _server is None:
        started = PostgresServer()
        atexit.register(started.stop)
        started.start()
        _server = started
    return _server


def database(case: Any) -> str:
    """
    A fresh database for the test C{case}, or skip it saying why a server
    cannot run here.

    @return: its URL.
    """
    reason = why_unavailable()
    if reason is not None:
        case.skipTest(reason)
    return server().new_database()
