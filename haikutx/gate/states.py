# -*- test-case-name: haikutx.test.test_gate -*-
"""
The states of a gate connection, and the transitions between them: the one
table L{haikutx.gate.forward.GateProtocol} moves by.
"""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    """
    Where a gate connection is in its current request (an C{IntEnum} for
    its C-level hash: the table is looked up twice per request).
    """

    #: Reading a request head.
    HEAD = 1
    #: The request is routed; connecting to (or starting) its application.
    ROUTING = 2
    #: Forwarding the request body.
    BODY = 3
    #: The request is forwarded; the response is not finished.
    WAITING = 4
    #: After a C{101}: bytes pass both ways unread.
    TUNNEL = 5
    #: The client connection is closing or closed.
    CLOSED = 6


#: The transitions L{GateProtocol.move} allows.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.HEAD: frozenset({State.ROUTING, State.BODY, State.WAITING, State.CLOSED}),
    State.ROUTING: frozenset({State.BODY, State.WAITING, State.CLOSED}),
    State.BODY: frozenset({State.WAITING, State.TUNNEL, State.CLOSED}),
    # WAITING -> ROUTING: a reused application connection closed before
    # answering; the request goes again on a new one.
    State.WAITING: frozenset({State.HEAD, State.ROUTING, State.TUNNEL, State.CLOSED}),
    State.TUNNEL: frozenset({State.CLOSED}),
    State.CLOSED: frozenset({State.CLOSED}),
}


def check_transition(current: State, to: State) -> None:
    """
    @raise AssertionError: when L{TRANSITIONS} does not allow going from
        C{current} to C{to}.
    """
    if to not in TRANSITIONS[current]:
        raise AssertionError(f"gate connection cannot go from {current} to {to}")
