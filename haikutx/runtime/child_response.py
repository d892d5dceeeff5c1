# -*- test-case-name: haikutx.test.test_pool -*-
"""
What a child's response frames mean for the request it runs (L{deliver}):
its head, its body's pieces, its end or its failure, checked before any of
it reaches the request's exchange.  The child is hostile: a frame against
the rules is a reason to kill it (returned, for its slot to act on), and
nothing of it reaches the client.
"""

from __future__ import annotations

import json
from typing import Any

from haikutx.child import wire
from haikutx.runtime.slot_wire import final_status, remember_head, response_pairs


def deliver(child: Any, kind: int, payload: bytes) -> str | None:
    """
    Give C{child}'s exchange what a response frame of C{kind} says.

    @param child: the child's channel (L{haikutx.runtime.channels.ChildProtocol}).
    @param kind: C{HEAD}, C{DATA}, C{FINISH} or C{FAIL} (L{wire}).
    @return: why the child must be killed, or C{None}.
    @raise ValueError: for a malformed frame (also a reason to kill it).
    @raise KeyError: for a head or failure without a member it needs.
    """
    if kind != wire.DATA and len(payload) > wire.MAX_HEAD:
        return (
            f"sent a response head, trailers or failure of {len(payload)} bytes "
            f"(at most {wire.MAX_HEAD})"
        )
    exchange = child.exchange
    if exchange is None:
        return None
    if kind == wire.DATA:
        exchange.data(payload)
    elif kind == wire.HEAD:
        if child.headed:
            # Each would add to the response's headers, never sent.
            return "sent a second response head"
        child.headed = True
        known = child.heads.get(payload)
        if known is None:
            head = json.loads(payload)
            status = int(head["status"])
            if not final_status(status):
                return f"sent an invalid status {status}"
            known = (status, response_pairs(head["headers"]))
            remember_head(child.heads, payload, known)
        exchange.head(known[0], [[name, value] for name, value in known[1]])
    elif kind == wire.FINISH:
        trailers = (
            [] if payload == wire.NO_TRAILERS
            else response_pairs(json.loads(payload)["trailers"])
        )
        child.exchange = None
        child.end_body()
        exchange.finish(trailers)
    elif kind == wire.FAIL:
        failure = json.loads(payload)
        if not isinstance(failure["message"], str):
            raise ValueError("a failure's message is not a string")
        if not final_status(int(failure["status"])):
            return f"sent an invalid status {failure['status']}"
        child.exchange = None
        child.end_body()
        exchange.fail(int(failure["status"]), failure["message"])
    else:
        raise ValueError(f"frame kind {kind} is not part of a response")
    return None
