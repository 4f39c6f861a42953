"""Durations as the policy file and the command line write them: ``"15m"`` → 900.

NOTE: pure and dependency-free: the policy schema (pydantic) and the lean side (``broker agent
--ttl``, :mod:`broker.client`) share this one grammar without the lean side importing pydantic.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> int:
    """``"15m"`` → 900. Accepts a positive int of seconds or ``<n>s|m|h|d``.

    Raises:
        ValueError: anything else, or a duration that is not positive.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 15m, 1h or 30s")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and (m := _DURATION.match(value.strip())):
        seconds = int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    else:
        raise ValueError(f"expected a duration such as 15m, 1h or 30s, got {value!r}")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds
