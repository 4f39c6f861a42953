"""terraform/vault agrees with what the broker renders and the test setup creates.

No Vault provider can be installed offline, so the module is parsed (python-hcl2) and compared,
name by name and TTL by TTL, with :func:`~broker.backends.vault.plan_vault` for the example
policy: the same plan the fixtures in conftest.py apply to OpenBao with hvac.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import hcl2
import pytest

from broker.backends.vault import VaultPlan, plan_vault
from tests.backends.vault.conftest import DB_CONNECTION, EXAMPLE_CONFIG, example_policy
from tests.servers import TERRAFORM_MISSING, Part, unavailable

MODULE = Path(__file__).resolve().parents[3] / "terraform" / "vault"
OPTIONS = hcl2.SerializationOptions(
    strip_string_quotes=True, explicit_blocks=False, with_comments=False
)
_HEREDOC = re.compile(r"^<<-(\w+)\n(.*?)\n[ \t]*\1$", re.S)


def heredoc(value: str) -> str:
    """The text a ``<<-EOT`` heredoc stands for (Terraform strips the common indentation)."""
    match = _HEREDOC.match(value)
    assert match, f"not an indented heredoc: {value[:40]!r}"
    return textwrap.dedent(match.group(2)) + "\n"


@pytest.fixture(scope="module")
def module() -> dict[str, Any]:
    merged: dict[str, Any] = {"resource": {}, "locals": {}, "variable": {}}
    for path in sorted(MODULE.glob("*.tf")):
        parsed = hcl2.loads(path.read_text(), serialization_options=OPTIONS)
        for block in parsed.get("resource", []):
            for kind, named in block.items():
                merged["resource"].setdefault(kind, {}).update(named)
        for block in parsed.get("locals", []):
            merged["locals"].update(block)
        for block in parsed.get("variable", []):
            merged["variable"].update(block)
    return merged


@pytest.fixture(scope="module")
def plan() -> VaultPlan:
    return plan_vault(example_policy().policy, EXAMPLE_CONFIG)


def resource(module: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = module["resource"][kind][name]
    return found


def test_terraform_fmt_is_clean() -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        unavailable(Part.TERRAFORM, TERRAFORM_MISSING)
    result = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(MODULE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout


def test_model_policies_are_the_rendered_ones(module: dict[str, Any], plan: VaultPlan) -> None:
    policies = {name: heredoc(text) for name, text in module["locals"]["model_policies"].items()}
    assert policies == dict(plan.policies)
    model = resource(module, "vault_policy", "model")
    assert model["for_each"] == "${local.model_policies}"
    assert (model["name"], model["policy"]) == ("${each.key}", "${each.value}")


def test_broker_policy_is_the_rendered_one(module: dict[str, Any], plan: VaultPlan) -> None:
    broker = resource(module, "vault_policy", "broker")
    assert broker["name"] == plan.broker_policy_name
    assert heredoc(broker["policy"]) == plan.broker_policy


def test_token_role(module: dict[str, Any], plan: VaultPlan) -> None:
    role = resource(module, "vault_token_auth_backend_role", "issuer")
    spec = plan.token_role
    assert role["role_name"] == spec.name
    # allowed_policies is every model policy above, which test_model_policies_... pins down.
    assert role["allowed_policies"] == "${sort(keys(local.model_policies))}"
    assert sorted(module["locals"]["model_policies"]) == list(spec.allowed_policies)
    assert role["token_explicit_max_ttl"] == spec.token_explicit_max_ttl
    assert (role["orphan"], role["renewable"]) == (spec.orphan, spec.renewable)
    assert role["token_type"] == spec.token_type


def test_broker_jwt_login(module: dict[str, Any], plan: VaultPlan) -> None:
    config = plan.config
    mount = resource(module, "vault_jwt_auth_backend", "broker")
    assert (mount["path"], mount["type"]) == (config.broker_jwt_mount, "jwt")
    role = resource(module, "vault_jwt_auth_backend_role", "broker")
    assert role["role_name"] == config.broker_jwt_role
    assert role["token_policies"] == ["${vault_policy.broker.name}"]
    assert role["token_ttl"] == role["token_max_ttl"] == config.broker_token_ttl
    assert role["token_no_default_policy"] is True
    assert role["bound_subject"] == "${var.broker_jwt_subject}"


def test_database_role(module: dict[str, Any], plan: VaultPlan) -> None:
    mount = resource(module, "vault_mount", "database")
    assert (mount["path"], mount["type"]) == (plan.config.database_mount, "database")
    connection = resource(module, "vault_database_secret_backend_connection", "eval_results")
    assert connection["name"] == DB_CONNECTION
    [spec] = plan.database_roles
    assert connection["allowed_roles"] == [spec.name]
    role = resource(module, "vault_database_secret_backend_role", "llama_7b_eval_results")
    assert role["name"] == spec.name
    assert (role["default_ttl"], role["max_ttl"]) == (spec.default_ttl, spec.max_ttl)
    assert role["db_name"] == "${vault_database_secret_backend_connection.eval_results.name}"
    assert module["variable"]["postgres_password"]["sensitive"] is True
