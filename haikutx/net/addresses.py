# -*- test-case-name: haikutx.test.test_addresses -*-
"""
The address rules shared by the handler fetcher, the egress proxy and the job
runner's callbacks: which IP addresses are public, and whether a connection
to C{(host, port, address)} is allowed.

Everything here is a pure function or a frozen value: no name resolution, no
I/O. Callers resolve a name I{once}, check every address with these rules and
connect only to an address that passed, so that a name answering differently
on a second look cannot slip through.
"""

from __future__ import annotations

import re
import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from urllib.parse import unquote, urlsplit

from attrs import field, frozen

PUBLIC = "public"

METADATA_ADDRESSES = frozenset(
    {IPv4Address("169.254.169.254"), IPv6Address("fd00:ec2::254")}
)

_V4_TABLE: tuple[tuple[IPv4Network, str], ...] = tuple(
    (IPv4Network(net), kind)
    for net, kind in [
        ("0.0.0.0/8", "unspecified"),
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "shared (carrier-grade NAT)"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "reserved"),
    ]
)

_NAT64 = IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = IPv6Network("64:ff9b:1::/48")
_SIIT = IPv6Network("::ffff:0:0:0/96")
_SIX_TO_FOUR = IPv6Network("2002::/16")
_TEREDO = IPv6Network("2001::/32")
_V4_COMPATIBLE = IPv6Network("::/96")

_V6_TABLE: tuple[tuple[IPv6Network, str], ...] = tuple(
    (IPv6Network(net), kind)
    for net, kind in [
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible (deprecated)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local (deprecated)"),
        ("fc00::/7", "unique-local"),
        ("ff00::/8", "multicast"),
        ("64:ff9b:1::/48", "NAT64 local-use"),
        ("2001::/32", "Teredo"),
        ("100::/64", "discard-only"),
        ("2001:db8::/32", "documentation"),
    ]
)

_NUMERIC_HOST = re.compile(r"^[0-9a-fA-FxX.]+$")


def parse_ip(value: str | IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    """
    Parse an IP address as a socket address gives it: brackets and an IPv6
    zone (C{%eth0}) are dropped.

    @param value: the address.
    @return: the address.
    @raise ValueError: if C{value} is not an IP address.
    """
    if isinstance(value, (IPv4Address, IPv6Address)):
        return value
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    return ip_address(text)


def ip_from_host(host: str) -> IPv4Address | IPv6Address | None:
    """
    The IP address a URL host denotes without name resolution: dotted quads,
    bracketed IPv6, and the numeric forms C{inet_aton} accepts (C{127.1},
    C{0x7f000001}, C{2130706433}, C{0177.0.0.1}).

    @param host: a URL host.
    @return: the address, or C{None} for a name that needs resolving.
    """
    host = host.strip().rstrip(".")
    try:
        return parse_ip(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host):
        try:
            return IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def address_kind(value: str | IPv4Address | IPv6Address) -> str:
    """
    Classify an IP address.

    IPv4 addresses embedded in IPv6 forms that reach them (IPv4-mapped,
    IPv4-translated, NAT64 C{64:ff9b::/96}, 6to4 C{2002::/16}) are
    classified as the embedded address; the deprecated IPv4-compatible
    C{::/96} is never public, and named for the address it embeds when that
    one is not public either (C{::7f00:1} is loopback).

    @param value: an IP address.
    @return: L{PUBLIC} for an address that is globally routable, or the
        kind of address that is not: C{loopback}, C{private}, C{link-local},
        C{metadata}, C{unique-local}, C{unspecified}, C{multicast},
        C{reserved}, ...
    @raise ValueError: if C{value} is not an IP address.
    """
    address = parse_ip(value)
    if address in METADATA_ADDRESSES:
        return "metadata"
    if isinstance(address, IPv6Address):
        embedded = _embedded_v4(address)
        if embedded is not None:
            return address_kind(embedded)
        for network, kind in _V6_TABLE:
            if address in network:
                return kind
        return PUBLIC if address.is_global else "reserved"
    for network4, kind in _V4_TABLE:
        if address in network4:
            return kind
    return PUBLIC if address.is_global else "reserved"


def is_public(value: str | IPv4Address | IPv6Address) -> bool:
    """
    Whether an IP address is globally routable (see L{address_kind}).
    """
    return address_kind(value) == PUBLIC


def _embedded_v4(address: IPv6Address) -> IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _SIIT or address in _NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _V4_COMPATIBLE and int(address) > 1:
        # Deprecated, so never public; but ::7f00:1 is named for what it
        # embeds (loopback), like the other forms.
        embedded = IPv4Address(int(address) & 0xFFFFFFFF)
        return embedded if not is_public(embedded) else None
    return None


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _has_dot_segment(path: str) -> bool:
    return any(unquote(s) in (".", "..") for s in path.split("/"))


@frozen
class URLTarget:
    """
    An http or https URL split the way the address rules read it.

    @ivar url: the URL as given.
    @ivar scheme: C{http} or C{https}.
    @ivar host: the lower-case host, without brackets.
    @ivar port: the port (the scheme's default when not given).
    @ivar target: the path and query, at least C{/}.
    """

    url: str
    scheme: str
    host: str
    port: int
    target: str

    @classmethod
    def parse(cls, url: str) -> URLTarget:
        """
        Split C{url}, refusing what an HTTP client could read otherwise than
        these rules do (credentials, white space, backslashes, non-ASCII,
        bad ports).

        @raise ValueError: when it is not such an http or https URL; the
            message says why.
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ValueError(f"{url!r} is not a valid URL: {e}") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        if (
            not parts.hostname
            or "%" in parts.hostname
            or "@" in parts.netloc
            or any(c.isspace() or c == "\\" for c in url)
            or not url.isascii()
        ):
            raise ValueError(f"{url!r} is not a valid URL")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return cls(
            url, parts.scheme, parts.hostname.lower(), port or _default_port(parts.scheme), target
        )


@frozen
class URLPrefix:
    """
    One C{--allow} prefix, parsed.

    @ivar scheme: C{http} or C{https}.
    @ivar host: the lower-case host without brackets; empty when the prefix
        names only a scheme (C{https://}).
    @ivar port: the port (the scheme's default when not given).
    @ivar path: the path (and query) prefix; at least C{/}.
    """

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, prefix: str) -> URLPrefix:
        """
        Parse a prefix such as C{https://example.com/handlers/}.

        @raise ValueError: for another scheme or a malformed prefix.
        """
        parts = urlsplit(prefix)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{prefix!r} is not an http or https URL prefix")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"{prefix!r} has credentials")
        port = parts.port or _default_port(parts.scheme)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(parts.scheme, (parts.hostname or "").lower(), port, path)

    def matches(self, scheme: str, host: str, port: int, target: str) -> bool:
        """
        Whether a URL with these parts starts with this prefix.

        @param target: the URL's path and query.
        """
        if scheme != self.scheme:
            return False
        if self.host and (host.lower() != self.host or port != self.port):
            return False
        return target.startswith(self.path)


@frozen
class AddressRules:
    """
    The rules for handler URLs (C{--allow}).

    Without prefixes any http/https URL is allowed, but only public
    addresses may be connected to. With prefixes a URL must start with one
    of them; a non-public address is allowed only when a matching prefix
    names the URL's host explicitly (C{http://127.0.0.1:8000/}), never by
    a scheme-only prefix (C{https://}).

    @ivar prefixes: the parsed C{--allow} prefixes.
    """

    prefixes: tuple[URLPrefix, ...] = field(default=())

    @classmethod
    def from_prefixes(cls, prefixes: tuple[str, ...] | list[str]) -> AddressRules:
        """
        Build the rules from C{--allow} values.

        @raise ValueError: for a prefix that does not parse.
        """
        return cls(tuple(URLPrefix.parse(p) for p in prefixes))

    def _matching(
        self, scheme: str, host: str, port: int, target: str
    ) -> list[URLPrefix]:
        return [p for p in self.prefixes if p.matches(scheme, host, port, target)]

    def check_url(self, scheme: str, host: str, port: int, target: str) -> str | None:
        """
        Whether a URL is allowed before any address is known.

        @param target: the URL's path and query.
        @return: C{None} if allowed, else the reason it is not.
        """
        if not self.prefixes:
            return None
        if _has_dot_segment(target.split("?", 1)[0]):
            return "its path has dot segments"
        if not self._matching(scheme, host, port, target):
            return "it matches no --allow prefix"
        return None

    def check_target(self, target: URLTarget) -> str | None:
        """
        Whether a URL is allowed before its host is resolved: L{check_url},
        and L{check_address} when its host is an address literal (in any
        spelling C{inet_aton} or IPv6 accepts).

        @return: C{None} if allowed so far, else the reason it is not.
        """
        refused = self.check_url(target.scheme, target.host, target.port, target.target)
        if refused is not None:
            return refused
        literal = ip_from_host(target.host)
        if literal is None:
            return None
        return self.check_address(target.scheme, target.host, target.port, literal)

    def check_address(
        self,
        scheme: str,
        host: str,
        port: int,
        address: str | IPv4Address | IPv6Address,
    ) -> str | None:
        """
        Whether connecting to C{address} for C{scheme://host:port} is allowed
        (the path is checked by L{check_url}).

        @param address: an address C{host} resolved to.
        @return: C{None} if allowed, else the reason it is not.
        """
        kind = address_kind(address)
        if kind == PUBLIC:
            return None
        name = host.strip("[]").lower()
        for p in self.prefixes:
            if p.host and (p.scheme, p.host, p.port) == (scheme, name, port):
                return None
        return f"{host} resolves to a {kind} address ({parse_ip(address)})"


def _parse_pair(value: str) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not host:port")
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"{value!r} has a bad port")
    return host.strip("[]").lower().rstrip("."), number


@frozen
class EgressRules:
    """
    The rules for connections a handler (or a job's callback) makes: public
    addresses are allowed; a non-public one only when its C{host:port} is
    listed (C{--egress-allow}).

    @ivar allowed: the listed C{(host, port)} pairs, host in lower case
        without brackets.
    """

    allowed: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_pairs(cls, pairs: tuple[str, ...] | list[str]) -> EgressRules:
        """
        Build the rules from C{host:port} strings.

        @raise ValueError: for a value that is not C{host:port}.
        """
        return cls(tuple(_parse_pair(p) for p in pairs))

    def check(
        self, host: str, port: int, address: str | IPv4Address | IPv6Address
    ) -> str | None:
        """
        Whether a connection to C{host:port}, resolved to C{address}, is
        allowed.

        A listed pair matches by host name or by the address itself, so
        C{127.0.0.1:5432} allows C{localhost:5432} resolved to C{127.0.0.1}.

        @return: C{None} if allowed, else the reason it is not.
        """
        kind = address_kind(address)
        if kind == PUBLIC:
            return None
        parsed = parse_ip(address)
        name = host.strip("[]").lower().rstrip(".")
        for allowed_host, allowed_port in self.allowed:
            if allowed_port != port:
                continue
            if allowed_host == name:
                return None
            listed = ip_from_host(allowed_host)
            if listed is not None and _same_address(listed, parsed):
                return None
        return f"{host}:{port} resolves to a {kind} address ({parsed})"


def _same_address(a: IPv4Address | IPv6Address, b: IPv4Address | IPv6Address) -> bool:
    if isinstance(a, IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if isinstance(b, IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    return a == b
