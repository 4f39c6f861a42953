"""Fixtures for the policy tests: a small policy document, a parser and identity factory."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.identity.types import ClaimValue, WorkloadIdentity, _seal_workload
from broker.policy import LoadedPolicy, parse_policy

REPO_ROOT = Path(__file__).resolve().parents[2]

EVAL_WORKFLOW = "acme/workflows/.github/workflows/eval.yml@refs/heads/main"
EVAL_SUBJECT = "repo:acme/evals:ref:refs/heads/main"
ISSUER_URLS = {
    "github": "https://token.actions.githubusercontent.com",
    "cluster": "https://kubernetes.default.svc",
}

_BASE_DOC: dict[str, Any] = {
    "issuers": [
        {"name": "github", "issuer": ISSUER_URLS["github"], "audiences": ["model-broker"]},
        {"name": "cluster", "issuer": ISSUER_URLS["cluster"], "audiences": ["model-broker"]},
        {
            "name": "sso",
            "kind": "people",
            "issuer": "https://sso.example.com",
            "audiences": ["model-broker-admin"],
            "roles_claim": "groups",
        },
    ],
    "actions": {
        "evaluate": {"tier": "low", "max_ttl": "1h"},
        "fine-tune": {"tier": "elevated", "max_ttl": "4h", "approvals": 1},
        "deploy-weights": {
            "tier": "privileged",
            "max_ttl": "15m",
            "approvals": 2,
            "rollback_tested": "required",
        },
        "edit-safety-filter": {"tier": "privileged", "max_ttl": "15m", "approvals": 2},
    },
    "models": {
        "llama-7b": {
            "owners": ["ml-platform"],
            "backends": {
                "vault": {"policy_paths": ["secret/data/models/llama-7b/*"]},
                "aws": {
                    "role_arn": "arn:aws:iam::123456789012:role/model-llama-7b",
                    "s3_prefix": "s3://models/llama-7b/",
                },
            },
        },
        "llama-13b": {},
        "mistral-7b": {},
    },
    "rules": [
        {
            "name": "nightly-eval",
            "issuer": "github",
            "subject": EVAL_SUBJECT,
            "claims": {"job_workflow_ref": EVAL_WORKFLOW},
            "models": ["llama-*"],
            "actions": ["evaluate"],
            "backends": ["jwt", "aws"],
        },
        {
            "name": "trainer",
            "issuer": "cluster",
            "subject_pattern": "system:serviceaccount:training:*",
            "claims": {"kubernetes.io/namespace": "training"},
            "models": ["llama-7b"],
            "actions": ["fine-tune", "deploy-weights", "edit-safety-filter"],
            "datasets": ["s3://datasets/approved/*"],
            "backends": ["jwt", "vault"],
        },
    ],
    "roles": {
        "approver": ["ml-safety-reviewers"],
        "admin": ["ml-platform-admins"],
        "auditor": ["security-audit", "ml-platform-admins"],
    },
}

PolicyDoc = dict[str, Any]
Parse = Callable[..., LoadedPolicy]
MakeIdentity = Callable[..., WorkloadIdentity]


@pytest.fixture
def policy_doc() -> PolicyDoc:
    """A fresh, valid policy document (as parsed YAML) that a test may change."""
    return copy.deepcopy(_BASE_DOC)


@pytest.fixture
def parse(tmp_path: Path) -> Parse:
    """Parse a policy document (a dict, dumped to YAML, or YAML text) from ``tmp_path``."""

    def _parse(doc: PolicyDoc | str, *, dev_mode: bool = False) -> LoadedPolicy:
        text = doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False)
        return parse_policy(text, source="policy.yaml", base_dir=tmp_path, dev_mode=dev_mode)

    return _parse


@pytest.fixture
def loaded(parse: Parse, policy_doc: PolicyDoc) -> LoadedPolicy:
    return parse(policy_doc)


@pytest.fixture
def make_identity() -> MakeIdentity:
    """Build a verified workload identity as the verifier would (defaults: the eval workflow)."""

    def _make(
        *,
        issuer_name: str = "github",
        subject: str = EVAL_SUBJECT,
        claims: dict[str, ClaimValue] | None = None,
    ) -> WorkloadIdentity:
        if claims is None:
            claims = {"job_workflow_ref": EVAL_WORKFLOW}
        return _seal_workload(
            issuer_name=issuer_name,
            issuer=ISSUER_URLS.get(issuer_name, f"https://{issuer_name}.example"),
            subject=subject,
            profile="oidc",
            claims={"sub": subject, **claims},
            attributes={},
            audience=("model-broker",),
            issued_at=0,
            expires_at=0,
            jti=None,
            single_use=False,
        )

    return _make
