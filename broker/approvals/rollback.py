"""The rollback gate, pure: may a request for a ``rollback_tested: required`` action be
approved (and later used), given the rollback tests the broker recorded? No I/O;
:mod:`broker.approvals.rollback_tests` reads the tests and applies it.

NOTE: only tests the broker recorded count (``POST /v1/rollback-tests``, reported by a workload
the policy allows ``rollback-test``). A ``rollback_point.test`` inside the requester's own
lineage is the requester vouching for itself: it is kept as information and never counts.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RecordedTest:
    """A rollback test of one rollback point as the broker recorded it."""

    id: str
    passed: bool
    recorded_at: dt.datetime
    tested_at: dt.datetime
    """When the test ran, for its age: its reported ``finished_at`` when earlier than when the
    broker recorded it, else that (a report never makes a test younger than it says)."""
    reporter: tuple[str, str]
    """(issuer name, subject) of the workload that reported it."""
    reporter_persons: frozenset[str]
    """The people (``policy.people``) the reporter's identity maps to."""


@dataclass(frozen=True, slots=True)
class Requester:
    issuer: str
    subject: str
    persons: frozenset[str]


def rollback_gap(
    lineage: Mapping[str, Any] | None,
    tests: Sequence[RecordedTest],
    *,
    model: str,
    requester: Requester,
    now: dt.datetime,
    max_age: int,
) -> str | None:
    """What is missing before this request may be approved or used, or None when a recorded,
    passed test of exactly its ``rollback_point`` (uri and sha256), at most ``max_age`` seconds
    old and reported by neither the requester nor the same person, allows it.

    ``tests`` are the recorded tests of that exact point for ``model``. A failed test recorded
    after the last passed ones outweighs them: the newest evidence says rolling back breaks.
    """
    point = (lineage or {}).get("rollback_point")
    if not point:
        return "lineage.rollback_point is missing: name the rollback point (uri, sha256)"
    uri, sha256 = point["uri"], point.get("sha256")
    if not sha256:
        return (
            f"lineage.rollback_point.sha256 is missing: a recorded rollback test covers exactly "
            f"one uri and sha256, so name the digest of {uri}"
        )
    where = f"{uri} (sha256 {sha256[:12]}…)"
    if not tests:
        return (
            f"no rollback test of {where} is recorded for model {model}: a rollback tester "
            "reports one (POST /v1/rollback-tests, broker rollback-tests report); evidence in "
            "the request's own lineage does not count"
        )
    newest = sorted(tests, key=lambda t: (t.recorded_at, t.id), reverse=True)
    failures = [t for t in newest if not t.passed]
    since = failures[0].recorded_at if failures else None
    passed = [t for t in newest if t.passed and (since is None or t.recorded_at > since)]
    if not passed:
        last = failures[0]
        return (
            f"the newest recorded rollback test of {where} failed ({last.id}, recorded "
            f"{last.recorded_at.isoformat()}): a passed test recorded after it is needed"
        )
    fresh = [t for t in passed if (now - t.tested_at).total_seconds() <= max_age]
    if not fresh:
        last = passed[0]
        age = int((now - last.tested_at).total_seconds())
        return (
            f"the newest passed rollback test of {where} ({last.id}) ran at "
            f"{last.tested_at.isoformat()}, {age} s ago; the policy accepts at most {max_age} s "
            "(rollback_test_max_age)"
        )
    if any(_independent(t, requester) for t in fresh):
        return None
    who = sorted({f"{t.reporter[1]} ({t.reporter[0]})" for t in fresh})
    shared = sorted(set().union(*(t.reporter_persons & requester.persons for t in fresh)))
    same = f"; the same person: {', '.join(shared)}" if shared else ""
    return (
        f"every fresh passed rollback test of {where} was reported by the requester itself or "
        f"by the same person ({', '.join(who)}{same}): someone other than the requester must "
        "test the rollback"
    )


def _independent(test: RecordedTest, requester: Requester) -> bool:
    # NOTE: separation of duties, as for reviews: the same identity (its subject ignoring
    # case, as rules.counts_as has it), or another identity that the policy maps to the same
    # person (persons_of ignores case too), does not test its own rollback.
    issuer, subject = test.reporter
    if (issuer, subject.casefold()) == (requester.issuer, requester.subject.casefold()):
        return False
    return not test.reporter_persons & requester.persons
