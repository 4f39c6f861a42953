"""The per-address budget of unverifiable attempts and the tally of what it held back."""

from __future__ import annotations

import datetime as dt

from broker.grants.refusals import OTHER_CLIENTS, RefusalBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_holds_burst_attempts_and_refills_at_rate() -> None:
    clock = Clock()
    budget = RefusalBudget(burst=3, rate=2.0, clock=clock)
    assert [budget.take("a") for _ in range(4)] == [None, None, None, 1]  # 1 token at 2/s: 1 s
    assert budget.take("b") is None  # another address has its own
    clock.now += 0.5
    assert budget.take("a") is None
    assert budget.take("a") == 1
    clock.now += 3600
    assert [budget.take("a") for _ in range(4)] == [None, None, None, 1]  # never beyond burst


def test_a_refund_gives_the_token_back_up_to_the_burst() -> None:
    budget = RefusalBudget(burst=2, rate=0.001, clock=Clock())
    for _ in range(10):  # a busy client whose attempts all succeed
        assert budget.take("a") is None
        budget.refund("a")
    budget.refund("a")
    assert [budget.take("a") for _ in range(3)] == [None, None, 1000]


def test_retry_after_is_whole_seconds_until_one_attempt() -> None:
    budget = RefusalBudget(burst=1, rate=0.1, clock=Clock())
    budget.take("a")
    assert budget.take("a") == 10


def test_the_oldest_bucket_is_forgotten_past_the_limit() -> None:
    budget = RefusalBudget(burst=1, rate=0.001, clock=Clock(), max_clients=2)
    for client in ("a", "b", "c"):  # "a" is forgotten: a forgotten bucket is a full one
        assert budget.take(client) is None
    assert budget.take("a") is None
    assert budget.take("c") is not None


def test_tallies_are_drained_once_and_bounded() -> None:
    at = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    budget = RefusalBudget(burst=1, rate=1, wall_clock=lambda: at, max_clients=2)
    budget.count("a", "/v1/token", "rate_limited")
    budget.count("a", "/v1/token", "rate_limited")
    budget.count("a", "/v1/token", "malformed")
    budget.count("b", "/v1/introspect", "rate_limited")
    budget.count("c", "/v1/token", "rate_limited")  # past the limit: counted, as "other"
    drained = budget.drain()
    assert [(s["client"], s["endpoint"], s["total"]) for s in drained] == [
        ("a", "/v1/token", 3),
        ("b", "/v1/introspect", 1),
        (OTHER_CLIENTS, "/v1/token", 1),
    ]
    assert drained[0]["counts"] == {"malformed": 1, "rate_limited": 2}
    assert drained[0]["since"] == "2026-12-01T00:00:00.000Z"
    assert budget.drain() == []


def test_restored_summaries_are_counted_again_with_what_came_meanwhile() -> None:
    budget = RefusalBudget(burst=1, rate=1)
    budget.count("a", "/v1/token", "rate_limited")
    drained = budget.drain()
    budget.count("a", "/v1/token", "rate_limited")
    budget.restore(drained)
    [again] = budget.drain()
    assert again["counts"] == {"rate_limited": 2}
