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
