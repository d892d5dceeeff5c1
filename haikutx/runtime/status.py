# -*- test-case-name: haikutx.test.test_runtime -*-
"""
C{GET /_haiku/status}: the runtime's state as JSON, for loopback clients.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from haikutx.net.local import is_local_request


class StatusResource(Resource):
    """
    The runtime's status as JSON, answered to local clients only
    (L{is_local_request}: loopback, and not through a proxy).

    @param sources: named callables returning JSON-able parts of the status.
    """

    isLeaf = True

    def __init__(self, sources: dict[str, Callable[[], Any]]) -> None:
        super().__init__()
        self._sources = sources

    def render_GET(self, request: Request) -> bytes:
        if not is_local_request(request):
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"The status is shown to loopback clients only.\n"
        request.setHeader(b"content-type", b"application/json")
        status = {name: source() for name, source in self._sources.items()}
        return json.dumps(status, indent=2, sort_keys=True).encode("utf-8") + b"\n"
