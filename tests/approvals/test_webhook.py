"""Approval webhooks: delivered with retries, never carrying a token, and signed per Standard
Webhooks so that a receiver verifies them with the ``standardwebhooks`` package; a secret file
that is missing, unreadable or ill-formed stops the policy from loading."""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook, WebhookVerificationError

from broker.api.app import create_app
from broker.errors import PolicyError
from broker.policy import load_policy
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.approvals.test_flow import LINEAGE, bearer, trainer
from tests.conftest import exchange_form, person_token
from tests.poll import SERVE_POLL_S


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]


@dataclass
class Receiver:
    """A loopback HTTP server that keeps every POST (body bytes and headers); the first
    ``fail`` attempts are answered 500."""

    fail: int = 0
    received: list[Received] = field(default_factory=list)
    refused: list[Received] = field(default_factory=list)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                got = Received(body, dict(self.headers.items()))
                if receiver.fail > 0:
                    receiver.fail -= 1
                    receiver.refused.append(got)
                    self.send_response(500)
                else:
                    receiver.received.append(got)
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    hook = Receiver()
    server = HTTPServer(("127.0.0.1", 0), hook.handler())
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": SERVE_POLL_S}, daemon=True
    )
    thread.start()
    try:
        yield hook, f"http://127.0.0.1:{server.server_port}/hook"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def policy_with_webhook(directory: Path, url: str, secret_file: str = "webhook-secret") -> Path:
    """The example policy, with its keys found from ``directory`` and a webhook to ``url``."""
    text = EXAMPLE_POLICY.read_text().replace(
        "jwks_file: keys/", f"jwks_file: {EXAMPLE_POLICY.parent}/keys/"
    )
    webhook = f"  webhook: {{url: '{url}', secret_file: {secret_file}, timeout: 2s, retries: 2}}"
    text = text.replace("  # webhook: {url:", webhook + "\n  # was:")
    assert webhook in text
    policy = directory / "policy.yaml"
    policy.write_text(text)
    return policy


@pytest.fixture
def hooked(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> Iterator[tuple[TestClient, Broker, Receiver, str]]:
    hook, url = receiver
    secret = new_secret()
    (tmp_path / "webhook-secret").write_text(secret + "\n")
    policy = policy_with_webhook(tmp_path, url)
    broker = build_broker(Settings(dev=True, data_dir=tmp_path / "d", policy=policy))
    broker.notifier._backoff = 0.01  # type: ignore[union-attr]
    with TestClient(create_app(broker=broker)) as client:
        yield client, broker, hook, secret


def open_and_approve(client: TestClient, broker: Broker) -> tuple[str, list[str]]:
    """Open a fine-tune request and approve it; the approval id and the tokens used."""
    token = trainer(broker)
    approval_id = client.post(
        "/v1/token", data=exchange_form(token, action="fine-tune", lineage=LINEAGE)
    ).json()["approval_id"]
    person = person_token(broker, "approver", sub="bob@example.com")
    resp = client.post(
        f"/v1/approvals/{approval_id}/approve", json={"reason": "ok"}, headers=bearer(person)
    )
    assert resp.json()["status"] == "approved", resp.text
    assert broker.notifier is not None
    broker.notifier.close()  # delivers what is queued
    return approval_id, [token, person]


def test_webhooks_verify_with_the_standard_webhooks_package_and_only_with_the_secret(
    hooked: tuple[TestClient, Broker, Receiver, str],
) -> None:
    client, broker, hook, secret = hooked
    approval_id, tokens = open_and_approve(client, broker)
    assert len(hook.received) == 2

    verified = [Webhook(secret).verify(r.body, r.headers) for r in hook.received]
    assert [v["event"] for v in verified] == ["approval.requested", "approval.approved"]
    assert all(v["approval"]["id"] == approval_id for v in verified)
    assert len({r.headers["webhook-id"] for r in hook.received}) == 2

    wrong = Webhook(new_secret())
    for got in hook.received:
        with pytest.raises(WebhookVerificationError, match="No matching signature"):
            wrong.verify(got.body, got.headers)
    # Nor does the right secret verify a body someone changed on the way.
    got = hook.received[1]
    forged = got.body.replace(b"approval.approved", b"approval.denied")
    assert forged != got.body
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(forged, got.headers)
    # A body never carries a token (nor the secret).
    text = b"".join(r.body for r in hook.received).decode()
    assert secret not in text and all(token not in text for token in tokens)


def test_a_retried_webhook_keeps_its_id_and_is_signed_again(
    hooked: tuple[TestClient, Broker, Receiver, str],
) -> None:
    client, broker, hook, secret = hooked
    hook.fail = 1
    open_and_approve(client, broker)
    [refused] = hook.refused
    first, _ = hook.received
    assert first.headers["webhook-id"] == refused.headers["webhook-id"]
    assert first.body == refused.body
    assert Webhook(secret).verify(first.body, first.headers)["event"] == "approval.requested"


def test_the_secret_file_is_found_next_to_the_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = new_secret()
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "secret").write_text(f"  {secret}\n")
    policy = policy_with_webhook(tmp_path, "https://hooks.example.com/x", "hooks/secret")
    monkeypatch.chdir("/")
    loaded = load_policy(policy, dev_mode=True)
    assert loaded.webhook_secret == secret
    assert secret not in repr(loaded)
    # The policy names the file; the secret is not part of the policy (nor of its digest).
    assert secret not in json.dumps(loaded.policy.model_dump(mode="json"))
    (tmp_path / "hooks" / "secret").write_text(new_secret())
    assert load_policy(policy, dev_mode=True).digest == loaded.digest


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read the secret: No such file or directory"),
        ("directory", "cannot read the secret: Is a directory"),
        ("", "not a Standard Webhooks secret"),
        (base64.b64encode(b"k" * 32).decode(), "not a Standard Webhooks secret"),  # no prefix
        ("whsec_not base64 at all!", "not a Standard Webhooks secret"),
        ("whsec_" + base64.b64encode(b"k" * 23).decode(), "not a Standard Webhooks secret"),
        ("whsec_" + base64.b64encode(b"k" * 65).decode(), "not a Standard Webhooks secret"),
        ("\xff\xfe whsec_", "not a Standard Webhooks secret"),
    ],
)
def test_a_missing_unreadable_or_ill_formed_secret_file_stops_the_policy(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    secret_file = tmp_path / "webhook-secret"
    if content == "directory":
        secret_file.mkdir()
    elif content is not None:
        secret_file.write_bytes(content.encode("latin-1"))
    policy = policy_with_webhook(tmp_path, "https://hooks.example.com/x")
    with pytest.raises(PolicyError) as refused:
        load_policy(policy, dev_mode=True)
    assert refused.value.path == "approval.webhook.secret_file"
    assert str(secret_file) in refused.value.message and problem in refused.value.message
    if content and content != "directory":
        assert content.strip() not in str(refused.value)


def test_a_webhook_without_a_secret_file_is_refused(tmp_path: Path) -> None:
    policy = policy_with_webhook(tmp_path, "https://hooks.example.com/x")
    policy.write_text(policy.read_text().replace(" secret_file: webhook-secret,", ""))
    with pytest.raises(PolicyError, match=r"approval\.webhook\.secret_file: required field"):
        load_policy(policy, dev_mode=True)
