# -*- test-case-name: haikutx.test.test_loader -*-
"""
The handler loader: turns the C{x-haiku-handler} value into handler code,
from an http/https URL (through an L{IHandlerFetcher}) or from the local
handlers directory (never outside it).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath, InsecurePath
from zope.interface import implementer

from haikutx.interfaces import IHandlerLoader
from haikutx.net.urls import redact_url
from haikutx.runtime.beneath import OutsideDirectory, open_beneath, read_regular
from haikutx.runtime.fetch import HandlerFetchError

UNSUPPORTED_PROTOCOL = (
    "The x-haiku-handler parameter specifies unsupported protocol. "
    "Only http and https are supported."
)
INVALID_NAME = (
    "The x-haiku-handler parameter must be a valid http or https URL or the "
    "name of a handler in the handlers directory."
)


@frozen
class HandlerSource:
    """
    A handler's code.

    @ivar url: the handler's URL or local name, as named in messages and
        tracebacks.
    @ivar source: the code.
    @ivar cache: how the code was obtained (C{hit}, C{miss}, C{revalidated},
        C{off} or C{local}).
    """

    url: str
    source: bytes
    cache: str = "local"


class HandlerLoadError(Exception):
    """
    The handler could not be loaded: the runtime answers C{status} with the
    one-line C{message}.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


def quota_exceeded(max_size: int) -> HandlerLoadError:
    """
    The error for a handler larger than C{max_size} bytes.
    """
    return HandlerLoadError(
        400, f"The size of the handler exceeded the quota of {max_size} bytes."
    )


def classify(name: str) -> str:
    """
    Whether a C{x-haiku-handler} value names a C{url} or a C{local} handler.

    @raise HandlerLoadError: 400 for another scheme or a malformed value.
    """
    if not name or any(ord(c) < 32 or c == "\x7f" for c in name):
        raise HandlerLoadError(400, INVALID_NAME)
    try:
        parts = urlsplit(name)
    except ValueError:
        raise HandlerLoadError(400, INVALID_NAME) from None
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise HandlerLoadError(400, INVALID_NAME)
        return "url"
    if parts.scheme or name.startswith("//"):
        raise HandlerLoadError(400, UNSUPPORTED_PROTOCOL)
    return "local"


@implementer(IHandlerLoader)
class HandlerLoader:
    """
    Loads handlers by URL or by local name.

    @param reactor: used to read local files off the reactor thread, and
        for time.
    @param handlers: the local handlers directory.
    @param max_size: largest handler accepted, in bytes.
    @param fetcher: an L{haikutx.interfaces.IHandlerFetcher} for URLs.
    @param fresh_for: seconds a local handler's code is served from memory
        before the file is read again (C{--cache-ttl}); 0 reads it for
        every request.
    @param cache_bytes: bound of the local handlers kept in memory.
    """

    def __init__(
        self,
        reactor: Any,
        handlers: Path,
        max_size: int,
        fetcher: Any = None,
        fresh_for: float = 0.0,
        cache_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self._reactor = reactor
        self._handlers = FilePath(str(handlers))
        self._max_size = max_size
        self._fetcher = fetcher
        self._fresh_for = fresh_for
        self._cache_bytes = cache_bytes
        self._local: dict[str, tuple[float, HandlerSource]] = {}
        #: Local handlers being read (with C{fresh_for}), and the requests
        #: waiting for that read.
        self._reading: dict[str, list[Deferred[HandlerSource]]] = {}
        self._local_bytes = 0

    def cached(self, name: str) -> HandlerSource | None:
        """
        The local handler C{name} if its code is in memory and fresh (as
        L{load} would give it at once), else C{None}: without a
        L{Deferred}.
        """
        cached = self._local.get(name)
        if cached is not None and cached[0] > self._reactor.seconds():
            return cached[1]
        return None

    def load(self, name: str) -> Deferred[HandlerSource]:
        """
        Load the handler C{name}.
        """
        cached = self._local.get(name)
        if cached is not None:
            if cached[0] > self._reactor.seconds():
                return succeed(cached[1])
            self._forget(name)
        sharing = self._reading.get(name)
        if sharing is not None:
            # The file is being read for another request: one read for all.
            waiter: Deferred[HandlerSource] = Deferred()
            sharing.append(waiter)
            return waiter
        try:
            local = self._fresh_for > 0 and classify(name) == "local"
        except HandlerLoadError:
            local = False  # refused by _load, as any other load
        if not local:
            return Deferred.fromCoroutine(self._load(name))
        self._reading[name] = []
        return Deferred.fromCoroutine(self._load(name)).addBoth(self._share, name)

    def _share(self, result: Any, name: str) -> Any:
        """
        Give the requests that waited for C{name}'s read what it gave.
        """
        for waiter in self._reading.pop(name, ()):
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        return result

    def _remember(self, name: str, handler: HandlerSource) -> None:
        size = len(handler.source)
        if self._fresh_for <= 0 or size > self._cache_bytes:
            return
        self._forget(name)
        while self._local and self._local_bytes + size > self._cache_bytes:
            self._forget(next(iter(self._local)))
        self._local[name] = (self._reactor.seconds() + self._fresh_for, handler)
        self._local_bytes += size

    def _forget(self, name: str) -> None:
        cached = self._local.pop(name, None)
        if cached is not None:
            self._local_bytes -= len(cached[1].source)

    async def _load(self, name: str) -> HandlerSource:
        if classify(name) == "url":
            if self._fetcher is None:
                raise HandlerLoadError(403, f"The handler URL {redact_url(name)} is not "
                                       "allowed: this runtime serves local handlers only")
            try:
                fetched = await self._fetcher.fetch(name)
            except HandlerFetchError as e:
                raise HandlerLoadError(e.status, e.message) from None
            return HandlerSource(url=fetched.url, source=fetched.source, cache=fetched.cache)
        handler = await self._read_local(name)
        self._remember(name, handler)
        return handler

    def _local_name(self, name: str) -> str:
        """
        The file name a local handler name stands for (its query string and
        fragment removed), checked to be a relative name that stays inside
        the handlers directory as written; symlinks are checked when it is
        opened (L{open_beneath}).

        @raise HandlerLoadError: 400 for an absolute name or one that climbs
            out with C{..}.
        """
        relative = name.split("?", 1)[0].split("#", 1)[0]
        if relative.startswith("/") or "\\" in relative:
            raise HandlerLoadError(400, INVALID_NAME)
        try:
            path = self._handlers.preauthChild(relative)
        except InsecurePath:
            raise HandlerLoadError(400, INVALID_NAME) from None
        return os.path.relpath(path.path, self._handlers.path)

    async def _read_local(self, name: str) -> HandlerSource:
        relative = self._local_name(name)
        try:
            source = await deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), _read_beneath,
                self._handlers.path, relative, self._max_size,
            )
        except OutsideDirectory:
            raise HandlerLoadError(
                403, f"The handler {name} leads outside the handlers directory."
            ) from None
        if source is None:
            raise HandlerLoadError(
                404, f"The handler {name} was not found in the handlers directory."
            )
        if len(source) > self._max_size:
            raise quota_exceeded(self._max_size)
        return HandlerSource(url=name, source=source)


def _read_beneath(directory: str, name: str, max_size: int) -> bytes | None:
    """
    Read at most C{max_size + 1} bytes of the regular file C{name} beneath
    C{directory} (C{None} if there is no such file).

    @raise OutsideDirectory: when C{name} leads outside C{directory}.
    """
    try:
        fd = open_beneath(directory, name)
    except OSError:
        return None
    return read_regular(fd, max_size + 1)


def _read_capped(path: str, max_size: int) -> bytes | None:
    """
    Read at most C{max_size + 1} bytes of a regular file (C{None} if there
    is no such file).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    return read_regular(fd, max_size + 1)


@implementer(IHandlerLoader)
class ServeLoader:
    """
    Loads one local file for every request (C{--serve}), read again when it
    changes (size, modification time or inode).

    @param reactor: used to read the file off the reactor thread.
    @param path: the absolute path of the handler file.
    @param max_size: largest handler accepted, in bytes.
    """

    def __init__(self, reactor: Any, path: Path, max_size: int) -> None:
        self._reactor = reactor
        self._path = str(path)
        self._max_size = max_size
        self._stamp: tuple[int, int, int] | None = None
        self._source: bytes | None = None
        self.reads = 0

    def load(self, name: str) -> Deferred[HandlerSource]:
        """
        Load the served file (C{name} is ignored).
        """
        return Deferred.fromCoroutine(self._load())

    async def _load(self, ) -> HandlerSource:
        stamp, source = await deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), _read_if_changed,
            self._path, self._stamp, self._max_size,
        )
        if stamp is None:
            self._stamp = self._source = None
            raise HandlerLoadError(404, f"The handler {self._path} was not found.")
        if source is not None:
            self.reads += 1
            self._stamp, self._source = stamp, source
        assert self._source is not None
        if len(self._source) > self._max_size:
            raise quota_exceeded(self._max_size)
        return HandlerSource(url=self._path, source=self._source)


def _read_if_changed(
    path: str, stamp: tuple[int, int, int] | None, max_size: int
) -> tuple[tuple[int, int, int] | None, bytes | None]:
    """
    The file's stamp, and its content when the stamp differs from C{stamp}.
    """
    try:
        info = os.stat(path)
    except OSError:
        return None, None
    if not stat.S_ISREG(info.st_mode):
        return None, None
    current = (info.st_mtime_ns, info.st_size, info.st_ino)
    if current == stamp:
        return current, None
    source = _read_capped(path, max_size)
    if source is None:
        return None, None
    return current, source
