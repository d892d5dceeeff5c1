# -*- test-case-name: haikutx.test.test_gate -*-
"""
Where a request through the gate goes: C{/<port>/<rest>} to that local
port, C{/<name>/<rest>} to a names-file application (httpGate's rules).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from haikutx import metrics
from haikutx.gate.names import NamesEntry, NamesFile
from haikutx.net.http1 import Head


class Route(NamedTuple):
    """
    Where one request goes (an immutable value; a named tuple rather than
    an attrs class because one is built per request).

    @ivar port: the local port to forward to (0: no forwarding).
    @ivar target: the request target sent to the application.
    @ivar app: the names-file entry, if the request named one.
    @ivar status: for a request the gate answers itself, its status.
    @ivar message: the body of that answer.
    @ivar location: for a redirect, the URL.
    @ivar headers: extra header fields of the gate's own answer.
    """

    port: int = 0
    target: bytes = b"/"
    app: NamesEntry | None = None
    status: int = 0
    message: str = ""
    location: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()


def route(target: bytes, names: NamesFile, single_port: int | None = None) -> Route:
    """
    Route one request target (httpGate's rules).

    @param target: the origin-form request target, C{/first/rest?query}.
    @param names: the names file in force.
    @param single_port: C{--gate-target}: forward everything here, unchanged.
    @return: the route.
    """
    if target[:1] != b"/":
        return Route(status=400, message="only origin-form request targets")
    if single_port is not None:
        return Route(single_port, target)
    # The first path segment ends at the second "/" or at "?" (or the end).
    cut = target.find(b"/", 1)
    query = target.find(b"?", 1)
    if cut < 0 or 0 <= query < cut:
        cut = query if query >= 0 else len(target)
        first = target[1:cut]
        forwarded = b"/" + target[cut:]
    else:
        first = target[1:cut]
        forwarded = target[cut:]
    if first.isdigit():
        port = int(first)
        if not 1024 <= port <= 65535:
            return Route(status=403, message=f"port {port} is not in 1024-65535")
        return Route(port, forwarded)
    entry = names.get(first.decode("utf-8", "replace")) if first else None
    if entry is None:
        entry = names.default
        forwarded = target
        if entry is None:
            return Route(status=404, message="no such port or application")
    if entry.redirect is not None:
        return Route(status=301, app=entry, location=entry.redirect, message="moved",
                     headers=((b"Location", entry.redirect.encode()),))
    return Route(port=entry.port, target=forwarded, app=entry)




def route_request(
    head: Head, methods: tuple[str, ...], names: NamesFile, single_port: int | None = None
) -> Route:
    """
    Route one parsed request: a method the gate does not forward is 405
    (with C{Allow}), else L{route} decides.
    """
    method = head.method.decode("ascii")
    if method not in methods:
        return Route(status=405, message=f"method {method} is not forwarded",
                     headers=((b"Allow", ", ".join(methods).encode()),))
    return route(head.target, names, single_port)


_counters: dict[tuple[str, int], Any] = {}


def count_request(where: Route | None, status: int, answered_by_application: bool) -> None:
    """
    Count one request the gate forwarded or answered, in
    L{metrics.GATE_REQUESTS}: by its names entry, or by its port when an
    application on it answered (so the labels stay as few as the
    applications that answer), else as C{-}.
    """
    if where is not None and where.app is not None:
        app = where.app.name
    elif where is not None and where.port and answered_by_application:
        app = str(where.port)
    else:
        app = "-"
    child = _counters.get((app, status))
    if child is None:
        child = _counters[app, status] = metrics.GATE_REQUESTS.labels(app=app, status=status)
    child.inc()
