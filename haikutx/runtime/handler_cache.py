# -*- test-case-name: haikutx.test.test_fetch -*-
"""
The handler fetcher's cache: handler code by URL, bounded in bytes, kept
as long as its origin's C{Cache-Control} allows (or C{--cache-ttl} when
it says nothing), and revalidated with the origin's validators.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from attrs import define
from twisted.web.http_headers import Headers


@define
class CacheEntry:
    """
    A handler kept in the cache.

    @ivar final_url: the URL it was downloaded from, after redirects.
    @ivar source: its code.
    @ivar etag: its origin's C{ETag}, for revalidation, or C{None}.
    @ivar last_modified: its origin's C{Last-Modified}, or C{None}.
    @ivar expires: when it stops being fresh (reactor seconds).
    """

    final_url: str
    source: bytes
    etag: bytes | None
    last_modified: bytes | None
    expires: float

    def size(self, url: str) -> int:
        """
        What it counts against the cache's bound, kept under C{url}.
        """
        return len(self.source) + len(url) + len(self.final_url) + 256


def _directives(headers: Headers) -> dict[str, str]:
    result: dict[str, str] = {}
    for value in headers.getRawHeaders(b"cache-control", []):
        for item in value.decode("latin-1").split(","):
            name, _, argument = item.strip().partition("=")
            if name:
                result[name.lower()] = argument.strip().strip('"')
    return result


def freshness(headers: Headers, default_ttl: float) -> float | None:
    """
    How long a response stays fresh, from its C{Cache-Control} (C{s-maxage},
    C{max-age}, C{no-cache}, C{no-store}) and C{Age}.

    @param headers: the response headers.
    @param default_ttl: the freshness when the origin says nothing.
    @return: seconds, or C{None} when the response must not be stored.
    """
    directives = _directives(headers)
    if "no-store" in directives:
        return None
    if "no-cache" in directives:
        return 0.0
    for name in ("s-maxage", "max-age"):
        if name in directives:
            try:
                lifetime = float(int(directives[name]))
            except ValueError:
                return 0.0
            try:
                age = float(int(headers.getRawHeaders(b"age", [b"0"])[-1]))
            except ValueError:
                age = 0.0
            return max(0.0, lifetime - age)
    return default_ttl

class HandlerCache:
    """
    The fetcher's bounded, HTTP-aware cache of handler code, by URL, least
    recently used first out.

    @param clock: what tells the time (C{seconds()}).
    @param max_bytes: its bound in bytes; 0 turns it off.
    @param default_ttl: the freshness of a handler whose origin gives no
        caching headers.
    """

    def __init__(self, clock: Any, max_bytes: int, default_ttl: float) -> None:
        self._clock = clock
        self._max_bytes = max_bytes
        self._default_ttl = default_ttl
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        #: What the entries count against the bound.
        self.size = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, url: str) -> tuple[CacheEntry | None, bool]:
        """
        The entry kept for C{url}, if any, and whether it is fresh (a fresh
        one becomes the most recently used).
        """
        entry = self._entries.get(url)
        if entry is None:
            return None, False
        if self._clock.seconds() < entry.expires:
            self._entries.move_to_end(url)
            return entry, True
        return entry, False

    def store(self, url: str, final_url: str, source: bytes, headers: Headers) -> bool:
        """
        Keep a downloaded handler if the cache is on and the origin allows.

        @return: whether the cache is on.
        """
        if self._max_bytes <= 0:
            return False
        self.forget(url)
        lifetime = freshness(headers, self._default_ttl)
        if lifetime is None:
            return True
        entry = CacheEntry(
            final_url=final_url,
            source=source,
            etag=_last(headers, b"etag"),
            last_modified=_last(headers, b"last-modified"),
            expires=self._clock.seconds() + lifetime,
        )
        size = entry.size(url)
        if size > self._max_bytes:
            return True
        self._entries[url] = entry
        self.size += size
        while self.size > self._max_bytes:
            old_url, old = self._entries.popitem(last=False)
            self.size -= old.size(old_url)
        return True

    def forget(self, url: str) -> None:
        """
        Drop what is kept for C{url}.
        """
        old = self._entries.pop(url, None)
        if old is not None:
            self.size -= old.size(url)

    def revalidated(self, url: str, entry: CacheEntry, headers: Headers) -> None:
        """
        The origin answered 304 to a conditional request for C{entry}: it
        is fresh again for as long as the answer says (or dropped, if the
        answer forbids storing).
        """
        lifetime = freshness(headers, self._default_ttl)
        if lifetime is None:
            self.forget(url)
            return
        entry.expires = self._clock.seconds() + lifetime
        etag = headers.getRawHeaders(b"etag")
        if etag:
            entry.etag = etag[-1]
        modified = headers.getRawHeaders(b"last-modified")
        if modified:
            entry.last_modified = modified[-1]
        if url in self._entries:
            self._entries.move_to_end(url)


def _last(headers: Headers, name: bytes) -> bytes | None:
    values = headers.getRawHeaders(name)
    return values[-1] if values else None
