"""A token's header and payload are parsed as ``json.loads`` parses bytes with the verifier's
strict hooks (duplicate members and NaN refused), whatever the bytes: the same object, or a
refusal where json.loads raises; and text holding NUL or a lone surrogate is refused in every
encoding json.loads reads (UTF-8, -16, -32), however it is written."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.bounds import has_unsafe_text
from broker.errors import IdentityRejected
from broker.identity.verifier import _decode_segment, _reject_constant, _reject_duplicates

_json_text = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
).map(json.dumps)
_encodings = st.sampled_from(
    ["utf-8", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32", "utf-8-sig"]
)


def _loads(raw: bytes) -> Any:
    return json.loads(raw, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)


def _segment(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=40), st.tuples(_json_text, _encodings)))
@example(b'{"a":1,"a":2}')
@example(b'{"exp":NaN}')
@example(b'{"a":"\\ud800"}')
@example('{"sub":"a\\u0000b"}'.encode("utf-16-le"))  # the escape's bytes are not b"\\u"
@example('{"sub":"a\\ud800b"}'.encode("utf-32"))
@example(b'{"sub":"a\xed\xa0\x80b"}')  # a surrogate's UTF-8 bytes (CESU-8)
@example(b'{"sub":"\xed\x95\x9c"}')  # U+D55C, a Hangul syllable: allowed
def test_a_segment_parses_as_json_loads_parses_its_bytes(given_: Any) -> None:
    raw = given_ if isinstance(given_, bytes) else given_[0].encode(given_[1])
    try:
        expected = _loads(raw)
    except (ValueError, RecursionError, IdentityRejected):
        with pytest.raises(IdentityRejected):
            _decode_segment(_segment(raw), "payload")
        return
    if not isinstance(expected, dict):
        with pytest.raises(IdentityRejected, match="not a JSON object"):
            _decode_segment(_segment(raw), "payload")
        return
    if has_unsafe_text(expected):  # NUL or a lone surrogate, in any encoding: refused
        with pytest.raises(IdentityRejected, match="NUL character or an unpaired surrogate"):
            _decode_segment(_segment(raw), "payload")
        return
    assert _decode_segment(_segment(raw), "payload") == expected
