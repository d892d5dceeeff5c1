# -*- test-case-name: haikutx.test.test_stdio -*-
"""
The CGI/1.1 mapping of a stdio handler's request and response: the
interpreter's environment (L{request_environment}), and the header block
its output may start with (L{parse_cgi_headers}, L{blank_line},
L{could_be_headers}).

Standard library only: this runs in the worker process.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from haikutx.child.params import merge_params

#: The environment every interpreter gets besides the request's variables.
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "HOME": "/",
    "GATEWAY_INTERFACE": "CGI/1.1",
    "SERVER_SOFTWARE": "haikutx",
}

#: Largest CGI header block read before the output is taken as all body.
MAX_HEADER_BLOCK = 16384

#: Largest environment value passed (Linux refuses a string over 128 KiB).
MAX_ENV_VALUE = 65536

#: Largest total of the C{HAIKU_PARAM_*} values.
MAX_PARAM_ENV = 262144

#: stderr bytes kept for the message of a failed run.
STDERR_TAIL = 2048

#: The variables that name the egress proxy (set in the worker by its
#: zygote) and are passed on to every stdio handler.
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY")

#: Request headers that never become C{HTTP_*} variables: C{Proxy} would
#: become C{HTTP_PROXY}, which programs take as their proxy (httpoxy).
_UNPASSED_HEADERS = ("content-type", "content-length", "proxy")

#: The content type of output without one of its own: never HTML by accident.
DEFAULT_CONTENT_TYPE = "text/plain"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*\Z")
_CGI_NAMES = (b"status", b"content-type", b"location")


def request_environment(
    head: dict[str, Any], body: bytes, proxy: dict[str, str] | None = None
) -> dict[str, str]:
    """
    The environment of a stdio handler: CGI/1.1 meta-variables, C{HTTP_*}
    for each request header (but C{Proxy}: httpoxy), C{HAIKU_PARAMS} (the
    merged params as JSON) and C{HAIKU_PARAM_<name>} for each param whose
    name is an identifier, and the egress proxy's variables.  Values are
    passed as environment values only, never as code.  Values too large
    for the environment (L{MAX_ENV_VALUE}, L{MAX_PARAM_ENV}) are left out
    and named in C{HAIKU_OMITTED}; the body is still on stdin.

    @param proxy: the proxy variables (L{PROXY_VARIABLES}) to pass on.
    @raise BadRequestBody: for a malformed body.
    """
    parts = urlsplit(head["url"])
    headers: dict[str, str] = {}
    for name, value in head["headers"]:
        key = name.lower()
        headers[key] = headers[key] + ", " + value if key in headers else value
    params = merge_params(parts.query, headers.get("content-type", ""), body)
    env = dict(BASE_ENV)
    env.update(
        {
            "REQUEST_METHOD": head["method"],
            "REQUEST_URI": head["url"],
            "SCRIPT_NAME": "",
            "PATH_INFO": parts.path,
            "QUERY_STRING": parts.query,
            "CONTENT_TYPE": headers.get("content-type", ""),
            "CONTENT_LENGTH": _content_length(head, headers, body),
            "REMOTE_ADDR": head.get("remote_addr", ""),
            "SERVER_PROTOCOL": head.get("protocol", "HTTP/1.1"),
            "SERVER_NAME": headers.get("host", "").rsplit(":", 1)[0],
            "HAIKU_HANDLER": head["handler_url"],
            "HAIKU_LANGUAGE": head.get("language", ""),
        }
    )
    omitted = []
    encoded = json.dumps(params)
    if len(encoded.encode("utf-8", "surrogatepass")) <= MAX_ENV_VALUE:
        env["HAIKU_PARAMS"] = encoded
    else:
        omitted.append("HAIKU_PARAMS")
    for name, value in headers.items():
        if name in _UNPASSED_HEADERS:
            continue
        env["HTTP_" + re.sub(r"[^A-Z0-9_]", "_", name.upper().replace("-", "_"))] = value
    env.pop("HTTP_PROXY", None)  # from no header, whatever its spelling
    for name in PROXY_VARIABLES:
        if proxy and name in proxy:
            env[name] = proxy[name]
    budget = MAX_PARAM_ENV
    for name, value in params.items():
        if _IDENTIFIER.match(name):
            text = value if isinstance(value, str) else json.dumps(value)
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > MAX_ENV_VALUE or size > budget:
                omitted.append("HAIKU_PARAM_" + name)
                continue
            budget -= size
            env["HAIKU_PARAM_" + name] = text
    if omitted:
        env["HAIKU_OMITTED"] = " ".join(omitted)
    return {k: v.replace("\0", "") for k, v in env.items()}


def _content_length(head: dict[str, Any], headers: dict[str, str], body: bytes) -> str:
    """
    C{CONTENT_LENGTH}: the body's length, which the server tells when the
    body is still arriving (else the client's C{Content-Length}; empty for a
    chunked body of unknown length: stdin ends with it).
    """
    if body:
        return str(len(body))
    if isinstance(head.get("body_length"), int):
        return str(head["body_length"])
    if "content-length" in headers:
        return headers["content-length"].strip()
    if "transfer-encoding" in headers:
        return ""
    return "0"


def parse_cgi_headers(block: bytes) -> tuple[int, list[tuple[str, str]]] | None:
    """
    Parse a CGI header block (the lines before the blank line, C{\\n} or
    C{\\r\\n} ended).

    @return: the status and the other headers, or C{None} when C{block} is
        not a header block (a line that is not C{Name: value}, or none of
        C{Status}, C{Content-Type}, C{Location}).
    @raise ValueError: for a C{Status} that is not a number from 200 to 599.
    """
    status = 200
    headers: list[tuple[str, str]] = []
    names = set()
    lines = block.split(b"\n")
    for line in lines:
        match = _HEADER_LINE.match(line.rstrip(b"\r"))
        if match is None:
            return None
        name = match.group(1).lower()
        names.add(name)
        value = match.group(2).decode("utf-8", "replace")
        if name == b"status":
            code = value.split(None, 1)[0] if value.split() else ""
            if not code.isdigit() or not 200 <= int(code) <= 599:
                raise ValueError(f"invalid CGI Status header {value!r}")
            status = int(code)
        else:
            headers.append((match.group(1).decode("latin-1"), value))
    if not names.intersection(_CGI_NAMES):
        return None
    if b"location" in names and b"status" not in names:
        status = 302
    return status, headers


def blank_line(data: bytes) -> tuple[int, int] | None:
    """
    Where the first blank line is: the end of the header block and the start
    of the body.
    """
    if data.startswith(b"\r\n"):
        return 0, 2
    if data.startswith(b"\n"):
        return 0, 1
    match = re.search(rb"\r?\n\r?\n", data)
    if match is None:
        return None
    return match.start(), match.end()


def could_be_headers(data: bytes) -> bool:
    """
    Whether the output so far may still be a header block: every complete
    line is C{Name: value}.
    """
    lines = data.split(b"\n")
    for line in lines[:-1]:
        if _HEADER_LINE.match(line.rstrip(b"\r")) is None:
            return False
    last = lines[-1]
    return not last or re.match(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*(:.*)?\Z", last) is not None
