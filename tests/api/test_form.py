"""``parse_form`` reads an exchange's form as ``urllib.parse.parse_qs`` with the token
endpoint's options reads it: the same fields, in the same order, or the same error, for any
text. A parser that differs from the one the rest of the world uses is where a request means
one thing to a proxy and another to the broker."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.api.token import MAX_FORM_FIELDS, parse_form

# Text made of what matters to the parser, with escapes (valid UTF-8 or not) and non-ASCII.
_piece = st.sampled_from(
    ["&", "=", "+", "%", "%2", "%3A", "%3a", "%25", "%2B", "%26", "%3D", "%00", "%C3%A9", "%E9",
     "%ff", "%F0%9F%98%80", "%ED%A0%80", "%zz", "a", "B", "0", " ", ";", "é", "\U0001f600",
     "\x00", "\ud800"]
)  # fmt: skip
TEXT = st.lists(_piece | st.text(max_size=4), max_size=40).map("".join)


def _stdlib(text: str) -> Any:
    try:
        return list(
            parse_qs(
                text, keep_blank_values=True, errors="strict", max_num_fields=MAX_FORM_FIELDS
            ).items()
        )
    except Exception as exc:
        return type(exc)


def _ours(text: str) -> Any:
    try:
        return list(parse_form(text).items())
    except Exception as exc:
        return type(exc)


@settings(max_examples=1500, deadline=None)
@given(TEXT)
def test_the_fields_or_the_error_of_parse_qs(text: str) -> None:
    assert _ours(text) == _stdlib(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=12), st.text(max_size=30)), max_size=8))
def test_what_urlencode_writes(fields: list[tuple[str, str]]) -> None:
    text = urlencode(fields)
    assert _ours(text) == _stdlib(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "&",
        "a",
        "a=",
        "=a",
        "a=1&a=2&b=%20+x",
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange",
        "x=%E9",  # not UTF-8: an error, as parse_qs's
        "x=%C3%A9&%C3%A9=y",
        "é=%C3%A9",
        "a=1;b=2",  # no ';' separator
        "&".join(["f=1"] * MAX_FORM_FIELDS),
        "&".join(["f=1"] * (MAX_FORM_FIELDS + 1)),  # too many
        "&" * MAX_FORM_FIELDS,  # too many, though empty
    ],
)
def test_edges(text: str) -> None:
    assert _ours(text) == _stdlib(text)
