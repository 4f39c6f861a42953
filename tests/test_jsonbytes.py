"""broker.jsonbytes.Encoder writes the bytes ``json`` writes, or raises what ``json`` raises,
for any value and any of its options: the audit log's leaves, the approval rules' digest and the
broker's JWT payloads are these bytes."""

from __future__ import annotations

import enum
import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.jsonbytes import MAX_WALK, Encoder, _plain

OPTIONS = [
    {"sort_keys": s, "ensure_ascii": a, "allow_nan": n}
    for s in (False, True)
    for a in (False, True)
    for n in (False, True)
]


class Colour(enum.StrEnum):
    RED = "red"


class Size(enum.IntEnum):
    BIG = 7


class Plain(enum.Enum):
    ONE = 1


class Text(str):
    pass


_keys = st.text(max_size=12) | st.sampled_from(["a", "b", "é", "\U0001f600", "\ud800", "~"])
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.text(st.characters(codec="utf-8"), max_size=8)
    | st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=2)
    | st.sampled_from([Colour.RED, Size.BIG, Text("sub"), 1e-05, 1e16, -0.0])
)
VALUES = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(_keys, inner, max_size=4)
        | st.dictionaries(st.integers(-3, 3) | st.booleans() | st.none(), inner, max_size=2)
    ),
    max_leaves=16,
)


def _stdlib(value: Any, options: dict[str, bool]) -> bytes | type[BaseException]:
    try:
        return json.dumps(value, separators=(",", ":"), **options).encode()
    except Exception as exc:
        return type(exc)


def _ours(value: Any, options: dict[str, bool]) -> bytes | type[BaseException]:
    try:
        return Encoder(**options).encode(value)
    except Exception as exc:
        return type(exc)


@settings(max_examples=400, deadline=None)
@given(VALUES, st.sampled_from(OPTIONS))
def test_the_bytes_or_the_error_of_json(value: Any, options: dict[str, bool]) -> None:
    assert _ours(value, options) == _stdlib(value, options)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize(
    "value",
    [
        {"b": 1, "a": {"d": [1, 2, {"z": None}], "c": "é"}, "é": True, "\U0001f600": "\x00\x7f"},
        {"float": 1e-05},  # orjson writes 0.00001
        {"big": 2**64},  # orjson refuses past 64 bits
        {"big": -(2**63) - 1},
        {1: "int key", None: "null key"},  # orjson refuses keys that are not strings
        {"lone": "\udc80"},  # orjson refuses; json writes it and UTF-8 refuses it
        {"enum": Plain.ONE},  # orjson writes 1; json refuses
        {"uuid": uuid.UUID(int=1)},  # orjson writes it; json refuses
        {"str enum": Colour.RED, "int enum": Size.BIG, "subclass": Text("x")},
        {"tuple": (1, 2)},
        {"nan": float("nan"), "inf": float("inf")},
        "\u2028\u2029</script>",
    ],
)
def test_values_where_orjson_differs(value: Any, options: dict[str, bool]) -> None:
    assert _ours(value, options) == _stdlib(value, options)


def test_deep_nesting_past_orjsons_limit() -> None:
    value: Any = "leaf"
    for _ in range(300):
        value = {"k": [value]}
    for options in OPTIONS:
        assert _ours(value, options) == _stdlib(value, options)


def test_a_circular_value_is_refused_as_json_refuses_it() -> None:
    loop: dict[str, Any] = {"a": 1}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular reference"):
        Encoder(sort_keys=True, ensure_ascii=False, allow_nan=False).encode(loop)


@pytest.mark.parametrize(
    "value",
    [
        {"many": list(range(MAX_WALK + 5))},
        {str(n): n for n in range(MAX_WALK + 1)},
        [[[n], [n]] for n in range(MAX_WALK // 4)],  # many small containers, as many members
    ],
)
def test_more_members_than_the_walk_looks_at(value: Any) -> None:
    """The walk's cost is bounded: past MAX_WALK members, ``json`` writes the value."""
    assert not _plain(value, ascii_only=False)
    for options in OPTIONS[:2]:
        assert _ours(value, options) == _stdlib(value, options)


def test_as_many_members_as_the_walk_looks_at() -> None:
    assert _plain({"many": list(range(MAX_WALK - 1))}, ascii_only=False)


def test_an_exchanges_values_take_orjsons_path() -> None:
    """The speed is the point (docs/performance.md): an audit event's and a JWT payload's
    values are plain; floats, subclasses and non-ASCII text (for ensure_ascii) are not."""
    event = {
        "identity": {"issuer": "ci", "subject": "repo:acme/evals", "jti": "j-1"},
        "claims": {"sub": "repo:acme/evals", "groups": ["a", "b"]},
        "approval_id": None,
        "emergency": False,
        "expires_at": "2026-12-01T00:00:00.000Z",
        "idx": 12,
    }
    assert _plain(event, ascii_only=False) and _plain(event, ascii_only=True)
    assert not _plain({"x": 1.5}, ascii_only=False)
    assert not _plain({"x": Colour.RED}, ascii_only=False)
    assert _plain({"é": "é"}, ascii_only=False)
    assert not _plain({"x": "é"}, ascii_only=True)
    assert not _plain({"é": "x"}, ascii_only=True)
    assert not _plain({"x": "\x7f"}, ascii_only=True)  # ensure_ascii escapes DEL
    assert not _plain({"\x7f": "x"}, ascii_only=True)
