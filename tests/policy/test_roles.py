"""broker/policy/roles.py: which models a person's role covers."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.identity.types import Person, _seal_person
from broker.policy import load_policy
from broker.policy.model import Policy
from broker.policy.roles import access_for, may_interfere
from tests.vendor import SCOPED_ROLES, vendor_policy


def person(*groups: str) -> Person:
    return _seal_person(
        issuer_name="sso",
        issuer="https://sso.example.com",
        subject="someone",
        roles=frozenset(),
        groups=frozenset(groups),
        expires_at=0,
    )


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    extra = "  auditor: [security-audit, {group: vendor-audit, models: ['vendor-*']}, " + (
        "{group: tts-audit, models: [vendor-tts, 'other-*']}]\n"
    )
    roles = SCOPED_ROLES.replace(
        '  auditor: [security-audit, {group: vendor-audit, models: ["vendor-*"]}]\n', extra
    )
    assert roles != SCOPED_ROLES
    return load_policy(vendor_policy(tmp_path, roles=roles), dev_mode=True).policy


def test_plain_groups_cover_every_model_and_scoped_ones_their_globs(policy: Policy) -> None:
    customer = access_for(policy, person("ml-platform-admins"), "admin")
    assert customer.unscoped and customer.allows("anything")
    vendor = access_for(policy, person("vendor-ops"), "auditor", "admin")
    assert (vendor.roles, vendor.patterns) == (("admin",), ("vendor-*",))
    assert vendor.allows("vendor-llm") and not vendor.allows("llama-7b")
    assert not vendor.allows("vendor-x/../llama")  # a glob's * stops at /
    assert vendor.models_in(["llama-7b", "vendor-tts", "vendor-llm"]) == [
        "vendor-llm",
        "vendor-tts",
    ]
    both = access_for(policy, person("vendor-audit", "tts-audit"), "auditor")
    assert both.patterns == ("vendor-*", "vendor-tts", "other-*")  # the union
    nobody = access_for(policy, person("nobody"), "admin")
    assert nobody.patterns == () and not nobody.allows("vendor-llm")


def test_a_scoped_role_covers_its_own_globs_and_single_models_only(policy: Policy) -> None:
    vendor = access_for(policy, person("vendor-audit"), "auditor")
    assert [
        vendor.covers_glob(g) for g in ("vendor-*", "vendor-llm", "vendor-?", "*", "llama-7b")
    ] == [
        True,
        True,
        False,
        False,
        False,
    ]


def test_only_an_unscoped_role_may_interfere_with_the_rollback_path(policy: Policy) -> None:
    rollback = policy.actions["rollback-weights"]
    ordinary = policy.actions["fine-tune"]
    vendor = access_for(policy, person("vendor-ops"), "admin")
    customer = access_for(policy, person("ml-platform-admins"), "admin")
    assert not may_interfere(vendor, rollback) and may_interfere(vendor, ordinary)
    assert may_interfere(customer, rollback)
