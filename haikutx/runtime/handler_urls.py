# -*- test-case-name: haikutx.test.test_fetch -*-
"""
What a handler URL may be, as the handler fetcher reads it, and the errors
a fetch answers with: their status and their one-line message, which never
shows a URL's credentials.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from attrs import frozen
from OpenSSL import SSL
from twisted.internet.error import (
    ConnectError,
    ConnectionClosed,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.web.client import ResponseFailed

from haikutx.net.outbound import ProxyRefused
from haikutx.net.urls import redact_url

UNSUPPORTED_PROTOCOL = (
    "The x-haiku-handler parameter specifies unsupported protocol. "
    "Only http and https are supported."
)


class HandlerFetchError(Exception):
    """
    The handler could not be fetched: the runtime answers C{status} with the
    one-line C{message}.
    """

    def __init__(self, status: int, message: str) -> None:
        message = " ".join(message.split())
        super().__init__(status, message)
        self.status = status
        self.message = message


def refused(url: str, reason: str) -> HandlerFetchError:
    """
    The error (403) for a handler URL the address rules refuse.
    """
    return HandlerFetchError(
        403, f"The handler URL {redact_url(url)} is not allowed: {reason}"
    )


def unable(url: str, error: str) -> HandlerFetchError:
    """
    The error (502) for a handler whose origin could not be fetched.
    """
    return HandlerFetchError(
        502, f"Unable to obtain HTTP handler code from {redact_url(url)}: {error}"
    )


def with_allow_hint(reason: str, target: Target) -> str:
    """
    The reason a handler URL's address was refused, with the C{--allow}
    prefix that would allow it (the operator's choice, for handlers served
    from this machine or a private network).
    """
    host = f"[{target.host}]" if ":" in target.host else target.host
    return (
        f"{reason}; the server allows it when started with "
        f"--allow {target.scheme}://{host}:{target.port}/"
    )


def too_large(max_size: int) -> HandlerFetchError:
    """
    The error (400) for a handler larger than C{--maxsize}.
    """
    return HandlerFetchError(
        400, f"The size of the handler exceeded the quota of {max_size} bytes."
    )


@frozen
class Target:
    """
    A handler URL split as the fetcher reads it.

    @ivar url: the URL as given.
    @ivar scheme: C{http} or C{https}.
    @ivar host: its host, lower case, without brackets.
    @ivar port: its port, or the scheme's.
    @ivar target: the request target (path and query).
    """

    url: str
    scheme: str
    host: str
    port: int
    target: str


def parse_handler_url(url: str) -> Target:
    """
    Split a handler URL, refusing what the HTTP client would read otherwise
    than these rules (credentials, bad ports).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise HandlerFetchError(
            400, f"The handler URL {redact_url(url)} is not a valid URL."
        ) from None
    if parts.scheme not in ("http", "https"):
        raise HandlerFetchError(400, UNSUPPORTED_PROTOCOL)
    if (
        not parts.hostname
        or "@" in parts.netloc
        or any(c.isspace() or c == "\\" for c in url)
        or not url.isascii()
    ):
        raise HandlerFetchError(400, f"The handler URL {redact_url(url)} is not a valid URL.")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Target(
        url=url,
        scheme=parts.scheme,
        host=parts.hostname.lower(),
        port=port or (443 if parts.scheme == "https" else 80),
        target=target,
    )


def describe_failure(error: BaseException) -> str:
    """
    One line naming why a fetch failed.
    """
    if isinstance(error, ResponseFailed) or hasattr(error, "reasons"):
        reasons = [describe_failure(r.value) for r in getattr(error, "reasons", [])]
        return "; ".join(dict.fromkeys(reasons)) or type(error).__name__
    if isinstance(error, ProxyRefused):
        return str(error)
    if isinstance(error, SSL.Error):
        details = []
        for item in error.args[0] if error.args else []:
            details.append(item[-1] if isinstance(item, tuple) else str(item))
        return "TLS failure: " + (", ".join(details) or "handshake failed")
    name = type(error).__name__
    if name in ("VerificationError", "CertificateError"):
        return "TLS failure: the certificate does not name this host"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, DNSLookupError):
        return "DNS lookup failed"
    if isinstance(error, TimeoutError):
        return "connection timed out"
    if isinstance(error, ConnectionClosed):
        return "connection closed by the origin"
    if isinstance(error, ConnectError):
        return f"cannot connect: {error}"
    return f"{name}: {error}"
