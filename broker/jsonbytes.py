"""Compact JSON bytes exactly as the standard library's ``json`` writes them, by orjson
wherever orjson writes the same bytes.

NOTE: why (docs/performance.md, "Results after the JSON encoder"): every exchange encodes its
audit event (the two halves around its index), its JWT's payload and its answer. The standard
library's encoder took 5-16 µs for each of them on the exchange path, orjson about one.

Same bytes is the rule, not a hope: the audit log's leaves and the approval rules' digest are
these bytes, and a JWT's payload is compared with PyJWT's. orjson writes what
``json.dumps(value, separators=(",", ":"))`` writes for values made only of ``str``, ``int``,
``bool``, ``None``, ``dict`` with ``str`` keys and ``list`` (exact types), in any nesting up to
its limit, with ``ensure_ascii`` where every string is ASCII but DEL (which ``json`` then
escapes). It writes other things differently: a float (``1e-05`` against ``0.00001``), types
``json`` refuses (dataclasses, datetimes, UUIDs, enums), subclasses; and it refuses what
``json`` takes (integers past 64 bits, keys that are not strings, nesting past 254, lone
surrogates). So a value that is not plain in that sense, or that orjson refuses, is written by
``json``, with the same options: the same bytes, or the same error (``tests/test_jsonbytes.py``).

Two differences remain, neither reachable here: orjson does not count Python's recursion limit
(nesting that ``json`` refuses with RecursionError under a lowered limit, or from a deep stack,
orjson writes), and a value another thread changes between the walk and the writing is written
as it is then (every caller encodes a value it has just built).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

MAX_WALK = 10_000
"""Members of containers looked at before a value counts as not plain and goes to ``json``
(which finds a circular reference, where a walk would go round for ever)."""

_SCALARS = frozenset({str, int, bool, type(None)})


def _ascii(text: str) -> bool:
    """What ``ensure_ascii`` leaves as it is (and escapes the rest of)."""
    return text.isascii() and "\x7f" not in text


def _plain(value: Any, ascii_only: bool) -> bool:
    """Whether ``value`` holds only the exact types orjson writes as ``json`` does (strings
    ASCII but DEL when ``ascii_only``), with at most MAX_WALK members in all its containers:
    the walk's cost is bounded, whatever the value."""
    pending = [value]
    budget = MAX_WALK
    while pending:
        item = pending.pop()
        kind = type(item)
        if kind is dict or kind is list:
            budget -= len(item)
            if budget < 0:
                return False
            if kind is list:
                pending.extend(item)
                continue
            for key in item:
                if type(key) is not str or (ascii_only and not _ascii(key)):
                    return False
            pending.extend(item.values())
        elif kind is str:
            if ascii_only and not _ascii(item):
                return False
        elif kind not in _SCALARS:
            return False
    return True


class Encoder:
    """``json.dumps(value, separators=(",", ":"), sort_keys=..., ensure_ascii=...,
    allow_nan=...).encode()``, made once."""

    def __init__(self, *, sort_keys: bool, ensure_ascii: bool, allow_nan: bool) -> None:
        self._json = json.JSONEncoder(
            separators=(",", ":"),
            sort_keys=sort_keys,
            ensure_ascii=ensure_ascii,
            allow_nan=allow_nan,
        )
        self._option = orjson.OPT_SORT_KEYS if sort_keys else 0
        self._ascii = ensure_ascii

    def encode(self, value: Any) -> bytes:
        """``value``'s JSON, UTF-8; raises what ``json`` raises for it (TypeError, ValueError,
        UnicodeEncodeError, RecursionError)."""
        if _plain(value, self._ascii):
            try:
                return orjson.dumps(value, option=self._option)
            except orjson.JSONEncodeError:  # too large an integer, too deep, a lone surrogate
                pass
        return self._json.encode(value).encode()
