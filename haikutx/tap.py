# -*- test-case-name: haikutx.test.test_tap -*-
"""
The C{twistd haiku} command line: L{Options} validates everything and freezes
it into a L{Config}; L{makeService} composes the named services.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from twisted.python import usage

from haikutx.config import Config, Limits, bundled_samples, default_state_directory
from haikutx.option_values import (
    NONE,
    check_endpoint,
    check_pem_pair,
    cpus,
    existing_path,
    host_port,
    jobstore_url,
    listener,
    names_file,
    no_proxy_from_environ,
    number,
    proxy_address,
    proxy_from_environ,
    quote,
    whole_number,
)

__all__ = ["Options", "makeService", "no_proxy_from_environ", "proxy_from_environ"]


class Options(usage.Options):
    """
    Options of C{twistd haiku}: the runtime, the job runner and the gate.
    """

    synopsis = "[options]"
    longdesc = (
        "Runs handlers fetched by URL in sandboxed worker processes: "
        "http://host/?x-haiku-handler=<URL or name>; also a job runner (--jobs) "
        "and a gate (--gate). The runtime starts unless --jobs, --gate or "
        "--gate-target is given without --port, --sslport or --serve. Listening "
        "options take a port number, a Twisted endpoint string or 'none'. "
        "Durations are in milliseconds unless stated. 'haiku ARGS' is "
        "'twistd -n --pidfile= haiku ARGS'; JSON logs: "
        "'twistd -n --logger haikutx.logs.json haiku ...'. The full reference "
        "is doc/options.md."
    )

    optFlags = [
        ["debug", "d", "Also write handler console output to the server log."],
        ["languages", None, "Print the handler languages available here and exit."],
    ]

    optParameters = [
        ["cert", "c", None, "PEM server certificate (default: a generated self-signed one)."],
        ["key", "k", None, "PEM private key of --cert."],
        ["workers", "w", None, "Number of sandbox workers [default: 4 x CPUs]."],
        ["proxy", "x", None, "host:port of an HTTP proxy for fetching handler code "
         "[default: $HTTPS_PROXY / $HTTP_PROXY]."],
        ["maxsize", "i", "16384", "Maximum handler size in bytes."],
        ["maxtime", "t", "5000", "Wall-clock limit of one handler run in ms."],
        ["maxrequests", "r", "1", "Requests a worker process serves before it is "
         "replaced; 0 = never."],
        ["keepalive-timeout", "a", "5000", "ms a worker has to answer a heartbeat."],
        ["keepalive-interval", "v", "5000", "ms between heartbeat challenges."],
        ["maxconsole", "l", "4096", "Console bytes kept per request; 0 = unlimited."],
        ["maxmemory", None, "256", "Memory limit of a handler run in MiB (the address "
         "space of each process; a stdio handler's processes also together)."],
        ["maxprocs", None, "32", "Processes and threads a handler's run may have at "
         "once (Python handlers start no processes)."],
        ["maxbody", None, "10485760", "Largest request body accepted, in bytes: 413 "
         "beyond it, refused from Content-Length before the body is read."],
        ["maxconcurrency", None, None, "Requests of one handler running at once "
         "[default: --workers - 1, at least 1: one worker is always left for the "
         "other handlers]."],
        ["maxqueue", None, None, "Requests of one handler waiting for a worker; "
         "beyond them, 429 at once [default: 2 x --workers]."],
        ["handlers", None, None, "Directory of local handlers named by a relative "
         "x-haiku-handler, read from inside it only (symlinks that lead out are "
         "refused) [default: the bundled samples]."],
        ["cache-ttl", None, "5", "Seconds a fetched handler without caching headers, "
         "or a local one, stays fresh in memory."],
        ["cafile", None, None, "Extra CA certificates (PEM) for https handler origins."],
        ["user", None, None, "Unprivileged user for handler processes and jobs "
         "[default as root: a uid of its own per worker slot for handlers, "
         "nobody for jobs]."],
        ["serve", None, None, "Serve this one local handler file for every request "
         "(without --port: the first free port from 3000)."],
        ["state", None, None, "State directory [default: ~/.haikutx, or "
         "/var/lib/haikutx for root]."],
        ["jobs", None, None, "Listener of the job runner (a bare port listens on "
         "127.0.0.1)."],
        ["jobstore", None, None, "Where jobs are kept: a PostgreSQL URL "
         "(postgresql://user@host/db) shared by every job runner pointed at it "
         "[default: SQLite in the state directory]."],
        ["whitelist", None, None, "Comma-separated commands the job runner may start "
         "[default: all]."],
        ["maxjobs", None, "100", "Finished jobs kept."],
        ["maxrunning", None, None, "Jobs running at once [default: 2 x CPUs]."],
        ["jobtime", None, None, "Wall-clock limit of one job in seconds."],
        ["maxoutput", None, "1048576", "Bytes of stdout and of stderr kept per job."],
        ["token", None, None, "Bearer token the job runner requires."],
        ["names", None, None, "The gate's names file."],
        ["gate-target", None, None, "Forward every gate request to this local port."],
        ["gate-methods", None, "GET,POST", "Methods the gate forwards."],
        ["retire", None, None, "Minutes after which an idle application the gate "
         "started is stopped."],
        ["idle", None, "420", "Seconds after which an idle gate connection is closed."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["allow"] = []
        self["egress-allow"] = []
        self["gate"] = []
        self["port"] = "80"
        self["sslport"] = "443"
        self._given: set[str] = set()

    def opt_allow(self, prefix: str) -> None:
        """
        Allow handler URLs and job callbacks starting with this prefix
        (repeatable); private and loopback addresses are refused unless a
        prefix allows them.
        """
        self["allow"].append(prefix)

    def opt_egress_allow(self, address: str) -> None:
        """
        host:port that handlers may connect to although it is loopback or private (repeatable).
        """
        self["egress-allow"].append(address)

    def opt_gate(self, listener: str) -> None:
        """
        Listener of the gate (repeatable; a port, an endpoint string).
        """
        self["gate"].append(listener)

    def opt_port(self, value: str) -> None:
        """
        HTTP listener of the runtime (port, endpoint or none) [default: 80].
        """
        self._given.add("port")
        self["port"] = value

    opt_p = opt_port

    def opt_sslport(self, value: str) -> None:
        """
        HTTPS listener of the runtime (port, endpoint or none) [default: 443].
        """
        self._given.add("sslport")
        self["sslport"] = value

    opt_s = opt_sslport

    def opt_version(self) -> NoReturn:
        """
        Print haikutx's version (and Twisted's and Python's) and exit.
        """
        import platform

        import twisted
        from haikutx import __version__

        print(
            f"haikutx {__version__} (Twisted {twisted.__version__}, "
            f"Python {platform.python_version()})"
        )
        raise SystemExit(0)

    def _runtime_wanted(self) -> bool:
        """
        Whether the runtime runs: unless the job runner or the gate is asked
        for without a runtime listener (C{--port}, C{--sslport}, C{--serve}).
        """
        others = self["jobs"] or self["gate"] or self["gate-target"] is not None
        return not others or bool(self._given & {"port", "sslport"}) or bool(self["serve"])

    def postOptions(self) -> None:
        """
        Validate every option and freeze the result into C{self.config}.
        """
        if self["languages"]:
            return
        runtime = self._runtime_wanted()
        http, http_port = listener("port", self["port"], "tcp:{port}")
        https, https_port = None, None
        cert = key = None
        state = (
            Path(self["state"]).expanduser().absolute()
            if self["state"]
            else default_state_directory()
        )
        if (self["cert"] is None) != (self["key"] is None):
            raise usage.UsageError("--cert and --key must be given together")
        if self["cert"] is not None:
            cert = existing_path("cert", self["cert"])
            key = existing_path("key", self["key"])
            check_pem_pair(cert, key)
        generate_tls = False
        sslport = str(self["sslport"]).strip()
        if sslport.lower() != NONE:
            if sslport.isdigit():
                https_port = whole_number("sslport", sslport, 0, 65535)
                if cert is None:
                    generate_tls = True
                    cert, key = state / "tls" / "cert.pem", state / "tls" / "key.pem"
                assert key is not None
                https = (
                    f"ssl:{https_port}:privateKey={quote(str(key))}"
                    f":certKey={quote(str(cert))}"
                )
            elif sslport.startswith("ssl:") and "privateKey=" not in sslport:
                # An ssl endpoint naming no key uses --cert/--key or the
                # generated pair.
                if cert is None:
                    generate_tls = True
                    cert, key = state / "tls" / "cert.pem", state / "tls" / "key.pem"
                assert key is not None
                https = (
                    f"{sslport}:privateKey={quote(str(key))}:certKey={quote(str(cert))}"
                )
                if not generate_tls:
                    check_endpoint("sslport", https)
            else:
                https, _ = listener("sslport", sslport, "")
        if http_port and http_port == https_port:
            raise usage.UsageError(
                f"--port and --sslport must differ (both are {http_port})"
            )

        serve = None
        port_search = False
        if self["serve"]:
            serve = existing_path("serve", self["serve"])
            if "port" not in self._given:
                http = "tcp:3000"
                port_search = True
            if "sslport" not in self._given:
                https, generate_tls = None, False
        if not runtime:
            http, https, generate_tls = None, None, False

        jobs = None
        if self["jobs"]:
            jobs, _ = listener("jobs", self["jobs"], "tcp:{port}:interface=127.0.0.1")
        gates = []
        for gate in self["gate"]:
            description, _ = listener("gate", gate, "tcp:{port}")
            if description is not None:
                gates.append(description)
        if http is None and https is None and jobs is None and not gates:
            raise usage.UsageError(
                "nothing to serve: every listener (--port, --sslport, --jobs, "
                "--gate) is off"
            )

        proxy = (
            proxy_address("proxy", self["proxy"])
            if self["proxy"]
            else proxy_from_environ(dict(os.environ))
        )
        whitelist = None
        if self["whitelist"] is not None:
            whitelist = tuple(c.strip() for c in self["whitelist"].split(",") if c.strip())
        if self["user"] is not None:
            import pwd

            try:
                pwd.getpwnam(self["user"])
            except KeyError:
                raise usage.UsageError(f"--user: there is no user {self['user']!r}") from None
        for allowed in self["egress-allow"]:
            host_port("egress-allow", allowed)
        for prefix in self["allow"]:
            if urlsplit(prefix).scheme not in ("http", "https"):
                raise usage.UsageError(
                    f"--allow: {prefix!r} must start with http:// or https://"
                )

        self.config = Config(
            http=http,
            https=https,
            cert=cert,
            key=key,
            generate_tls=generate_tls,
            workers=(
                whole_number("workers", self["workers"], 1)
                if self["workers"] is not None
                else 4 * cpus()
            ),
            proxy=proxy,
            no_proxy=no_proxy_from_environ(dict(os.environ)),
            limits=Limits(
                max_size=whole_number("maxsize", self["maxsize"], 1),
                max_time=whole_number("maxtime", self["maxtime"], 1) / 1000.0,
                max_console=whole_number("maxconsole", self["maxconsole"], 0),
                max_memory=whole_number("maxmemory", self["maxmemory"], 16) * 1024 * 1024,
                max_procs=whole_number("maxprocs", self["maxprocs"], 1, 65536),
                max_body=whole_number("maxbody", self["maxbody"], 0),
            ),
            max_requests=whole_number("maxrequests", self["maxrequests"], 0),
            max_concurrency=(
                whole_number("maxconcurrency", self["maxconcurrency"], 1)
                if self["maxconcurrency"] is not None
                else None
            ),
            max_queue=(
                whole_number("maxqueue", self["maxqueue"], 0)
                if self["maxqueue"] is not None
                else None
            ),
            keepalive_timeout=whole_number("keepalive-timeout", self["keepalive-timeout"], 1)
            / 1000.0,
            keepalive_interval=whole_number("keepalive-interval", self["keepalive-interval"], 1)
            / 1000.0,
            debug=bool(self["debug"]),
            handlers=(
                existing_path("handlers", self["handlers"], directory=True)
                if self["handlers"]
                else bundled_samples()
            ),
            allow=tuple(self["allow"]),
            cache_ttl=number("cache-ttl", self["cache-ttl"]),
            cafile=existing_path("cafile", self["cafile"]) if self["cafile"] else None,
            user=self["user"],
            serve=serve,
            port_search=port_search,
            egress_allow=tuple(self["egress-allow"]),
            state=state,
            jobs=jobs,
            jobstore=jobstore_url(self["jobstore"]),
            whitelist=whitelist,
            max_jobs=whole_number("maxjobs", self["maxjobs"], 1),
            max_running=(
                whole_number("maxrunning", self["maxrunning"], 1)
                if self["maxrunning"] is not None
                else 2 * cpus()
            ),
            job_time=(
                number("jobtime", self["jobtime"], 0.001)
                if self["jobtime"] is not None
                else None
            ),
            max_output=whole_number("maxoutput", self["maxoutput"], 1),
            token=self["token"],
            gates=tuple(gates),
            names=names_file(self["names"]) if self["names"] else None,
            gate_target=(
                whole_number("gate-target", self["gate-target"], 1, 65535)
                if self["gate-target"] is not None
                else None
            ),
            gate_methods=tuple(
                m.strip().upper() for m in self["gate-methods"].split(",") if m.strip()
            ),
            retire=(
                number("retire", self["retire"], 0.001) * 60
                if self["retire"] is not None
                else None
            ),
            idle=number("idle", self["idle"], 0.001),
        )


def _report_listen_failures_in_one_line() -> None:
    """
    Have a L{haikutx.service.ListenFailed} that ends C{twistd} print one
    line on standard error instead of a traceback; twistd has removed its
    pidfile by then, and the exit status is 1.
    """
    from haikutx.service import ListenFailed

    previous = sys.excepthook

    def excepthook(kind: Any, value: BaseException, traceback: Any) -> None:
        if isinstance(value, ListenFailed):
            stream = sys.__stderr__ or sys.stderr
            stream.write(f"{value}\n")
            stream.flush()
        else:
            previous(kind, value, traceback)

    sys.excepthook = excepthook


def makeService(options: Options):
    """
    Compose the services C{options} asks for.

    @param options: parsed L{Options}.
    @return: a L{MultiService} with children named C{pool} and C{runtime}
        (when the runtime runs), C{jobs} and C{gate} (when asked for).
    """
    from twisted.internet import reactor

    from haikutx.service import build_service

    if options["languages"]:
        from haikutx.languages import print_languages

        print_languages()
        raise SystemExit(0)
    _report_listen_failures_in_one_line()
    return build_service(reactor, options.config)
