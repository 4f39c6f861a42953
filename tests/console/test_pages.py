"""Console pages over HTTP: headers on every response, escaping, and that each page offers
exactly what the server then accepts (separation of duties, the rollback gate, roles)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from broker.audit.export import verify_export
from broker.console.web import CSP
from broker.runtime import Broker
from tests.conftest import eval_token, exchange_form
from tests.console.support import csrf_of, open_request, sign_in

HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def _grant(client: TestClient, broker: Broker) -> str:
    issued = client.post("/v1/token", data=exchange_form(eval_token(broker)))
    assert issued.status_code == 200, issued.text
    return str(issued.json()["grant_id"])


def test_every_console_response_has_the_security_headers(web: TestClient, broker: Broker) -> None:
    approval_id = open_request(web, broker)
    grant_id = _grant(web, broker)
    answers = [web.get("/console/signin"), web.get("/console/approvals"), web.get("/console/nope")]
    answers.append(web.get("/console/callback?code=x&state=y"))  # a failed sign-in
    sign_in(web, "dave@example.com", "admin", "approver")
    for path in (
        "/console/",
        "/console/approvals",
        f"/console/approvals/{approval_id}",
        "/console/approvals/a_missing",
        "/console/grants",
        f"/console/grants/{grant_id}",
        "/console/revocations?model=llama-7b",
        "/console/lineage?model=llama-7b",
        "/console/audit",
        "/console/audit/export",
        "/console/static/console.css",
        "/console/static/missing.css",
    ):
        answers.append(web.get(path))
    answers.append(web.post(f"/console/approvals/{approval_id}/approve", data={"reason": "x"}))
    assert {a.status_code for a in answers} >= {200, 303, 401, 403, 404}
    for answer in answers:
        for name, value in HEADERS.items():
            assert answer.headers.get(name) == value, (answer.url, name)
    assert "script-src 'self'" in CSP and "frame-ancestors 'none'" in CSP
    assert "unsafe-inline" not in CSP
    pages = [
        a
        for a in answers
        if a.headers.get("content-type", "").startswith("text/html")
        and not a.url.path.startswith("/console/static/")
    ]
    assert all(a.headers["cache-control"] == "no-store" for a in pages)
    assert all("<script" not in a.text and " style=" not in a.text for a in pages)


def test_what_a_requester_wrote_renders_as_text(web: TestClient, broker: Broker) -> None:
    approval_id = open_request(web, broker, reason="<script>alert('x')</script> & <b>bold</b>")
    sign_in(web, "bob@example.com", "approver")
    page = web.get(f"/console/approvals/{approval_id}")
    assert page.status_code == 200
    assert (
        "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page.text
    )
    assert "<script" not in page.text and "<b>bold" not in page.text


def test_the_requesters_own_person_is_refused_plainly_and_by_the_server(
    web: TestClient, broker: Broker
) -> None:
    # A workflow alice triggered (actor=alice) opens the request; alice signs in herself.
    approval_id = open_request(web, broker, actor="alice")
    csrf = sign_in(web, "alice@example.com", "approver")
    page = web.get(f"/console/approvals/{approval_id}")
    assert (
        "You cannot review this request: the requester cannot review their own request "
        "(alice, through another identity)"
    ) in page.text
    assert f"/console/approvals/{approval_id}/approve" not in page.text
    refused = web.post(
        f"/console/approvals/{approval_id}/approve", data={"reason": "mine", "csrf": csrf}
    )
    assert refused.status_code == 403
    assert "the requester cannot review their own request" in refused.text
    assert broker.approvals.get(approval_id)["status"] == "pending"


def test_a_role_without_review_sees_no_form(web: TestClient, broker: Broker) -> None:
    approval_id = open_request(web, broker)
    csrf = sign_in(web, "ann@example.com", "auditor")
    page = web.get(f"/console/approvals/{approval_id}")
    assert "needs role approver" in page.text
    assert 'name="reason"' not in page.text
    refused = web.post(f"/console/approvals/{approval_id}/deny", data={"reason": "x", "csrf": csrf})
    assert refused.status_code == 403


def test_an_untested_rollback_point_leaves_only_deny(web: TestClient, broker: Broker) -> None:
    assert broker.dev_issuer is not None
    token = broker.dev_issuer.mint(
        sub="repo:acme/release:ref:refs/heads/main",
        claims={"job_workflow_ref": "acme/workflows/.github/workflows/deploy.yml@refs/heads/main"},
    )
    point = {"uri": "s3://models/llama-7b/weights/v41", "sha256": "ab" * 32}
    opened = web.post(
        "/v1/approvals",
        json={
            "model": "llama-7b",
            "action": "deploy-weights",
            "lineage": {"rollback_point": point},
        },
        headers={"Authorization": f"Bearer {token}"},
    )
    assert opened.status_code == 201, opened.text
    approval_id = opened.json()["id"]
    sign_in(web, "bob@example.com", "approver")
    page = web.get(f"/console/approvals/{approval_id}")
    assert "Approving is refused:" in page.text and "no rollback test of" in page.text
    assert "No rollback test of this point is recorded." in page.text
    assert "s3://models/llama-7b/weights/v41" in page.text and "ab" * 32 in page.text
    assert ">Approve</button>" not in page.text and ">Deny</button>" in page.text


def test_the_page_shows_what_differs_from_the_last_approved(
    web: TestClient, broker: Broker
) -> None:
    first = open_request(web, broker)
    csrf = sign_in(web, "bob@example.com", "approver")
    assert (
        web.post(
            f"/console/approvals/{first}/approve", data={"reason": "ok", "csrf": csrf}
        ).status_code
        == 303
    )
    second = open_request(web, broker, reason="another run")
    page = web.get(f"/console/approvals/{second}")
    assert f'What differs from <a href="/console/approvals/{first}">' in page.text
    assert "<code>reason</code>" in page.text and "another run" in page.text


def test_only_admins_get_the_revoke_form(app: FastAPI, broker: Broker) -> None:
    with (
        TestClient(app, follow_redirects=False) as auditor,
        TestClient(app, follow_redirects=False) as admin,
    ):
        grant_id = _grant(auditor, broker)
        csrf = sign_in(auditor, "ann@example.com", "auditor")
        page = auditor.get(f"/console/grants/{grant_id}")
        assert page.status_code == 200 and "Revoke this grant" not in page.text
        refused = auditor.post(
            f"/console/grants/{grant_id}/revoke", data={"reason": "x", "csrf": csrf}
        )
        assert refused.status_code == 403 and "needs role admin" in refused.text
        assert broker.grants.get(grant_id).status == "active"
        admins = sign_in(admin, "dave@example.com", "admin")
        assert "Revoke this grant" in admin.get(f"/console/grants/{grant_id}").text
        done = admin.post(
            f"/console/grants/{grant_id}/revoke", data={"reason": "x", "csrf": admins}
        )
        assert done.status_code == 303
        assert broker.grants.get(grant_id).status == "revoked"


def test_bulk_revocation_confirms_first(web: TestClient, broker: Broker) -> None:
    grants = [_grant(web, broker) for _ in range(2)]
    csrf = sign_in(web, "dave@example.com", "admin")
    confirm = web.get("/console/revocations", params={"model": "llama-7b"})
    assert "This revokes the 2 active grant(s) below" in confirm.text
    assert all(g in confirm.text for g in grants)
    assert all(broker.grants.get(g).status == "active" for g in grants)
    done = web.post(
        "/console/revocations",
        data={"model": "llama-7b", "reason": "rotate", "csrf": csrf_of(confirm.text)},
    )
    assert done.status_code == 200 and "Revoked 2 grant(s) of llama-7b" in done.text
    assert all(broker.grants.get(g).status == "revoked" for g in grants)
    assert csrf == csrf_of(confirm.text)
    unknown = web.get("/console/revocations", params={"model": "no-such-model"})
    assert unknown.status_code == 400


def test_lineage_names_who_changed_a_model_and_who_approved(
    web: TestClient, broker: Broker
) -> None:
    approval_id = open_request(web, broker)
    csrf = sign_in(web, "bob@example.com", "approver", "auditor")
    web.post(f"/console/approvals/{approval_id}/approve", data={"reason": "vetted", "csrf": csrf})
    assert broker.dev_issuer is not None
    token = broker.dev_issuer.mint(
        sub="system:serviceaccount:training:trainer",
        claims={"kubernetes.io": {"namespace": "training"}},
    )
    used = web.post(
        "/v1/token",
        data=exchange_form(
            token,
            action="fine-tune",
            approval_id=approval_id,
            reason="nightly fine-tune",
            lineage='{"datasets": [{"uri": "s3://datasets/approved/set-1"}]}',
        ),
    )
    assert used.status_code == 200, used.text
    page = web.get("/console/lineage", params={"model": "llama-7b"})
    assert "system:serviceaccount:training:trainer" in page.text
    assert "s3://datasets/approved/set-1" in page.text
    assert "approve: bob@example.com" in page.text and "vetted" in page.text


@pytest.mark.parametrize("since", [0, 1])
def test_the_audit_export_download_verifies(
    web: TestClient, broker: Broker, tmp_path: Path, since: int
) -> None:
    sign_in(web, "ann@example.com", "auditor")
    page = web.get("/console/audit")
    assert "Newest checkpoint" in page.text and broker.audit.verifier_key() in page.text
    assert "not published anywhere" in page.text
    download = web.get("/console/audit/export", params={"since": since})
    assert download.status_code == 200
    assert download.headers["content-disposition"].startswith('attachment; filename="audit-export-')
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    report = verify_export(tmp_path / "audit-export", broker.audit.verifier_key())
    assert report.ok, report.problems
    assert report.start == since and report.size >= max(since, 1)
