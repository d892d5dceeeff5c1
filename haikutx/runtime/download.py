# -*- test-case-name: haikutx.test.test_fetch -*-
"""
The handler fetcher's HTTP client parts: a size-capped reader of response
bodies, a connection pool that takes nothing back once closed, the trust
root for https origins, and the C{NO_PROXY} rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# IOpenSSLTrustRoot is how Twisted lets a trust root add CAs to a context;
# it has no public import path, and platformTrust() can only replace.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import platformTrust
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from zope.interface import implementer

from haikutx.runtime.handler_urls import too_large


def bypasses_proxy(host: str, no_proxy: tuple[str, ...]) -> bool:
    """
    Whether C{host} is reached directly although a proxy is set, by the
    usual C{NO_PROXY} rules: C{*} matches every host, C{example.com} and
    C{.example.com} match it and its subdomains, an IP address matches
    itself; a C{:port} suffix is ignored.

    @param host: a URL host, lower case, without brackets.
    @param no_proxy: the C{NO_PROXY} entries.
    """
    host = host.strip("[]").lower().rstrip(".")
    for entry in no_proxy:
        entry = entry.strip().lower()
        if entry == "*":
            return True
        if entry.startswith("["):
            entry = entry[1:].split("]", 1)[0]
        elif entry.count(":") == 1:
            entry = entry.split(":", 1)[0]
        entry = entry.lstrip(".").rstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


class _Body(Protocol):
    """
    Collects a response body of at most C{max_size} bytes; aborts the
    download at the first byte over it.
    """

    transport: Any

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[bytes]) -> None:
        self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._max_size:
            self.done.errback(too_large(self._max_size))
            self._abort()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


async def read_body(response: IResponse, max_size: int) -> bytes:
    """
    The body of C{response}, at most C{max_size} bytes.

    @raise HandlerFetchError: (400) past C{max_size}.
    """
    body = _Body(max_size)
    response.deliverBody(body)
    return await body.done


def abandon(response: IResponse) -> None:
    """
    Read none of C{response}'s body: its connection is closed.
    """
    body = _Body(0)
    response.deliverBody(body)
    body.done.addErrback(lambda f: None)
    body.done.cancel()


async def discard(response: IResponse, max_size: int) -> None:
    """
    Read and drop C{response}'s body (at most C{max_size} bytes), so that
    its connection can serve again; a failure to read it is ignored.
    """
    try:
        await read_body(response, max_size)
    except CancelledError:
        raise
    except Exception:
        pass


class _QuietClientFactory(_HTTP11ClientFactory):
    """
    The pool's connection factory, without a log line per connection.
    """

    noisy = False


class ClosingPool(HTTPConnectionPool):
    """
    A connection pool that takes no connection back once closed: a response
    that completes after L{HandlerFetcher.close} (or after its download was
    abandoned mid-packet) is closed instead of waiting in the pool.
    """

    _factory = _QuietClientFactory
    closed = False

    def _putConnection(self, key: Any, connection: Any) -> None:
        if self.closed or getattr(connection.transport, "disconnecting", False):
            connection.transport.loseConnection()
            return
        super()._putConnection(key, connection)


def trust_root(cafile: Path | str | None) -> Any:
    """
    The trust root for https origins: the system's CAs, plus those in
    C{cafile}.
    """
    if cafile is None:
        return platformTrust()
    from cryptography import x509
    from OpenSSL import crypto

    certificates = [
        crypto.X509.from_cryptography(c)
        for c in x509.load_pem_x509_certificates(Path(cafile).read_bytes())
    ]
    return _SystemAndExtraTrust(certificates)


@implementer(IOpenSSLTrustRoot)
class _SystemAndExtraTrust:
    """
    Trust the system's CAs and these extra certificates.
    """

    def __init__(self, certificates: list[Any]) -> None:
        self._certificates = certificates

    def _addCACertsToContext(self, context: Any) -> None:
        context.set_default_verify_paths()
        store = context.get_cert_store()
        for certificate in self._certificates:
            store.add_cert(certificate)
