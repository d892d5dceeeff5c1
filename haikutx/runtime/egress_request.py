# -*- test-case-name: haikutx.test.test_egress -*-
"""
What a request to the egress proxy means: a C{CONNECT host:port}, or an
absolute-form plain HTTP request and the head to send upstream for it;
read strictly (L{haikutx.net.http1}), refused with a status and a reason.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from haikutx.net.addresses import ip_from_host
from haikutx.net.http1 import BadMessage, end_to_end, parse_request_head

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+)$")
_PORT = re.compile(r"^[0-9]{1,5}$")


class BadRequest(ValueError):
    """
    A request the proxy cannot serve.

    @ivar status: the status to answer with.
    @ivar reason: one line saying why.
    """

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def parse_authority(authority: str) -> tuple[str, int]:
    """
    Parse a C{host:port} as a C{CONNECT} target or URL authority gives it.

    @return: the host (brackets kept for IPv6) and the port.
    @raise BadRequest: for a missing or bad host or port.
    """
    host, sep, port = authority.rpartition(":")
    if not sep or not host or not _PORT.match(port) or not _HOST.match(host):
        raise BadRequest(f"bad host:port {authority[:100]!r}")
    number = int(port)
    if not 0 < number < 65536:
        raise BadRequest(f"bad port in {authority[:100]!r}")
    if host.startswith("[") and ip_from_host(host) is None:
        raise BadRequest(f"bad IPv6 address in {authority[:100]!r}")
    return host, number


def parse_head(head: bytes) -> tuple[str, str, int, bytes | None]:
    """
    Parse a proxy request's head (without the blank line that ends it),
    strictly (L{haikutx.net.http1}).

    @return: C{(method, host, port, upstream_head)} where C{upstream_head}
        is the head to send upstream for plain HTTP (origin-form target,
        hop-by-hop headers removed, C{Connection: close}), or C{None} for
        C{CONNECT}.
    @raise BadRequest: for a request the proxy cannot serve.
    """
    try:
        request = parse_request_head(head, require_host=False)
    except BadMessage as e:
        raise BadRequest(e.reason, e.status) from None
    method = request.method.decode("ascii")
    target = request.target.decode("ascii")
    if method == "CONNECT":
        host, port = parse_authority(target)
        return method, host, port, None
    if target.lower().startswith("https://"):
        raise BadRequest("https URLs are proxied with CONNECT")
    if not target.lower().startswith("http://"):
        raise BadRequest(
            "not a proxy request: expected CONNECT host:port or an absolute http:// URL"
        )
    url = urlsplit(target)
    authority = url.netloc
    if "@" in authority:
        raise BadRequest("URL has credentials")
    if not authority:
        raise BadRequest("URL has no host")
    if authority.endswith("]") or ":" not in authority:
        authority += ":80"
    host, port = parse_authority(authority)
    origin = url.path or "/"
    if url.query:
        origin += "?" + url.query
    out = [b"%s %s %s" % (request.method, origin.encode("ascii"), request.version)]
    fields = end_to_end(request)
    for name, value in fields:
        out.append(name + b": " + value)
    if request.get(b"host") is None:
        out.append(b"host: " + url.netloc.encode("ascii"))
    if request.chunked:
        out.append(b"transfer-encoding: chunked")
    out.append(b"connection: close")
    return method, host, port, b"\r\n".join(out) + b"\r\n\r\n"
