"""The console in a real browser: headless Chromium (Debian's) driven by Playwright, people
signing in through a real OpenID provider (tests/console/oidc_provider.py), the broker live.

One story, as reviewers live it: a workload's exchange waits for approval; the first reviewer
approves; the second sees that review and approves too; the requester's own person is refused
plainly; another request is denied; an admin revokes a grant and introspection turns inactive.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.runtime import Broker
from tests.conftest import exchange_form, free_port
from tests.console.browser import Site, console_site, require_chromium, sign_in_with_corp

RELEASE = "repo:acme/release:ref:refs/heads/main"
DEPLOY_WORKFLOW = "acme/workflows/.github/workflows/deploy.yml@refs/heads/main"
EVAL = "repo:acme/evals:ref:refs/heads/main"
EVAL_WORKFLOW = "acme/workflows/.github/workflows/eval.yml@refs/heads/main"


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with console_site(tmp_path, free_port(), free_port()) as running:
        yield running


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_playwright = require_chromium()
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"]
        )
        try:
            yield chromium
        finally:
            chromium.close()


def _token(broker: Broker, sub: str, **claims: Any) -> str:
    assert broker.dev_issuer is not None
    return broker.dev_issuer.mint(sub=sub, claims=claims)


def _waits_for_approval(site: Site, form: dict[str, str]) -> str:
    """The approval request that a workload's exchange opened (it needs approval)."""
    answer = httpx.post(f"{site.url}/v1/token", data=form)
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"] == "approval_required"
    return str(answer.json()["approval_id"])


def _person(browser: Any, site: Site, user: str) -> Any:
    page = browser.new_context().new_page()
    sign_in_with_corp(page, site, user)
    return page


def _review(page: Any, site: Site, approval_id: str, button: str, reason: str) -> None:
    page.goto(f"{site.url}/console/approvals")
    page.get_by_role("link", name=approval_id).click()
    page.get_by_label("Reason").fill(reason)
    page.get_by_role("button", name=button, exact=True).click()
    page.wait_for_url(f"{site.url}/console/approvals/{approval_id}")


def test_reviewers_approve_deny_and_revoke_in_the_browser(site: Site, browser: Any) -> None:
    broker = site.broker
    safety = _waits_for_approval(
        site,
        exchange_form(
            _token(broker, RELEASE, job_workflow_ref=DEPLOY_WORKFLOW, actor="alice"),
            action="edit-safety-filter",
        ),
    )

    bob = _person(browser, site, "bob@example.com")
    assert bob.get_by_role("link", name=safety).is_visible()
    assert "DEV MODE" in bob.content()  # the broker runs --dev: every page says so
    _review(bob, site, safety, "Approve", "filter change reviewed <b>ok</b>")
    assert "pending: 1 of 2 approval(s)" in bob.locator(".status").inner_text()

    carol = _person(browser, site, "carol@example.com")
    carol.goto(f"{site.url}/console/approvals/{safety}")
    reviews = carol.locator("ul.reviews").inner_text()
    assert "approve by bob@example.com" in reviews
    assert "filter change reviewed <b>ok</b>" in reviews  # the reason is text, not markup

    alice = _person(browser, site, "alice@example.com")
    alice.goto(f"{site.url}/console/approvals/{safety}")
    refusal = alice.locator("#review-refusal").inner_text()
    assert "the requester cannot review their own request (alice, through another identity)" in (
        refusal
    )
    assert alice.get_by_role("button", name="Approve").count() == 0
    assert alice.get_by_role("button", name="Deny").count() == 0

    _review(carol, site, safety, "Approve", "second look: fine")
    assert carol.locator(".status").inner_text().startswith("approved: 2 of 2")
    bob.reload()
    assert bob.locator(".status").inner_text().startswith("approved")

    trainer = _token(
        broker,
        "system:serviceaccount:training:trainer",
        **{"kubernetes.io": {"namespace": "training"}},
    )
    fine_tune = _waits_for_approval(
        site,
        exchange_form(
            trainer,
            action="fine-tune",
            lineage='{"datasets": ["s3://datasets/approved/set-9"]}',
        ),
    )
    _review(bob, site, fine_tune, "Deny", "set-9 is not vetted")
    assert bob.locator(".status").inner_text().startswith("denied")
    assert broker.approvals.get(fine_tune)["status"] == "denied"

    issued = httpx.post(
        f"{site.url}/v1/token",
        data=exchange_form(_token(broker, EVAL, job_workflow_ref=EVAL_WORKFLOW)),
    )
    assert issued.status_code == 200, issued.text
    grant_id, credential = issued.json()["grant_id"], issued.json()["access_token"]

    def active() -> bool:
        assert broker.dev_issuer is not None
        bearer = broker.dev_issuer.mint(sub="dave@example.com", roles=["auditor"])
        answer = httpx.post(
            f"{site.url}/v1/introspect",
            data={"token": credential},
            headers={"Authorization": f"Bearer {bearer}"},
        )
        return bool(answer.json()["active"])

    assert active()
    dave = _person(browser, site, "dave@example.com")
    dave.get_by_role("link", name="Grants").click()
    dave.get_by_label("Model").fill("llama-7b")
    dave.get_by_role("button", name="Search").click()
    dave.get_by_role("link", name=grant_id).click()
    dave.get_by_label("Reason for revoking").fill("key material leaked in a log")
    dave.get_by_role("button", name="Revoke this grant").click()
    dave.wait_for_url(f"{site.url}/console/grants/{grant_id}")
    assert dave.locator(".status").inner_text() == "revoked"
    assert not active()
    # An approver is no admin: the grant pages are not theirs, and the nav does not offer them.
    assert bob.get_by_role("link", name="Grants").count() == 0
    assert re.search(r"needs role auditor or admin", _text(bob, f"{site.url}/console/grants"))


def _text(page: Any, url: str) -> str:
    page.goto(url)
    return str(page.content())
