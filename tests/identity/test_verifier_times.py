"""The verifier's time checks exactly at their limits, and what a verified person carries: the
survivors of mutmut on broker/identity/verifier.py (docs/testing.md). ``NOW`` is the env's clock."""

from __future__ import annotations

import pytest

from broker.errors import IdentityRejected
from broker.identity import LEEWAY_SECONDS

from .support import NOW, SSO, Env

T = int(NOW)


@pytest.mark.parametrize(
    ("claims", "accepted"),
    [
        ({"exp": T - LEEWAY_SECONDS + 1}, True),
        ({"exp": T - LEEWAY_SECONDS}, False),  # expired, even counting the leeway
        ({"nbf": T - 3600}, True),  # valid since an hour: the usual case
        ({"nbf": T + LEEWAY_SECONDS}, True),
        ({"nbf": T + LEEWAY_SECONDS + 1}, False),
    ],
)
def test_time_limits(env: Env, claims: dict[str, int], accepted: bool) -> None:
    token = env.token(**claims)
    if accepted:
        assert env.verifier.verify_workload(token).subject == "workload-1"
    else:
        with pytest.raises(IdentityRejected, match=f"leeway {LEEWAY_SECONDS}s"):
            env.verifier.verify_workload(token)


def test_a_person_carries_the_issuer_url_and_the_raw_groups(env: Env) -> None:
    """Per-model approver groups are matched against ``groups`` (the roles claim's values)."""
    token = env.token(SSO, groups=["ml-safety-reviewers", "model-owners"])
    person = env.verifier.verify_person(token)
    assert person.issuer == SSO
    assert person.groups == frozenset({"ml-safety-reviewers", "model-owners"})
    assert person.roles == frozenset({"approver"})
