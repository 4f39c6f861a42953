"""Screenshots of the console's main pages for docs/console.md, on demand (not a test).

Starts what tests/console/test_browser.py starts (a dev broker with the console, the test
OpenID provider, Debian's chromium through Playwright), fills the broker with a few requests
and grants as workloads and reviewers would, signs people in through the provider and saves
each page to docs/console/<name>.png. Everything it starts is stopped, and its data deleted.

    .venv/bin/python bench/console_screenshots.py [--out docs/console]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import exchange_form, free_port
from tests.console.browser import (
    CHROMIUM,
    Site,
    console_site,
    sign_in_with_corp,
)

RELEASE = "repo:acme/release:ref:refs/heads/main"
DEPLOY_WORKFLOW = "acme/workflows/.github/workflows/deploy.yml@refs/heads/main"
EVAL = "repo:acme/evals:ref:refs/heads/main"
EVAL_WORKFLOW = "acme/workflows/.github/workflows/eval.yml@refs/heads/main"
TRAINER = "system:serviceaccount:training:trainer"
K8S = {"kubernetes.io": {"namespace": "training"}}


def _token(site: Site, sub: str, **claims: Any) -> str:
    assert site.broker.dev_issuer is not None
    return site.broker.dev_issuer.mint(sub=sub, claims=claims)


def _exchange(site: Site, form: dict[str, str]) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.post(f"{site.url}/v1/token", data=form).json()
    return answer


def _review(site: Site, approval_id: str, sub: str, decision: str, reason: str) -> None:
    broker = site.broker
    assert broker.dev_issuer is not None
    person = broker.verifier.verify_person(broker.dev_issuer.mint(sub=sub, roles=["approver"]))
    broker.approvals.review(approval_id, person, decision, reason)


def populate(site: Site) -> dict[str, str]:
    """Requests and grants for the pages to show; returns the ids the screenshots open."""
    lineage = {
        "datasets": [
            {"uri": "s3://datasets/approved/chat-2024-06", "sha256": "3f" * 32},
            {"uri": "s3://datasets/approved/refusals-v3", "sha256": "a1" * 32},
        ],
        "weights": [{"uri": "s3://models/llama-7b/weights/v41", "sha256": "8c" * 32}],
    }
    form = exchange_form(
        _token(site, TRAINER, **K8S),
        action="fine-tune",
        lineage=json.dumps(lineage),
        reason="weekly refresh with June chats",
    )
    first = _exchange(site, form)["approval_id"]
    _review(site, first, "bob@example.com", "approve", "datasets vetted in RISK-142")
    used = _exchange(
        site, {**form, "subject_token": _token(site, TRAINER, **K8S)} | {"approval_id": first}
    )
    lineage["datasets"].append({"uri": "s3://datasets/approved/forum-scrape", "sha256": "07" * 32})
    second = _exchange(
        site,
        exchange_form(
            _token(site, TRAINER, **K8S),
            action="fine-tune",
            lineage=json.dumps(lineage),
            reason="add forum data <script>alert(1)</script>",
        ),
    )["approval_id"]
    safety = _exchange(
        site,
        exchange_form(
            _token(site, RELEASE, job_workflow_ref=DEPLOY_WORKFLOW, actor="alice"),
            action="edit-safety-filter",
            reason="loosen the medical-advice filter (alice's change)",
        ),
    )["approval_id"]
    _review(site, safety, "carol@example.com", "approve", "diff reviewed")
    for _ in range(3):
        _exchange(site, exchange_form(_token(site, EVAL, job_workflow_ref=EVAL_WORKFLOW)))
    with site.broker.store.write() as session:
        site.broker.audit.sign_checkpoint(session, dt.datetime.now(dt.UTC))
    return {"second": second, "safety": safety, "grant": used["grant_id"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/console"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="console-shots-") as tmp,
        console_site(Path(tmp), free_port(), free_port()) as site,
        sync_playwright() as playwright,
    ):
        ids = populate(site)
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:

            def page_as(user: str | None) -> Any:
                context = browser.new_context(viewport={"width": 1280, "height": 800})
                page = context.new_page()
                if user:
                    sign_in_with_corp(page, site, user)
                return page

            def shot(page: Any, name: str, path: str) -> None:
                page.goto(f"{site.url}{path}")
                page.screenshot(path=str(args.out / f"{name}.png"), full_page=True)
                print(f"{args.out / name}.png  {path}")

            shot(page_as(None), "signin", "/console/signin")
            bob = page_as("bob@example.com")
            shot(bob, "approvals", "/console/approvals")
            shot(bob, "request", f"/console/approvals/{ids['second']}")
            shot(page_as("alice@example.com"), "own-request", f"/console/approvals/{ids['safety']}")
            dave = page_as("dave@example.com")
            shot(dave, "grants", "/console/grants?model=llama-7b")
            shot(dave, "grant", f"/console/grants/{ids['grant']}")
            shot(dave, "revoke-model", "/console/revocations?model=llama-7b")
            shot(dave, "lineage", "/console/lineage?model=llama-7b")
            shot(dave, "audit", "/console/audit")
        finally:
            browser.close()


if __name__ == "__main__":
    main()
