"""Waiting for a condition in tests, with a bound rather than a timed assertion."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
POLL_LIMIT_S = 60.0


def poll(get: Callable[[], T | None], what: str, limit: float = POLL_LIMIT_S) -> T:
    """``get()``'s first value that is not None; fails naming ``what`` after ``limit`` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = get()
        if value is not None:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting: {what}")


SERVE_POLL_S = 0.05
"""How often a test's ``serve_forever`` loop looks for its ``shutdown()``: socketserver's default
(0.5 s) made every stop of a test server wait up to half a second. Requests are answered as they
arrive either way; this only bounds how long a stop waits."""
