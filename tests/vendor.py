"""A policy for delegated (vendor) administration: the example policy plus a vendor's model,
the vendor's pipeline rule and the customer's own rollback workflow, for issue 17's tests."""

from __future__ import annotations

from pathlib import Path

from broker.settings import EXAMPLE_POLICY

VENDOR_SUB = "repo:vendor/pipeline:ref:refs/heads/main"
OWNER_SUB = "repo:acme/rollback:ref:refs/heads/main"
VENDOR_MODEL = "vendor-llm"

_MODELS = """
  vendor-llm:
    owners: [ml-platform]
    backends:
      vault: {policy_paths: ["secret/data/models/vendor-llm/*"]}
  vendor-tts:
    owners: [ml-platform]
"""

_ACTIONS = """
  hotfix:
    tier: privileged
    max_ttl: 1h
    approvals: 2
    emergency: {ttl_cap: 10m, ratify_within: 1h, max_per_identity: 2 per 24h}
  rollback-weights: {tier: elevated, max_ttl: 30m, approvals: 1, rollback: true}
"""

SCOPED_ROLES = """
  approver: [ml-safety-reviewers, {group: vendor-reviewers, models: ["vendor-*"]}]
  admin: [ml-platform-admins, {group: vendor-ops, models: ["vendor-*"]}]
  auditor: [security-audit, {group: vendor-audit, models: ["vendor-*"]}]
"""
"""The customer's groups hold each role for every model; the vendor's for ``vendor-*`` only."""

_RULES = """
  - name: dev-vendor-pipeline
    issuer: dev
    subject: "repo:vendor/pipeline:ref:refs/heads/main"
    models: ["vendor-*"]
    actions: [evaluate, hotfix, fine-tune]
    backends: [jwt, vault]
  - name: dev-owner-rollback
    issuer: dev
    subject: "repo:acme/rollback:ref:refs/heads/main"
    models: ["vendor-*", llama-7b]
    actions: [evaluate, rollback-weights, rollback-test]
"""


def vendor_policy(
    directory: Path, *, actions: str = "", roles: str = "", webhook: str | None = None
) -> Path:
    """The example policy with the vendor's models, actions and rules, extra ``actions`` lines
    (YAML, two-space indented), ``roles`` lines replacing the example's, and a webhook to the
    URL ``webhook`` (secret in ``directory/webhook-secret``); written to
    ``directory/policy.yaml``."""
    text = EXAMPLE_POLICY.read_text().replace(
        "jwks_file: keys/", f"jwks_file: {EXAMPLE_POLICY.parent}/keys/"
    )
    text = text.replace("\nmodels:\n", "\nmodels:" + _MODELS, 1)
    text = text.replace("\nrules:\n", "\nrules:" + _RULES, 1)
    text = text.replace("\nactions:\n", "\nactions:\n" + actions + _ACTIONS.lstrip("\n"), 1)
    if webhook:
        hook = (
            f"  webhook: {{url: '{webhook}', secret_file: webhook-secret, timeout: 2s, retries: 1}}"
        )
        text = text.replace("  # webhook: {url:", hook + "\n  # was:", 1)
    if roles:
        block = text[text.index("\nroles:") : text.index("\n\n", text.index("\nroles:"))]
        text = text.replace(block, "\nroles:\n" + roles.strip("\n"), 1)
    path = directory / "policy.yaml"
    path.write_text(text)
    return path
