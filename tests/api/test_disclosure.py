"""A refusal tells the caller what its own token and request said, never what the policy expects;
the full explanation is in the audit event that the answer's ``audit_index`` names."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.api.test_hostile_input import event_at
from tests.conftest import EVAL_SUB, eval_token, exchange_form

EVIL = "acme/evil/.github/workflows/x.yml@refs/heads/main"
# What the example policy expects, which a refused caller must not learn.
EXPECTED = ("acme/workflows/", "dev-nightly-eval", "dev-trainer", "repo:acme/", "expected")


def quiet_policy(tmp_path: Path) -> Path:
    """A copy of the example policy (with the key files it names) that turns explanations off."""
    shutil.copytree(EXAMPLE_POLICY.parent, tmp_path / "policy")
    path = tmp_path / "policy" / EXAMPLE_POLICY.name
    path.write_text(path.read_text() + "\nexplain_denials: false\n")
    return path


@pytest.fixture
def quiet(tmp_path: Path) -> Iterator[tuple[TestClient, Broker]]:
    """A dev broker whose policy turns disclosure off (as outside dev mode by default)."""
    b = build_broker(Settings(dev=True, data_dir=tmp_path / "data", policy=quiet_policy(tmp_path)))
    with TestClient(create_app(broker=b)) as c:
        yield c, b
    b.close()


def _refused(client: TestClient, broker: Broker, **form: Any) -> dict[str, Any]:
    resp = client.post("/v1/token", data=exchange_form(eval_token(broker, **form)))
    assert resp.status_code in (400, 403), resp.text
    return dict(resp.json())


def test_a_denial_names_the_failed_claim_and_its_value_but_no_rule(
    quiet: tuple[TestClient, Broker],
) -> None:
    client, broker = quiet
    body = _refused(client, broker, claims={"job_workflow_ref": EVIL})
    assert body["error"] == "access_denied"
    text = body["error_description"]
    assert "claim job_workflow_ref: got " + repr(EVIL) in text
    assert "reasons" not in body
    for secret in EXPECTED:
        assert secret not in text.replace(EVAL_SUB, ""), text
    event = event_at(broker, body["audit_index"])
    assert event["type"] == "exchange.denied"
    assert (
        "rule dev-nightly-eval: claim job_workflow_ref: expected 'acme/workflows/"
        in (event["description"])
    )


def test_an_unknown_model_does_not_list_the_models(quiet: tuple[TestClient, Broker]) -> None:
    client, broker = quiet
    resp = client.post("/v1/token", data=exchange_form(eval_token(broker), model="gpt-x"))
    body = resp.json()
    assert (resp.status_code, body["error"]) == (400, "invalid_target")
    assert body["error_description"] == "unknown model 'gpt-x'"
    assert "llama-7b" in event_at(broker, body["audit_index"])["description"]


def test_a_forbidden_audience_does_not_list_the_allowed_ones(
    quiet: tuple[TestClient, Broker],
) -> None:
    client, broker = quiet
    form = exchange_form(eval_token(broker), audience="someone-else")
    body = client.post("/v1/token", data=form).json()
    assert body["error"] == "invalid_target"
    assert "expected" not in body["error_description"]
    assert "one of" in event_at(broker, body["audit_index"])["description"]


def test_dev_mode_keeps_the_full_explanation(client: TestClient, broker: Broker) -> None:
    """The README's walk-through shows why a token was refused; dev mode says it all."""
    body = _refused(client, broker, claims={"job_workflow_ref": EVIL})
    assert "expected 'acme/workflows/" in body["error_description"]
    assert any("dev-nightly-eval" in reason for reason in body["reasons"])
    assert isinstance(body["audit_index"], int)


MINIMAL = """
issuers: [{name: ci, issuer: "https://ci.example", audiences: [model-broker]}]
actions: {evaluate: {tier: low, max_ttl: 1h}}
models: {m: {}}
"""


@pytest.mark.parametrize(("setting", "explains"), [("", False), ("explain_denials: true", True)])
def test_outside_dev_mode_only_the_policy_opts_into_explanations(
    tmp_path: Path, setting: str, explains: bool
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(MINIMAL + setting + "\n")
    b = build_broker(Settings(data_dir=tmp_path / "data", policy=policy))
    try:
        assert b.grants.explain_denials is explains
    finally:
        b.close()


def test_opening_an_approval_request_discloses_no_more_than_an_exchange(
    quiet: tuple[TestClient, Broker],
) -> None:
    """POST /v1/approvals runs the same policy decision; its refusal hides the same values."""
    client, broker = quiet
    assert broker.dev_issuer is not None
    token = broker.dev_issuer.mint(sub="system:serviceaccount:training:trainer")
    resp = client.post(
        "/v1/approvals",
        json={"model": "gpt-x", "action": "fine-tune"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["error_description"] == "unknown model 'gpt-x'"
