# -*- test-case-name: haikutx.test.test_runtime -*-
"""
The runtime's request parameters (C{x-haiku-handler}, C{x-haiku-console},
C{x-haiku-language}): each given as a request header or in the query
string (L{request_parameter}), both read once per request.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from twisted.web.server import Request

HANDLER = "x-haiku-handler"
CONSOLE = "x-haiku-console"
LANGUAGE = "x-haiku-language"


#: Set on a request to its query string's parameters, name to last value.
_QUERY = "haiku_query"

#: Set on a request to its C{x-haiku-*} headers, by lower-case name.
_HEADERS = "haiku_headers"


def request_parameter(request: Request, name: str) -> str | None:
    """
    A C{x-haiku-*} parameter: the request header if given and not empty,
    else the last value in the query string.

    @param request: the request.
    @param name: the parameter's (lower-case) name.
    @return: its value, or C{None}.
    """
    headers = getattr(request, _HEADERS, None)
    if headers is None:
        # The request's x-haiku-* headers found in one pass, whichever
        # parameter is asked first (not a header lookup for each).
        headers = {}
        for raw, values in request.requestHeaders.getAllRawHeaders():
            if raw[:8].lower() == b"x-haiku-" and values:
                headers[raw.lower()] = values
        setattr(request, _HEADERS, headers)
    if name.startswith("x-haiku-"):
        values = headers.get(name.encode("latin-1")) if headers else None
        header = values[-1].decode("utf-8") if values else None
    else:
        header = request.getHeader(name)
    if header:
        return header
    query = getattr(request, _QUERY, None)
    if query is None:
        # Parsed once per request, whichever parameter is asked first.
        query = _query(request.uri)
        setattr(request, _QUERY, query)
    return query.get(name)


#: The query strings parsed last, by their request's URI (a parse depends
#: on the URI alone): at most L{_QUERIES_KEPT}, of URIs of at most
#: L{_QUERY_KEPT_SIZE} bytes, so that a client that asks for the same URI
#: again (a poller, a benchmark) costs no parse.  Never changed once made.
_QUERIES: dict[bytes, dict[str, str]] = {}
_QUERIES_KEPT = 64
_QUERY_KEPT_SIZE = 1024


def _query(uri: bytes) -> dict[str, str]:
    """
    The parameters of C{uri}'s query string, name to last value.
    """
    known = _QUERIES.get(uri)
    if known is not None:
        return known
    query = (
        dict(parse_qsl(uri.split(b"?", 1)[1].decode("latin-1"), keep_blank_values=True))
        if b"?" in uri
        else {}
    )
    if len(uri) <= _QUERY_KEPT_SIZE:
        if len(_QUERIES) >= _QUERIES_KEPT:
            _QUERIES.clear()
        _QUERIES[uri] = query
    return query
