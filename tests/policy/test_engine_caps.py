"""The engine's caps, as mutmut found them untested (docs/testing.md): a tier's ``max_ttl`` on
top of the action's, the smallest positive TTL, and the tier a deny still names. The shared
policy's tier caps equal its actions' caps, so only a policy where they differ shows them."""

from __future__ import annotations

from typing import Any

import pytest

from broker.policy import Outcome, decide
from tests.policy.test_engine import trainer_identity


@pytest.mark.parametrize(
    ("tier_cap", "requested", "granted"),
    [
        ("10m", None, 600),  # the tier caps below the action's 4h
        ("10m", 3600, 600),
        ("10m", 60, 60),
        ("8h", None, 4 * 3600),  # a tier cap above the action's leaves the action's
    ],
)
def test_the_tier_caps_the_ttl_on_top_of_the_action(
    parse: Any,
    policy_doc: Any,
    make_identity: Any,
    tier_cap: str,
    requested: int | None,
    granted: int,
) -> None:
    policy_doc["tiers"] = {"elevated": {"max_ttl": tier_cap}}
    decision = decide(
        parse(policy_doc),
        trainer_identity(make_identity),
        "llama-7b",
        "fine-tune",
        "jwt",
        requested_ttl=requested,
    )
    assert decision.outcome is Outcome.APPROVAL_REQUIRED
    assert decision.ttl_seconds == granted


def test_one_second_is_a_ttl(loaded: Any, make_identity: Any) -> None:
    decision = decide(loaded, make_identity(), "llama-7b", "evaluate", "jwt", requested_ttl=1)
    assert decision.ttl_seconds == 1


def test_a_deny_names_the_tier_of_the_action_asked_for(loaded: Any, make_identity: Any) -> None:
    decision = decide(loaded, make_identity(issuer_name="cluster"), "llama-7b", "fine-tune", "jwt")
    assert (decision.outcome, decision.tier) == (Outcome.DENY, "elevated")
