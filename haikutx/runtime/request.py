# -*- test-case-name: haikutx.test.test_site -*-
"""
The runtime's request (L{RuntimeRequest}): a L{LimitedRequest} that takes
a plain head its channel has parsed already
(L{haikutx.runtime.site.RuntimeChannel}), and so skips what twisted.web
does for a head read line by line that such a head does not need.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.python.failure import Failure
from twisted.web.http import parse_qs
from twisted.web.resource import _IEncodingResource
from twisted.web.server import unquote
from twisted.web.server import version as SERVER_VERSION

from haikutx.net.dates import http_date
from haikutx.runtime.body import LimitedRequest

_COOKIE = b"cookie"


class RuntimeRequest(LimitedRequest):
    """
    A L{LimitedRequest} that its channel may hand a plain head it parsed
    (L{take_head}): an HTTP/1.1 request without a body, C{Expect} or
    hop-by-hop field, whose fields the strict parser has checked.  Such a
    request is the one twisted.web's own reading gives (the same
    attributes, headers, cookies, content, and answer, byte for byte), with
    less work:

      - its fields are added without the look-ups of twisted.web's channel
        and request (C{Connection}, C{Expect}, C{Cookie}, C{Content-Type}):
        the channel has seen every field already;
      - its query string is parsed into L{args} only when C{args} is asked
        for (the runtime's resource reads its parameters itself,
        L{haikutx.runtime.parameters}), by twisted.web's own C{parse_qs};
      - it has no body whose position to keep.

    Any request (plain or not) sets its C{Date} header from a clock that
    formats it once a second (L{http_date}).  A head read by twisted.web
    (anything not plain) is otherwise read and run as by a
    L{LimitedRequest}.
    """

    #: Whether the head was handed over by the channel (L{take_head}).
    _plain = False
    #: The query string's arguments, once parsed (or set).
    _args: dict[bytes, list[bytes]] | None = None

    def take_head(self, fields: Sequence[tuple[bytes, bytes]]) -> None:
        """
        Take the fields of a plain head (see the class docstring), in place
        of twisted.web's reading of its lines and of C{allHeadersReceived}
        (whose findings are known: the connection stays persistent, nothing
        is expected, there is no body); the channel then runs the request
        (C{allContentReceived}) as L{HTTPChannel} does.

        @param fields: the head's fields in order, names in lower case and
            values stripped, as the strict parser gives them.
        """
        self._plain = True
        add = self.requestHeaders.addRawHeader
        cookies = False
        for name, value in fields:
            add(name, value)
            if name == _COOKIE:
                cookies = True
        if cookies:
            self.parseCookies()
        self.gotLength(0)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._plain:
            super().requestReceived(command, path, version)
            return
        # What Request.requestReceived does for a request without a body,
        # its arguments left until they are asked for (args).
        self.method, self.uri, self.clientproto = command, path, version
        self.path = path.split(b"?", 1)[0]
        self.process()

    @property  # type: ignore[override]
    def args(self) -> dict[bytes, list[bytes]] | None:
        """
        The query string's arguments, as L{twisted.web.http.Request.args}:
        on a plain request, parsed when first asked for.
        """
        args = self._args
        if args is None and self._plain and self.path is not None:
            uri = self.uri
            args = self._args = parse_qs(uri.split(b"?", 1)[1], 1) if b"?" in uri else {}
        return args

    @args.setter
    def args(self, value: Any) -> None:
        self._args = value

    def process(self) -> None:
        """
        Process the request as L{twisted.web.server.Request.process} does,
        its C{Date} header from L{http_date}.
        """
        self.site = site = self.channel.site
        headers = self.responseHeaders
        headers.setRawHeaders(b"Server", [SERVER_VERSION])
        headers.setRawHeaders(b"Date", [http_date()])
        path = self.path
        self.prepath = []
        self.postpath = list(map(unquote, path[1:].split(b"/")))
        if path == b"*":
            self._handleStar()
            return
        try:
            resource = site.getResourceFor(self)
            if _IEncodingResource.providedBy(resource):
                encoder = resource.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(resource)
        except BaseException:
            self.processingFailed(Failure())
