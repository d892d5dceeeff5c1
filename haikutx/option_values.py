# -*- test-case-name: haikutx.test.test_tap -*-
"""
The checks of C{twistd haiku}'s option values: each turns what the command
line (or the environment) says into a value, or raises L{usage.UsageError}
naming the option and what is wrong with it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.python import usage

#: What turns a listening option off.
NONE = "none"


def cpus() -> int:
    return os.cpu_count() or 1


def whole_number(option: str, value: Any, minimum: int = 0, maximum: int | None = None) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{option}: {value!r} is not a whole number") from None
    if number < minimum or (maximum is not None and number > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"{minimum}-{maximum}"
        raise usage.UsageError(f"--{option}: {number} is out of range ({bounds})")
    return number


def number(option: str, value: Any, minimum: float = 0.0) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{option}: {value!r} is not a number") from None
    if number < minimum:
        raise usage.UsageError(f"--{option}: {value} is below {minimum}")
    return number


def existing_path(option: str, value: str, directory: bool = False) -> Path:
    path = Path(value).expanduser().absolute()
    if directory and not path.is_dir():
        raise usage.UsageError(f"--{option}: {value} is not a directory")
    if not directory:
        try:
            with path.open("rb"):
                pass
        except OSError as e:
            raise usage.UsageError(f"--{option}: cannot read {value}: {e.strerror}") from None
    return path


def quote(value: str) -> str:
    from twisted.internet.endpoints import quoteStringArgument

    return quoteStringArgument(value)


def listener(option: str, value: str, bare: str) -> tuple[str | None, int | None]:
    """
    Turn a listening option into an endpoint description.

    @param option: the option's name, for errors.
    @param value: a port number, an endpoint string or C{none}.
    @param bare: the description a bare port becomes, with C{{port}}.
    @return: the description (C{None} for C{none}) and the bare port number,
        if one was given.
    @raise usage.UsageError: for a bad port or endpoint string.
    """
    value = str(value).strip()
    if value.lower() == NONE:
        return None, None
    if value.isdigit():
        port = whole_number(option, value, 0, 65535)
        return bare.format(port=port), port
    if ":" not in value:
        raise usage.UsageError(
            f"--{option}: {value!r} is neither a port number, an endpoint "
            f"string nor 'none'"
        )
    check_endpoint(option, value)
    return value, None


def check_endpoint(option: str, description: str) -> None:
    """
    Build a server endpoint from C{description} once, so that an unknown
    endpoint type or an unreadable key stops start-up.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, description)
    except (ValueError, OSError, TypeError, KeyError) as e:
        raise usage.UsageError(f"--{option}: {description!r}: {e}") from None
    except Exception as e:  # pyOpenSSL errors for bad PEM files
        raise usage.UsageError(f"--{option}: {description!r}: {e!r}") from None


def proxy_from_environ(environ: dict[str, str]) -> str | None:
    """
    The C{host:port} of the HTTP proxy named by C{HTTPS_PROXY} or
    C{HTTP_PROXY} (either case), scheme and credentials stripped.

    @param environ: the environment to read.
    @return: C{host:port}, or C{None} when no proxy is set.
    """
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        value = environ.get(name, "").strip()
        if value:
            return proxy_address(name, value)
    return None


def no_proxy_from_environ(environ: dict[str, str]) -> tuple[str, ...]:
    """
    The hosts C{NO_PROXY} (either case) says to reach without the proxy.

    @param environ: the environment to read.
    @return: the comma-separated entries, stripped.
    """
    value = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
    return tuple(e.strip() for e in value.split(",") if e.strip())


def proxy_address(option: str, value: str) -> str:
    parsed = urlsplit(value if "://" in value else "http://" + value)
    try:
        port = parsed.port or 80
    except ValueError:
        raise usage.UsageError(f"--{option}: {value!r} has a bad port") from None
    if not parsed.hostname:
        raise usage.UsageError(f"--{option}: {value!r} names no host")
    host = parsed.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def jobstore_url(value: str | None) -> str | None:
    """
    Check C{--jobstore}: a PostgreSQL URL, or nothing.
    """
    if value is None:
        return None
    if not value.startswith(("postgresql://", "postgres://")):
        raise usage.UsageError(
            f"--jobstore: {value!r} is not a PostgreSQL URL (postgresql://user@host/db)"
        )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise usage.UsageError(
            "--jobstore: a PostgreSQL store needs psycopg (pip install 'haikutx[postgresql]')"
        ) from None
    return value

def names_file(value: str) -> Path:
    """
    Check that the gate's names file reads and parses.

    @raise usage.UsageError: naming C{--names} and the bad line.
    """
    from haikutx.gate.names import NamesFile, NamesFileError

    path = existing_path("names", value)
    try:
        NamesFile.parse(path.read_text())
    except UnicodeDecodeError as e:
        raise usage.UsageError(f"--names: {value} is not UTF-8 text: {e}") from None
    except NamesFileError as e:
        raise usage.UsageError(f"--names: {value}: {e}") from None
    return path


def host_port(option: str, value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise usage.UsageError(f"--{option}: {value!r} is not host:port")
    return host.strip("[]"), whole_number(option, port, 1, 65535)


def check_pem_pair(cert: Path, key: Path) -> None:
    from twisted.internet.ssl import PrivateCertificate

    try:
        PrivateCertificate.loadPEM(cert.read_bytes() + b"\n" + key.read_bytes())
    except Exception as e:
        raise usage.UsageError(
            f"--cert/--key: {cert} and {key} are not a matching PEM "
            f"certificate and key: {e!r}"
        ) from None
