"""An event prepared before the write lock (broker.audit.log.prepare_event) is, once its index is
spliced in, byte for byte the event encoded whole at that index; what cannot be split is left
whole, and the size limit still holds."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.audit.log import (
    MAX_EVENT_BYTES,
    NewEvent,
    PreparedEvent,
    encode_event,
    prepare_event,
)

NOW = dt.datetime(2026, 12, 1, 18, 5, 1, 123456, tzinfo=dt.UTC)

# Names around "idx" in sort order, the top-level names the event has itself, and any text.
NAMES = st.one_of(
    st.sampled_from(["", "a", "at", "i", "id", "idw", "idx0", "idy", "IDX", "type", "v", "zz"]),
    st.sampled_from(["grant_id", "idx\x00", "id\uffff", "é", "☃"]),
    st.text(max_size=8),
).filter(lambda name: name != "idx")
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.one_of(NAMES, st.just("idx")), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(
    data=st.dictionaries(NAMES, VALUES, max_size=8),
    idx=st.integers(min_value=0, max_value=2**63 - 1),
    grant_id=st.none() | st.text(max_size=10),
)
def test_a_prepared_event_encodes_to_the_bytes_of_the_whole_event(
    data: dict[str, Any], idx: int, grant_id: str | None
) -> None:
    event = NewEvent("exchange.allowed", NOW, data, grant_id)
    prepared = prepare_event(event)
    assert isinstance(prepared, PreparedEvent)
    assert prepared.encode(idx) == encode_event(idx, event)
    assert prepared.at == NOW  # no dialect: the time as it is


@pytest.mark.parametrize(
    "data",
    [{"idx": 7}, {"nested": math.nan}, {"inf": math.inf}, {"set": {1, 2}}],
    ids=["names idx", "NaN", "infinity", "not JSON"],
)
def test_an_event_that_cannot_be_split_is_left_whole(data: dict[str, Any]) -> None:
    event = NewEvent("t", NOW, data)
    assert prepare_event(event) is event
    if "idx" in data:  # encoded whole, its data's idx wins, as before
        assert b'"idx":7' in encode_event(3, event)
    else:
        with pytest.raises((ValueError, TypeError)):
            encode_event(3, event)


def test_the_size_limit_holds_once_the_index_is_in() -> None:
    # One byte under the limit at index 9; index 10 adds the byte that crosses it.
    probe = encode_event(9, NewEvent("t", NOW, {"x": ""}))
    event = NewEvent("t", NOW, {"x": "y" * (MAX_EVENT_BYTES - len(probe))})
    prepared = prepare_event(event)
    assert isinstance(prepared, PreparedEvent)
    assert len(prepared.encode(9)) == MAX_EVENT_BYTES
    with pytest.raises(ValueError, match="the limit is"):
        prepared.encode(10)
    with pytest.raises(ValueError, match="the limit is"):
        encode_event(10, event)
