# -*- test-case-name: haikutx.test.test_local -*-
"""
Which requests are local: the one rule behind every loopback-only page
(C{/_haiku/status}, C{/_haiku/metrics}) of every haikutx service.

A request is local when its peer is a loopback address and it did not come
through a proxy: a request forwarded by the gate (or any proxy on this
machine) reaches us from 127.0.0.1, but on behalf of someone else, so any
sign of forwarding makes it not local.
"""

from __future__ import annotations

import ipaddress

from twisted.web.iweb import IRequest

#: Request headers that a proxy adds on behalf of its client; a request that
#: carries any of them arrived through a proxy.
FORWARDING_HEADERS = (
    b"forwarded",
    b"x-forwarded-for",
    b"x-forwarded-host",
    b"x-forwarded-proto",
    b"x-real-ip",
    b"via",
)


def is_loopback_host(host: str) -> bool:
    """
    Whether C{host}, an address as a transport reports it, is loopback.

    @param host: an IPv4 or IPv6 address, possibly with a C{%zone}.
    @return: C{True} for 127.0.0.0/8 and ::1 (and IPv4-mapped loopback).
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return address.is_loopback


def is_local_request(request: IRequest) -> bool:
    """
    Whether C{request} came straight from a loopback client.

    @param request: a L{twisted.web.server.Request}.
    @return: C{True} when the peer is loopback and no forwarding header is
        present.
    """
    host = getattr(request.getClientAddress(), "host", "")
    if not is_loopback_host(host):
        return False
    headers = request.requestHeaders
    return not any(headers.hasHeader(name) for name in FORWARDING_HEADERS)
