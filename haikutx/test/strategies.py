"""
Hypothesis strategies for haikutx's pure values.
"""

from __future__ import annotations

import string

from hypothesis import strategies as st

from haikutx.gate.names import DEFAULT, NamesEntry, NamesFile

_ALPHABET = string.ascii_letters + string.digits + "-_.:/~=+,%@#^"

#: A names-file token: no white space, never the empty marker itself.
tokens = st.text(_ALPHABET, min_size=1, max_size=12).filter(lambda t: t != "^")

#: A token that may be empty (written as C{^}).
optional_tokens = st.one_of(st.just(""), tokens)

#: An application name: not a comment, not all digits, no C{/}.
names = st.one_of(
    st.just(DEFAULT),
    st.text(string.ascii_letters + string.digits + "-_.~", min_size=1, max_size=10)
    .filter(lambda t: not t.isdigit()),
)

ports = st.integers(1024, 65535)


@st.composite
def names_entries(draw, name=names) -> NamesEntry:
    """
    A L{NamesEntry} of any of the three kinds: redirect, forward-only, or
    startable.
    """
    kind = draw(st.sampled_from(["redirect", "plain", "app"]))
    entry_name = draw(name)
    if kind == "redirect":
        return NamesEntry(entry_name, 0, redirect=draw(tokens))
    if kind == "plain":
        return NamesEntry(entry_name, draw(ports))
    return NamesEntry(
        entry_name,
        draw(ports),
        user=draw(optional_tokens),
        dir=draw(optional_tokens),
        log=draw(optional_tokens),
        command=tuple([draw(tokens)] + draw(st.lists(optional_tokens, max_size=4))),
    )


@st.composite
def names_files(draw) -> NamesFile:
    """
    A L{NamesFile} with distinct names.
    """
    entries = draw(st.lists(names_entries(), max_size=6, unique_by=lambda e: e.name))
    return NamesFile(tuple(entries))


#: Text that is ignored in a names file: blank lines and comments.
ignored_lines = st.one_of(
    st.just(""),
    st.text(" \t", max_size=3),
    st.builds(lambda pad, body: f"{pad}#{body}", st.text(" \t", max_size=2),
              st.text(_ALPHABET + " ", max_size=20)),
)


# Framing and console (haikutx.child.wire, haikutx.child.console).

from haikutx.child import wire  # noqa: E402, I001

frame_kinds = st.sampled_from(
    [wire.REQUEST, wire.BODY, wire.BODY_END, wire.CHALLENGE, wire.HEAD, wire.DATA,
     wire.FINISH, wire.FAIL, wire.ANSWER, wire.READY, wire.CONSOLE, wire.SANDBOX]
)

frames = st.lists(st.tuples(frame_kinds, st.binary(max_size=300)), max_size=20)

console_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


# Address spellings (haikutx.net.addresses): every way a URL host can name an
# address that is not public. Tests only classify or refuse these; none is
# ever connected to.

from ipaddress import IPv4Address, IPv6Address  # noqa: E402

#: IPv4 addresses that are not public: loopback, private, link-local
#: (metadata included), unspecified, shared (CGNAT), multicast, reserved.
non_public_ipv4 = st.one_of(
    st.integers(0x7F000000, 0x7FFFFFFF),
    st.integers(0x0A000000, 0x0AFFFFFF),
    st.integers(0xAC100000, 0xAC1FFFFF),
    st.integers(0xC0A80000, 0xC0A8FFFF),
    st.integers(0xA9FE0000, 0xA9FEFFFF),
    st.just(0xA9FEA9FE),
    st.integers(0x00000000, 0x00FFFFFF),
    st.integers(0x64400000, 0x647FFFFF),
    st.integers(0xE0000000, 0xFFFFFFFF),
).map(IPv4Address)

#: IPv6 addresses that are not public in their own right.
non_public_ipv6 = st.one_of(
    st.sampled_from([IPv6Address("::1"), IPv6Address("::"), IPv6Address("fd00:ec2::254")]),
    st.integers(0, 2**118 - 1).map(lambda n: IPv6Address((0xFE80 << 112) | n)),
    st.integers(0, 2**121 - 1).map(lambda n: IPv6Address((0xFC00 << 112) | n)),
    st.integers(0, 2**120 - 1).map(lambda n: IPv6Address((0xFF00 << 112) | n)),
)


def _octal(address: IPv4Address) -> str:
    return ".".join(f"0{int(part):o}" for part in str(address).split("."))


def _v4_spellings(address: IPv4Address) -> list[str]:
    """
    URL hosts that denote C{address}: dotted, decimal, hex, octal, short
    forms, and the IPv6 forms that embed it.
    """
    n = int(address)
    a, b, c, d = (int(p) for p in str(address).split("."))
    spellings = [
        str(address),
        str(n),
        hex(n),
        hex(n).upper().replace("0X", "0x"),
        _octal(address),
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"{a}.{b}.{(c << 8) | d}",
        f"{hex(a)}.{b}.{c}.{d}",
        f"{address}.",
        f"[::ffff:{address}]",
        f"[{IPv6Address(0xFFFF00000000 | n)}]",
        f"[::ffff:0:{address}]",
        f"[64:ff9b::{address}]",
        f"[{IPv6Address(int(IPv6Address('64:ff9b::')) | n)}]",
        f"[{IPv6Address((0x2002 << 112) | (n << 80) | 1)}]",
    ]
    if n > 1:
        spellings.append(f"[{IPv6Address(n)}]")
        spellings.append(f"[::{address}]")
    return spellings


@st.composite
def non_public_hosts(draw) -> tuple[str, IPv4Address | IPv6Address]:
    """
    A URL host spelling an address that is not public, and that address.
    """
    if draw(st.booleans()):
        address6 = draw(non_public_ipv6)
        spelling = draw(st.sampled_from([f"[{address6}]", f"[{address6.exploded}]"]))
        return spelling, address6
    address4 = draw(non_public_ipv4)
    return draw(st.sampled_from(_v4_spellings(address4))), address4

#: Spellings of loopback addresses only.
loopback_hosts = st.integers(0x7F000000, 0x7FFFFFFF).map(IPv4Address).flatmap(
    lambda address: st.sampled_from(_v4_spellings(address))
) | st.sampled_from(["[::1]", "[0:0:0:0:0:0:0:1]", "[::ffff:127.0.0.1]", "[::7f00:1]"])
