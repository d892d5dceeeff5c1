# -*- test-case-name: haikutx.test.test_gate -*-
"""
Where a request through the gate goes: C{/<port>/<rest>} to that local
port, C{/<name>/<rest>} to a names-file application (httpGate's rules).
"""

from __future__ import annotations

from attrs import frozen

from haikutx.gate.names import NamesEntry, NamesFile


@frozen
class Route:
    """
    Where one request goes.

    @ivar port: the local port to forward to (0: no forwarding).
    @ivar target: the request target sent to the application.
    @ivar app: the names-file entry, if the request named one.
    @ivar status: for a request the gate answers itself, its status.
    @ivar message: the body of that answer.
    @ivar location: for a redirect, the URL.
    """

    port: int = 0
    target: bytes = b"/"
    app: NamesEntry | None = None
    status: int = 0
    message: str = ""
    location: str | None = None


def route(target: bytes, names: NamesFile, single_port: int | None = None) -> Route:
    """
    Route one request target (httpGate's rules).

    @param target: the origin-form request target, C{/first/rest?query}.
    @param names: the names file in force.
    @param single_port: C{--gate-target}: forward everything here, unchanged.
    @return: the route.
    """
    if not target.startswith(b"/"):
        return Route(status=400, message="only origin-form request targets")
    if single_port is not None:
        return Route(port=single_port, target=target)
    path, qmark, query = target.partition(b"?")
    first, slash, rest = path[1:].partition(b"/")
    forwarded = b"/" + rest + qmark + query
    if first.isdigit():
        port = int(first)
        if not 1024 <= port <= 65535:
            return Route(status=403, message=f"port {port} is not in 1024-65535")
        return Route(port=port, target=forwarded)
    entry = names.get(first.decode("utf-8", "replace")) if first else None
    if entry is None:
        entry = names.default
        forwarded = target
        if entry is None:
            return Route(status=404, message="no such port or application")
    if entry.redirect is not None:
        return Route(status=301, app=entry, location=entry.redirect,
                     message="moved")
    return Route(port=entry.port, target=forwarded, app=entry)


