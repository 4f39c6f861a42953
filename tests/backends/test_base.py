"""The backend registry's helpers: the readiness probe cache."""

from __future__ import annotations

from broker.backends.base import CachedProbe


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
