"""The pure rollback gate: only a recorded, passed test of exactly the request's rollback point,
fresh and reported by someone other than the requester, lets the request through; the message
names what is missing."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from broker.approvals.rollback import RecordedTest, Requester, rollback_gap

NOW = dt.datetime(2026, 11, 25, 12, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
MAX_AGE = 7 * 86400
SHA = "ab" * 32
LINEAGE: dict[str, Any] = {"rollback_point": {"uri": "s3://models/llama-7b/v41", "sha256": SHA}}
REQUESTER = Requester("dev", "repo:acme/release:ref:refs/heads/main", frozenset())
TESTER = ("dev", "repo:acme/rollback-drills:ref:refs/heads/main")


def recorded(
    name: str = "rt_1",
    *,
    passed: bool = True,
    ago: dt.timedelta = DAY,
    ran_ago: dt.timedelta | None = None,
    reporter: tuple[str, str] = TESTER,
    persons: frozenset[str] = frozenset(),
) -> RecordedTest:
    return RecordedTest(
        id=name,
        passed=passed,
        recorded_at=NOW - ago,
        tested_at=NOW - (ran_ago or ago),
        reporter=reporter,
        reporter_persons=persons,
    )


def gap(
    tests: list[RecordedTest],
    lineage: dict[str, Any] | None = LINEAGE,
    requester: Requester = REQUESTER,
) -> str | None:
    return rollback_gap(
        lineage, tests, model="llama-7b", requester=requester, now=NOW, max_age=MAX_AGE
    )


def test_a_recorded_fresh_passed_test_by_someone_else_lets_the_request_through() -> None:
    assert gap([recorded()]) is None


@pytest.mark.parametrize(
    ("lineage", "missing"),
    [
        (None, "lineage.rollback_point is missing"),
        ({"datasets": []}, "lineage.rollback_point is missing"),
        ({"rollback_point": {"uri": "s3://models/llama-7b/v41"}}, "sha256 is missing"),
    ],
)
def test_the_rollback_point_must_be_named_with_its_digest(
    lineage: dict[str, Any] | None, missing: str
) -> None:
    message = gap([recorded()], lineage)
    assert message is not None and missing in message


def test_self_reported_evidence_in_the_lineage_does_not_count() -> None:
    point = {
        **LINEAGE["rollback_point"],
        "test": {"ref": "ci://rb/1", "result": "passed", "tested_at": NOW.isoformat()},
    }
    message = gap([], {"rollback_point": point})
    assert message is not None
    assert "no rollback test of s3://models/llama-7b/v41 (sha256 abababababab…)" in message
    assert "is recorded for model llama-7b" in message
    assert "evidence in the request's own lineage does not count" in message


def test_a_failed_test_does_not_count() -> None:
    message = gap([recorded(passed=False)])
    assert message is not None and "the newest recorded rollback test of" in message
    assert "failed (rt_1" in message


def test_a_failure_recorded_after_a_pass_outweighs_it() -> None:
    passed, failed = recorded("rt_pass", ago=2 * DAY), recorded("rt_fail", passed=False, ago=DAY)
    message = gap([passed, failed])
    assert message is not None and "failed (rt_fail" in message
    # ... and a pass recorded after the failure counts again.
    assert gap([passed, failed, recorded("rt_again", ago=DAY / 2)]) is None


def test_a_stale_test_does_not_count_and_the_message_says_how_old() -> None:
    message = gap([recorded(ago=8 * DAY)])
    assert message is not None
    assert "ran at 2026-11-17T12:00:00+00:00, 691200 s ago" in message
    assert "at most 604800 s (rollback_test_max_age)" in message
    assert gap([recorded(ago=7 * DAY)]) is None  # exactly the maximum age is still fine


def test_the_age_counts_from_when_the_test_ran_when_it_says_earlier() -> None:
    # Recorded yesterday, but it ran eight days ago by its own account.
    message = gap([recorded(ago=DAY, ran_ago=8 * DAY)])
    assert message is not None and "rollback_test_max_age" in message


def test_a_test_the_requester_reported_itself_does_not_count() -> None:
    mine = recorded(reporter=(REQUESTER.issuer, REQUESTER.subject))
    message = gap([mine])
    assert message is not None
    assert "reported by the requester itself or by the same person" in message
    assert "someone other than the requester must test the rollback" in message
    # Nor one it reported with its subject in another case.
    shouted = recorded(reporter=(REQUESTER.issuer, REQUESTER.subject.upper()))
    assert gap([shouted]) is not None
    # Nor a test the same person reported through another identity.
    alices = Requester("dev", "repo:acme/release:ref:refs/heads/main", frozenset({"alice"}))
    theirs = recorded(persons=frozenset({"alice", "ops"}))
    message = gap([theirs], requester=alices)
    assert message is not None and "the same person: alice" in message
    # Someone else's test, beside the requester's own, is enough.
    assert gap([mine, recorded("rt_2")]) is None
    assert gap([theirs, recorded("rt_2", persons=frozenset({"bob"}))], requester=alices) is None


def test_only_a_test_that_is_passed_fresh_and_independent_at_once_counts() -> None:
    """Each condition met by some test, but none meeting all: still refused."""
    stale_independent = recorded("rt_old", ago=9 * DAY)
    fresh_own = recorded("rt_own", reporter=(REQUESTER.issuer, REQUESTER.subject))
    message = gap([stale_independent, fresh_own])
    assert message is not None and "reported by the requester itself" in message


@pytest.mark.parametrize(("age", "refused"), [(MAX_AGE, False), (MAX_AGE + 1, True)])
def test_the_age_limit_at_its_edge(age: int, refused: bool) -> None:
    """Exactly rollback_test_max_age old still counts; a second more does not."""
    test = recorded(ago=dt.timedelta(seconds=age))
    assert (gap([test]) is not None) is refused
