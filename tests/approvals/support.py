"""Helpers for rollback tests in the approvals tests: a token of the example policy's rollback
drill workflow (allowed ``rollback-test`` on llama-7b by ``dev-rollback-tester``), a report of a
test to the broker, and a lineage naming the rollback point."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

from broker.runtime import Broker

DRILL = "repo:acme/rollback-drills:ref:refs/heads/main"
DRILL_WORKFLOW = "acme/workflows/.github/workflows/rollback-drill.yml@refs/heads/main"
POINT = {"uri": "s3://models/llama-7b/weights/v41", "sha256": "ab" * 32}


def drill_token(broker: Broker, **claims: object) -> str:
    """A fresh (single-use) token of the rollback drill workflow."""
    assert broker.dev_issuer is not None
    return broker.dev_issuer.mint(sub=DRILL, claims={"job_workflow_ref": DRILL_WORKFLOW, **claims})


def report_test(
    client: TestClient,
    token: str,
    *,
    result: str = "passed",
    point: dict[str, str] = POINT,
    model: str = "llama-7b",
    **extra: object,
) -> Any:
    body = {"model": model, "rollback_point": point, "result": result, **extra}
    return client.post(
        "/v1/rollback-tests", json=body, headers={"Authorization": f"Bearer {token}"}
    )


def point_lineage(point: dict[str, str] = POINT, **extra: object) -> str:
    """The ``lineage`` form field of a request that names ``point`` as its rollback point."""
    return json.dumps({"rollback_point": {**point, **extra}})
