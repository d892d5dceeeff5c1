# -*- test-case-name: haikutx.test.test_urls -*-
"""
URLs as they may be shown: credentials never appear in an answer or a log
line.
"""

from __future__ import annotations

import re

#: A URL's scheme and authority: C{scheme://userinfo@host...}.
_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*:[/\\]{2})([^/?#\\]*)")

#: What stands for a redacted password (or a user name given alone, which
#: is often a token).
REDACTED = "***"


def redact_url(url: str) -> str:
    """
    C{url} with the credentials of its authority hidden:
    C{http://user:secret@host/} becomes C{http://user:***@host/}, and
    C{https://token@host/} becomes C{https://***@host/}.

    Works on any string, even one that does not parse as a URL (a bad port,
    a second C{@}), since it is used on what clients send; everything that
    is not a URL with credentials is returned unchanged.

    @param url: a URL, or any other text naming a handler.
    @return: the URL without a password.
    """
    match = _AUTHORITY.match(url)
    if match is None or "@" not in match.group(2):
        return url
    userinfo, _, host = match.group(2).rpartition("@")
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:{REDACTED}" if colon else REDACTED
    return match.group(1) + shown + "@" + host + url[match.end():]
