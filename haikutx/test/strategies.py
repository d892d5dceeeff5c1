"""
Hypothesis strategies for haikutx's tests.
"""

from hypothesis import strategies as st

from haikutx import wire

frame_kinds = st.sampled_from(
    [wire.REQUEST, wire.BODY, wire.BODY_END, wire.CHALLENGE, wire.HEAD, wire.DATA,
     wire.FINISH, wire.FAIL, wire.ANSWER, wire.READY, wire.CONSOLE]
)

frames = st.lists(st.tuples(frame_kinds, st.binary(max_size=300)), max_size=20)

console_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
