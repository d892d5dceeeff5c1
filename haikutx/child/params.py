# -*- test-case-name: haikutx.test.test_params -*-
"""
Request parameters: the query string merged with a form, multipart or JSON
body (stackvana's C{params}).  One parser for every handler language.

Standard library only: the worker process imports it.
"""

from __future__ import annotations

import json
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import parse_qsl

#: Largest multipart body parsed, in bytes.
MAX_MULTIPART = 8 * 1024 * 1024


class BadRequestBody(ValueError):
    """
    The request body does not match its content type.
    """


def parse_query(query: str) -> dict[str, str]:
    """
    Parse a query string; a name given twice keeps its last value.

    @param query: the query string, without C{?}.
    @return: name to value.
    """
    return dict(parse_qsl(query, keep_blank_values=True))


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def parse_body(
    content_type: str, body: bytes, max_multipart: int = MAX_MULTIPART
) -> dict[str, Any]:
    """
    Parse a request body into parameters.

    @param content_type: the request's C{Content-Type} (may be empty).
    @param body: the whole body.
    @param max_multipart: largest multipart body parsed.
    @return: the body's parameters (empty for other content types).
    @raise BadRequestBody: for a malformed body.
    """
    media = _media_type(content_type)
    if not body:
        return {}
    if media == "application/x-www-form-urlencoded":
        try:
            return parse_query(body.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadRequestBody(f"form body is not UTF-8: {e}") from None
    if media == "application/json" or media.endswith("+json"):
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequestBody(f"JSON body does not parse: {e}") from None
        return value if isinstance(value, dict) else {"body": value}
    if media == "multipart/form-data":
        if len(body) > max_multipart:
            raise BadRequestBody(f"multipart body exceeds {max_multipart} bytes")
        return _parse_multipart(content_type, body)
    return {}


def _parse_multipart(content_type: str, body: bytes) -> dict[str, Any]:
    if "boundary=" not in content_type:
        raise BadRequestBody("multipart body has no boundary")
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart() or message.defects:
        raise BadRequestBody("multipart body does not parse")
    params: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            params[name] = {
                "name": name,
                "filename": filename,
                "content_type": part.get_content_type(),
                "size": len(payload),
            }
        else:
            charset = part.get_content_charset() or "utf-8"
            params[name] = payload.decode(charset, "replace")
    return params


def parses_body(content_type: str) -> bool:
    """
    Whether a body of C{content_type} makes parameters (a form, multipart
    or JSON body): only then must the whole body be in before the params
    are known.
    """
    media = _media_type(content_type)
    return media in (
        "application/x-www-form-urlencoded", "multipart/form-data", "application/json"
    ) or media.endswith("+json")


def merge_params(query: str, content_type: str, body: bytes) -> dict[str, Any]:
    """
    The query string's parameters merged with the body's (the body wins).

    @raise BadRequestBody: for a malformed body.
    """
    params: dict[str, Any] = parse_query(query)
    params.update(parse_body(content_type, body))
    return params
