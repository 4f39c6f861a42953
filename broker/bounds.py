"""Bounds on caller-supplied input: every number, JSON document and string a caller sends is
checked against a limit before it costs work or lands in an error or an audit event.

Pure: no I/O. The limits are listed in ``docs/security.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from broker.errors import InvalidRequest

MAX_SHOWN_CHARS = 256
"""A caller-supplied string in an error description or an audit event is cut to this many
characters, with a marker that gives its full length and the SHA-256 of the whole value."""

MAX_INT_DIGITS = 9
"""Integers given as text (``requested_ttl``) have at most this many ASCII digits."""

MAX_JSON_DEPTH = 8
"""Nesting depth of a JSON document a caller sends (``lineage``)."""

MAX_JSON_NUMBER_CHARS = 32
"""Characters of one number in such a document."""

_DIGITS = re.compile(rf"[0-9]{{1,{MAX_INT_DIGITS}}}")


def capped(value: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``value`` itself when it has at most ``limit`` characters, else its first ``limit``
    characters and ``…[N characters, sha256:HEX]`` (so two long values stay distinguishable)."""
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{value[:limit]}…[{len(value)} characters, sha256:{digest}]"


def shown(value: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """:func:`capped`, quoted with control characters escaped: for error descriptions."""
    return repr(capped(value, limit))


def ascii_int(text: str, name: str) -> int:
    """A positive integer written in 1 to MAX_INT_DIGITS ASCII digits. Raises InvalidRequest.

    NOTE: ``str.isdigit`` and ``int`` accept other scripts' digits (``'²'``, ``'٣'``) and
    ``int`` spends quadratic time on long strings; neither is a number a caller means."""
    if not _DIGITS.fullmatch(text) or int(text) <= 0:
        raise InvalidRequest(
            f"{name}: expected a positive whole number of at most {MAX_INT_DIGITS} digits 0-9"
        )
    return int(text)


def has_unsafe_text(value: object) -> bool:
    """Whether a string in a parsed JSON ``value`` holds NUL or an unpaired surrogate: JSON's
    escapes allow both, and neither the store, the log nor a backend takes them."""
    if isinstance(value, str):
        return "\x00" in value or any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return any(has_unsafe_text(k) or has_unsafe_text(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_unsafe_text(v) for v in value)
    return False


def _depth(raw: str) -> int:
    """The deepest nesting of arrays and objects in ``raw`` (strings are skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in raw:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _number(text: str) -> int | float:
    if len(text) > MAX_JSON_NUMBER_CHARS:
        raise ValueError(f"a number longer than {MAX_JSON_NUMBER_CHARS} characters")
    if not any(c in text for c in ".eE"):
        return int(text)
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is beyond any finite number")
    return number


def _constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def bounded_json(raw: str, name: str, *, max_bytes: int) -> Any:
    """Parse a caller's JSON document of at most ``max_bytes`` (UTF-8), MAX_JSON_DEPTH levels
    and numbers of at most MAX_JSON_NUMBER_CHARS characters. Raises InvalidRequest naming
    ``name`` and what was wrong.

    NOTE: the depth is measured before parsing: the parser recurses once per level, and a deep
    document would otherwise end in RecursionError rather than a refusal."""
    if len(raw) > max_bytes or len(raw.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidRequest(f"{name} is larger than {max_bytes} bytes")
    if _depth(raw) > MAX_JSON_DEPTH:
        raise InvalidRequest(f"{name} is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(raw, parse_int=_number, parse_float=_number, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{name} is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except ValueError as exc:
        raise InvalidRequest(f"{name} is not acceptable JSON: {exc}") from None
    if has_unsafe_text(value):
        raise InvalidRequest(f"{name} holds a NUL character or an unpaired surrogate")
    return value
