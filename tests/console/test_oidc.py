"""Sign-in through a real OpenID provider, over HTTP without a browser: the flow's checks
(state, nonce, PKCE, single-use codes, the people verifier) each refuse what they must."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.console.session import LOGIN_COOKIE, SESSION_COOKIE
from broker.runtime import Broker, build_broker
from broker.settings import Settings
from tests.conftest import free_port
from tests.console.browser import CLIENT_ID, PEOPLE, console_policy
from tests.console.oidc_provider import Provider, run_provider

BROKER = "http://127.0.0.1:8080"
CALLBACK = f"{BROKER}/console/callback"


@dataclass
class Flow:
    provider: Provider
    broker: Broker
    web: TestClient

    def authorize(self, user: str) -> tuple[str, str]:
        """Start a sign-in and log in at the provider as ``user``: the callback's (code, state)."""
        start = self.web.get("/console/login/corp")
        assert start.status_code == 303, start.text
        location = start.headers["location"]
        assert location.startswith(f"{self.provider.url}/authorize?")
        query = parse_qs(urlsplit(location).query)
        assert query["code_challenge_method"] == ["S256"] and query["code_challenge"]
        assert query["nonce"] and query["state"] and query["redirect_uri"] == [CALLBACK]
        login = httpx.post(location, data={"user": user}, follow_redirects=False)
        assert login.status_code == 302, login.text
        back = parse_qs(urlsplit(login.headers["location"]).query)
        return back["code"][0], back["state"][0]

    def callback(self, code: str, state: str) -> httpx.Response:
        return self.web.get("/console/callback", params={"code": code, "state": state})


def _flow(tmp_path: Path, *, secret: str | None = None, dev: bool = True) -> Iterator[Flow]:
    with run_provider(
        free_port(), client_id=CLIENT_ID, redirect_uri=CALLBACK, users=PEOPLE, client_secret=secret
    ) as provider:
        policy = console_policy(tmp_path, provider.url, dev=dev)
        if secret is not None:
            doc = yaml.safe_load(policy.read_text())
            (tmp_path / "console-secret").write_text(secret + "\n")
            doc["issuers"][-1]["console"]["client_secret_file"] = "console-secret"
            policy.write_text(yaml.safe_dump(doc, sort_keys=False))
        broker = build_broker(
            Settings(dev=dev, data_dir=tmp_path / "data", policy=policy, port=8080)
        )
        try:
            with TestClient(create_app(broker=broker), follow_redirects=False) as web:
                yield Flow(provider, broker, web)
        finally:
            broker.close()


@pytest.fixture
def flow(tmp_path: Path) -> Iterator[Flow]:
    yield from _flow(tmp_path)


def _signed_in_as(flow: Flow) -> str:
    page = flow.web.get("/console/approvals")
    assert page.status_code in (200, 403), page.text
    return page.text


def test_a_person_signs_in_with_the_roles_of_their_groups(flow: Flow) -> None:
    code, state = flow.authorize("dave@example.com")
    done = flow.callback(code, state)
    assert done.status_code == 200, done.text
    assert "Signed in as dave@example.com (corp)" in done.text
    assert flow.web.cookies.get(SESSION_COOKIE, path="/console")
    text = _signed_in_as(flow)
    # dave's groups (ml-platform-admins, security-audit) are roles admin and auditor.
    assert 'dave@example.com <span class="muted">(corp; admin, auditor)</span>' in text
    assert flow.provider.tokens_issued == 1


def test_an_answer_for_another_sign_in_is_refused(flow: Flow) -> None:
    code, _state = flow.authorize("bob@example.com")
    refused = flow.callback(code, "someone-elses-state")
    assert refused.status_code == 401
    assert "does not belong to this browser" in refused.text
    assert not flow.web.cookies.get(SESSION_COOKIE, path="/console")
    assert flow.provider.tokens_issued == 0  # the code was never redeemed


def test_a_callback_without_its_login_cookie_is_refused(flow: Flow) -> None:
    code, state = flow.authorize("bob@example.com")
    flow.web.cookies.delete(LOGIN_COOKIE, path="/console/callback")
    refused = flow.callback(code, state)
    assert refused.status_code == 401 and "not started here" in refused.text


def test_a_code_is_redeemed_once(flow: Flow) -> None:
    code, state = flow.authorize("bob@example.com")
    login_cookie = flow.web.cookies.get(LOGIN_COOKIE, path="/console/callback")
    assert flow.callback(code, state).status_code == 200
    flow.web.cookies.clear()
    flow.web.cookies.set(LOGIN_COOKIE, str(login_cookie), path="/console/callback")
    again = flow.callback(code, state)
    assert again.status_code == 401 and "refused the code" in again.text


def test_an_id_token_with_another_nonce_is_refused(flow: Flow) -> None:
    code, state = flow.authorize("bob@example.com")
    flow.provider.codes[code].nonce = "not-the-nonce-the-broker-sent"
    refused = flow.callback(code, state)
    assert refused.status_code == 401 and "nonce" in refused.text
    assert not flow.web.cookies.get(SESSION_COOKIE, path="/console")


def test_the_pkce_verifier_is_required(flow: Flow) -> None:
    code, state = flow.authorize("bob@example.com")
    flow.provider.codes[code].code_challenge = "A" * 43  # a challenge the verifier cannot meet
    refused = flow.callback(code, state)
    assert refused.status_code == 401 and "refused the code" in refused.text


def test_the_people_verifier_decides_on_the_id_token(flow: Flow) -> None:
    # An ID token for an audience the issuer is not configured with: the verifier refuses it.
    code, state = flow.authorize("bob@example.com")
    flow.provider.audience = "another-app"
    refused = flow.callback(code, state)
    assert refused.status_code == 401
    assert "the ID token was refused" in refused.text and "aud" in refused.text
    assert not flow.web.cookies.get(SESSION_COOKIE, path="/console")


def test_the_provider_refusing_is_shown(flow: Flow) -> None:
    flow.web.get("/console/login/corp")
    refused = flow.web.get("/console/callback", params={"error": "access_denied", "state": "x"})
    assert refused.status_code == 401 and "refused the sign-in: access_denied" in refused.text
    # Anyone can link to the callback: only an error code is shown, never free text.
    forged = flow.web.get("/console/callback", params={"error": "Session expired: visit evil"})
    assert "refused the sign-in: an error" in forged.text and "evil" not in forged.text


def test_an_unknown_issuer_has_no_sign_in(flow: Flow) -> None:
    assert flow.web.get("/console/login/sso").status_code == 404
    assert "Sign in with corp" in flow.web.get("/console/signin").text


def test_a_confidential_client_signs_in_with_its_secret(tmp_path: Path) -> None:
    for flow in _flow(tmp_path, secret="s3cr3t-" + "x" * 20):
        code, state = flow.authorize("carol@example.com")
        done = flow.callback(code, state)
        assert done.status_code == 200, done.text
        assert "s3cr3t" not in done.text


def test_outside_dev_mode_there_is_no_dev_sign_in(tmp_path: Path) -> None:
    for flow in _flow(tmp_path, dev=False):
        page = flow.web.get("/console/signin")
        assert "Sign in with corp" in page.text
        assert "DEV" not in page.text and "/console/dev/signin" not in page.text
        assert flow.web.post("/console/dev/signin", data={"name": "eve"}).status_code == 404
        code, state = flow.authorize("dave@example.com")
        assert flow.callback(code, state).status_code == 200
        assert "Audit log" in flow.web.get("/console/audit").text
