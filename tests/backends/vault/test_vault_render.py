"""The pure half of the vault backend: policy rendering and the plan (no server)."""

from __future__ import annotations

import re
from pathlib import Path

import hcl2
import pytest

from broker.backends.vault import (
    ActionAccess,
    DatabaseAccess,
    StaticToken,
    VaultBackend,
    VaultConfig,
    plan_vault,
    render_policy,
)
from broker.errors import ConfigError, InvalidRequest
from broker.policy import parse_policy
from broker.policy.model import VaultBackendConfig
from tests.backends.vault.conftest import EXAMPLE_CONFIG, example_policy

PATHS = VaultBackendConfig(policy_paths=["secret/data/models/llama-7b/*"])
HCL_OPTIONS = hcl2.SerializationOptions(
    strip_string_quotes=True, explicit_blocks=False, with_comments=False
)


def rules(hcl: str) -> dict[str, list[str]]:
    """A rendered policy as Vault reads it: path → capabilities."""
    parsed = hcl2.loads(hcl, serialization_options=HCL_OPTIONS)
    return {path: body["capabilities"] for block in parsed["path"] for path, body in block.items()}


def test_evaluate_reads_the_models_paths() -> None:
    name, hcl = render_policy("llama-7b", "evaluate", PATHS, VaultConfig())
    assert name == "broker-llama-7b-evaluate"
    assert rules(hcl) == {"secret/data/models/llama-7b/*": ["read", "list"]}


def test_fine_tune_adds_write_on_checkpoints_only() -> None:
    _, hcl = render_policy("llama-7b", "fine-tune", PATHS, VaultConfig())
    assert rules(hcl) == {
        "secret/data/models/llama-7b/*": ["read", "list"],
        # Vault applies only the most specific path, so the subpath carries the union.
        "secret/data/models/llama-7b/checkpoints/*": ["create", "read", "update", "list"],
    }


def test_action_capabilities_are_configurable() -> None:
    config = VaultConfig(action_access={"evaluate": ActionAccess(("read",))})
    _, hcl = render_policy("llama-7b", "evaluate", PATHS, config)
    assert rules(hcl) == {"secret/data/models/llama-7b/*": ["read"]}


def test_database_action_may_only_read_its_creds() -> None:
    _, hcl = render_policy("llama-7b", "evaluate", PATHS, EXAMPLE_CONFIG)
    assert rules(hcl) == {"database/creds/llama-7b-eval-results": ["read"]}


def test_action_without_access_is_refused() -> None:
    with pytest.raises(ConfigError, match="no capabilities for action 'retrain'"):
        render_policy("llama-7b", "retrain", PATHS, VaultConfig())


@pytest.mark.parametrize(
    "path", ["sys/policies/acl/*", "auth/token/create", "identity/entity/*", "*", "+/data/x"]
)
def test_paths_that_reach_vault_itself_are_refused(path: str) -> None:
    with pytest.raises(ConfigError, match="control paths"):
        render_policy(
            "llama-7b", "evaluate", VaultBackendConfig(policy_paths=[path]), VaultConfig()
        )


def test_templated_paths_are_refused() -> None:
    cfg = VaultBackendConfig(policy_paths=["secret/data/{{identity.entity.id}}/*"])
    with pytest.raises(ConfigError, match="no templates"):
        render_policy("llama-7b", "evaluate", cfg, VaultConfig())


def test_a_path_cannot_inject_rules() -> None:
    sneaky = 'secret/data/x" { capabilities = ["read"] } path "sys/*'
    _, hcl = render_policy(
        "m", "evaluate", VaultBackendConfig(policy_paths=[sneaky]), VaultConfig()
    )
    parsed = rules(hcl)
    assert len(parsed) == 1
    assert "sys/*" not in parsed


def test_sudo_is_never_handed_out() -> None:
    config = VaultConfig(action_access={"evaluate": ActionAccess(("read", "sudo"))})
    with pytest.raises(ConfigError, match=r"\['sudo'\] are not allowed"):
        render_policy("llama-7b", "evaluate", PATHS, config)


@pytest.mark.parametrize("model", ["Llama/7B", "llama-7b\n", "-x"])
def test_names_must_be_vault_policy_names(model: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"model name {model!r}")):
        render_policy(model, "evaluate", PATHS, VaultConfig())


POLICY = """
issuers: [{name: ci, issuer: "https://ci.example", audiences: [broker]}]
actions:
  b-c: {tier: low, max_ttl: 10m}
  c: {tier: low, max_ttl: 20m}
models:
  a: {backends: {vault: {policy_paths: ["secret/data/a/*"]}}}
  a-b: {backends: {vault: {policy_paths: ["secret/data/a-b/*"]}}}
rules:
  - {name: r, issuer: ci, subject: s, models: ["a*"], actions: [c, b-c], backends: [vault]}
"""


def test_two_pairs_with_one_policy_name_are_refused() -> None:
    # ("a", "b-c") and ("a-b", "c") would share broker-a-b-c: one's token would get the other's.
    config = VaultConfig(
        action_access={"b-c": ActionAccess(("read",)), "c": ActionAccess(("read",))}
    )
    policy = parse_policy(POLICY, source="p.yaml", base_dir=Path("."))
    with pytest.raises(ConfigError, match="both render to Vault policy 'broker-a-b-c'"):
        plan_vault(policy.policy, config)


def test_plan_for_the_example_policy() -> None:
    plan = plan_vault(example_policy().policy, EXAMPLE_CONFIG)
    assert plan.token_role.allowed_policies == (
        "broker-llama-7b-deploy-weights",
        "broker-llama-7b-edit-safety-filter",
        "broker-llama-7b-evaluate",
        "broker-llama-7b-fine-tune",
    )
    assert plan.token_role.token_explicit_max_ttl == 4 * 3600  # fine-tune's max_ttl
    assert plan.token_role.orphan and not plan.token_role.renewable
    assert plan.database_for == {("llama-7b", "evaluate"): "llama-7b-eval-results"}
    assert [(r.name, r.default_ttl, r.max_ttl) for r in plan.database_roles] == [
        ("llama-7b-eval-results", 3600, 3600)
    ]
    broker = rules(plan.broker_policy)
    assert broker["auth/token/create/broker-issuer"] == ["update"]
    assert broker["sys/leases/revoke/database/creds/llama-7b-eval-results/*"] == ["update"]
    # The broker never reads database logins itself, nor creates tokens outside its role.
    assert [p for p in broker if p.startswith(("database/", "auth/token/create"))] == [
        "auth/token/create/broker-issuer"
    ]


def test_a_rule_through_vault_needs_access_for_its_actions() -> None:
    config = VaultConfig(action_access={"evaluate": ActionAccess(("read",))})
    with pytest.raises(ConfigError, match=r"rule 'trainer' allows \['fine-tune'\]"):
        VaultBackend("http://127.0.0.1:9", StaticToken("x"), example_policy(), config=config)


def test_database_access_for_an_unknown_action_is_refused() -> None:
    config = VaultConfig(databases={"llama-7b": DatabaseAccess("db", frozenset({"retrain"}))})
    with pytest.raises(ConfigError, match=r"unknown actions \['retrain'\]"):
        plan_vault(example_policy().policy, config)


@pytest.mark.parametrize(
    "ref", ["sys/leases/revoke-prefix/x", "database/creds/other-role/x", "a b"]
)
def test_revoke_refuses_references_that_are_not_its_own(ref: str) -> None:
    # Checked before any call to Vault (this address has no server).
    backend = VaultBackend(
        "http://127.0.0.1:9", StaticToken("x"), example_policy(), config=EXAMPLE_CONFIG
    )
    with pytest.raises(InvalidRequest, match="neither a Vault token accessor nor a lease of"):
        backend.revoke_ref("g_1", ref)
