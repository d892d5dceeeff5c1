# -*- test-case-name: haikutx.test.test_pool -*-
"""
The frames of a worker slot's channels as the server reads and makes them
(L{haikutx.child.wire}): the zygote's C{CHILD} announcements and the
server's C{RETIRE} orders, made and read by hand in their usual forms; and
the checks of what a child's response frames say (their headers, their
status), with the response heads each child sent remembered by their bytes.
"""

from __future__ import annotations

import json
from typing import Any

from haikutx.child import wire


def response_pairs(value: Any) -> list[list[str]]:
    """
    Headers or trailers from a child's frame: a list of C{[name, value]}
    string pairs.

    @raise ValueError: for anything else (the child sent a malformed frame).
    """
    if not isinstance(value, list) or not all(
        isinstance(pair, list)
        and len(pair) == 2
        and isinstance(pair[0], str)
        and isinstance(pair[1], str)
        for pair in value
    ):
        raise ValueError("headers are not a list of [name, value] strings")
    return value


#: Heads one child's channel remembers at most, and the largest it
#: remembers, in bytes.
_HEADS_KEPT = 256
_HEAD_KEPT_SIZE = 1024


def remember_head(
    heads: dict[bytes, tuple[int, Any]], payload: bytes, head: tuple[int, list[list[str]]]
) -> None:
    """
    Remember a valid response head a child sent, by its bytes: a handler's
    head is the same bytes on every request, and what they decode to is a
    function of them alone.  Each child has its own (a child never learns
    from the server's speed what another one sent); the headers are kept
    as a tuple of tuples, never changed, and each exchange given its own
    list.
    """
    if len(payload) > _HEAD_KEPT_SIZE:
        return
    if len(heads) >= _HEADS_KEPT:
        heads.clear()
    heads[payload] = (head[0], tuple((name, value) for name, value in head[1]))


def child_pid(payload: bytes) -> int:
    """
    The pid a zygote's C{CHILD} frame announces.  The zygote's own form,
    C{{"pid":N}}, is read by hand (the json module's path costs a dozen
    calls per child); anything else is read as JSON.

    @raise ValueError: if it is not a JSON object with an integer C{pid}.
    @raise KeyError: if it has no C{pid}.
    """
    if payload.startswith(b'{"pid":') and payload.endswith(b"}"):
        number = payload[7:-1]
        if number.isdigit() and not number.startswith(b"0"):
            return int(number)
    return int(json.loads(payload)["pid"])


def retire_order(pid: int, report: bool) -> bytes:
    """
    The C{RETIRE} frame that has the zygote kill child C{pid} (and report
    its end, if C{report}): compact JSON, made by hand.
    """
    if report:
        return wire.encode(wire.RETIRE, b'{"pid":%d,"report":true}' % pid)
    return wire.encode(wire.RETIRE, b'{"pid":%d}' % pid)


def final_status(status: int) -> bool:
    """
    Whether C{status} may answer a request: not an interim one (C{1xx}),
    after which the client would read what follows as the response, or as
    another protocol (C{101}).
    """
    return 200 <= status <= 599
