"""
Property tests for L{haikutx.child.params}, the one parameter parser of every
handler language: query strings, urlencoded forms, JSON and multipart
bodies round-trip, and malformed bodies are L{BadRequestBody}, never another
exception.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from haikutx.child.params import BadRequestBody, merge_params, parse_body, parse_query

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
_names = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1,
                 max_size=12)
_pairs = st.dictionaries(_names, _text, max_size=6)

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | _text
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=10,
)

# Multipart field names: what a browser sends in a quoted name.
_part_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1,
                      max_size=10)
_filenames = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-. ", min_size=1,
                     max_size=12).filter(lambda s: s.strip() == s)


class RoundTripTests(SynchronousTestCase):
    @given(_pairs)
    def test_query(self, pairs: dict[str, str]) -> None:
        """
        A query string made from names and values parses back to them.
        """
        self.assertEqual(parse_query(urlencode(pairs)), pairs)

    @given(st.lists(st.tuples(_names, _text), max_size=8))
    def test_query_last_wins(self, pairs: list[tuple[str, str]]) -> None:
        """
        A name given several times keeps its last value.
        """
        self.assertEqual(parse_query(urlencode(pairs)), dict(pairs))

    @given(_pairs)
    def test_urlencoded(self, pairs: dict[str, str]) -> None:
        self.assertEqual(
            parse_body("application/x-www-form-urlencoded; charset=utf-8",
                       urlencode(pairs).encode()),
            pairs,
        )

    @given(st.dictionaries(_text, _json, max_size=5), st.booleans())
    def test_json_object(self, value: dict, ascii_only: bool) -> None:
        """
        A JSON object's members are the parameters.
        """
        body = json.dumps(value, ensure_ascii=ascii_only).encode()
        self.assertEqual(parse_body("application/json", body), value)

    @given(_json.filter(lambda v: not isinstance(v, dict)))
    def test_json_other(self, value) -> None:
        """
        Another JSON value is the parameter C{body}.
        """
        self.assertEqual(parse_body("application/json", json.dumps(value).encode()),
                         {"body": value})

    @given(
        st.dictionaries(_part_names, _text, max_size=4),
        st.dictionaries(_part_names, st.tuples(_filenames, st.binary(max_size=200)),
                        max_size=3),
    )
    def test_multipart(self, fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> None:
        """
        Multipart fields are parameters; files are described by field name,
        file name, content type and size.
        """
        files = {k: v for k, v in files.items() if k not in fields}
        boundary = "haikuBoundary7MA4YWxkTrZu0gW"
        parts = []
        for name, value in fields.items():
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                + value.encode() + b"\r\n"
            )
        for name, (filename, content) in files.items():
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                + content + b"\r\n"
            )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        expected: dict = dict(fields)
        for name, (filename, content) in files.items():
            expected[name] = {
                "name": name,
                "filename": filename,
                "content_type": "application/octet-stream",
                "size": len(content),
            }
        assume(parts)
        self.assertEqual(parse_body(f"multipart/form-data; boundary={boundary}", body),
                         expected)

    @given(_pairs, _pairs)
    def test_body_wins(self, query: dict[str, str], form: dict[str, str]) -> None:
        """
        The merged params are the query's overridden by the body's.
        """
        merged = merge_params(urlencode(query), "application/x-www-form-urlencoded",
                              urlencode(form).encode())
        self.assertEqual(merged, {**query, **form})
        self.assertEqual(list(merged), list({**query, **form}))


class MalformedTests(SynchronousTestCase):
    @given(st.sampled_from(["application/json", "application/x-www-form-urlencoded",
                            "multipart/form-data; boundary=XX", "multipart/form-data",
                            "application/vnd.api+json", "text/plain", ""]),
           st.binary(max_size=300))
    def test_never_crashes(self, content_type: str, body: bytes) -> None:
        """
        Any body either parses to a dict or is L{BadRequestBody}.
        """
        try:
            result = parse_body(content_type, body)
        except BadRequestBody:
            return
        self.assertIsInstance(result, dict)

    def test_multipart_cap(self) -> None:
        """
        A multipart body larger than the cap is refused, not parsed.
        """
        body = (b'--XX\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\n'
                + b"x" * 2000 + b"\r\n--XX--\r\n")
        parsed = parse_body("multipart/form-data; boundary=XX", body, max_multipart=4096)
        self.assertEqual(parsed["f"]["size"], 2000)
        with self.assertRaises(BadRequestBody) as e:
            parse_body("multipart/form-data; boundary=XX", body, max_multipart=1000)
        self.assertIn("1000 bytes", str(e.exception))

    @given(st.binary(min_size=1, max_size=100))
    def test_bad_utf8_form(self, junk: bytes) -> None:
        body = b"a=" + junk + b"\xff"
        with self.assertRaises(BadRequestBody):
            parse_body("application/x-www-form-urlencoded", body)
