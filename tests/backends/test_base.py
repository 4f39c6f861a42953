"""The backend registry's helpers: the readiness probe cache, timed backend calls."""

from __future__ import annotations

import pytest

from broker.backends.base import BackendRegistry, CachedProbe
from broker.errors import BackendUnavailable


def test_a_probe_runs_at_most_once_per_interval_and_its_outcome_is_reused() -> None:
    outcomes = iter(["vault at x is sealed (sys/health)", None])
    calls: list[float] = []
    now = [100.0]

    def probe() -> str | None:
        calls.append(now[0])
        return next(outcomes)

    cached = CachedProbe(probe, ttl=5.0)
    cached.clock = lambda: now[0]
    assert cached() == "vault at x is sealed (sys/health)"
    now[0] += 4.9
    assert cached() == "vault at x is sealed (sys/health)"  # a failure is cached too
    assert calls == [100.0]
    now[0] += 0.1
    assert cached() is None
    assert cached() is None
    assert calls == [100.0, 105.0]


def test_timed_calls_tell_the_observer_their_duration_and_failure() -> None:
    seen: list[tuple[str, str, bool]] = []
    seconds: list[float] = []

    def observe(backend: str, operation: str, took: float, failed: bool) -> None:
        seen.append((backend, operation, failed))
        seconds.append(took)

    registry = BackendRegistry({}, observe=observe)
    with registry.timed("vault", "issue"):
        pass
    with registry.timed("vault", "revoke") as call:
        call.failed = True  # the backend did not confirm
    with pytest.raises(BackendUnavailable), registry.timed("aws", "issue"):
        raise BackendUnavailable("aws is down")
    assert seen == [("vault", "issue", False), ("vault", "revoke", True), ("aws", "issue", True)]
    assert all(took >= 0 for took in seconds)
    with BackendRegistry({}).timed("jwt", "issue"):
        pass  # no observer: nothing to tell
