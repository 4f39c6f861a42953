"""Token sources: GitHub Actions' OIDC endpoint (a local stand-in for the runner's, which
checks the request token and hands out dev-issuer tokens for the audience asked for), a file,
a variable, and which one is found when none is named."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from broker.client import BrokerClient, BrokerJWT, ClientError, credentials
from broker.client.sources import env_source, file_source, find_source
from broker.runtime import Broker
from tests.conftest import EVAL_SUB, EVAL_WORKFLOW, LiveServer
from tests.poll import SERVE_POLL_S

RUNNER_BEARER = "runner-request-token"


@pytest.fixture
def runner_oidc(
    live_broker: tuple[LiveServer, Broker], monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[str]]:
    """The runner's endpoint on loopback; yields the audiences it was asked for."""
    _, broker = live_broker
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {RUNNER_BEARER}":
                self.send_response(401)
                self.end_headers()
                return
            audience = parse_qs(urlsplit(self.path).query)["audience"][0]
            asked.append(audience)
            assert broker.dev_issuer is not None
            token = broker.dev_issuer.mint(
                sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW}, aud=audience
            )
            body = json.dumps({"value": token}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": SERVE_POLL_S}, daemon=True
    )
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/token?api-version=2.0"
        monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", url)
        monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", RUNNER_BEARER)
        monkeypatch.delenv("BROKER_TOKEN_FILE", raising=False)
        yield asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_github_actions_token_with_the_broker_audience(
    live_broker: tuple[LiveServer, Broker], runner_oidc: list[str]
) -> None:
    server, _ = live_broker
    got = credentials(model="llama-7b", action="evaluate", url=server.url)  # found, not named
    assert isinstance(got, BrokerJWT) and runner_oidc == ["model-broker"]


def test_github_actions_with_the_wrong_audience_is_refused(
    live_broker: tuple[LiveServer, Broker], runner_oidc: list[str]
) -> None:
    server, _ = live_broker
    source = find_source(github_actions=True, oidc_audience="someone-else")
    token = source()
    assert runner_oidc == ["someone-else"]
    with pytest.raises(ClientError) as refused:
        BrokerClient(server.url).exchange(token, model="llama-7b", action="evaluate")
    assert refused.value.code == "invalid_request" and "aud" in refused.value.description


def test_github_actions_without_id_token_permission(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACTIONS_ID_TOKEN_REQUEST_URL", raising=False)
    with pytest.raises(ValueError, match="id-token: write"):
        find_source(github_actions=True)()


def test_file_and_variable_are_read_at_each_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    path.write_text("one\n")
    read = file_source(path)
    assert read() == "one"
    path.write_text("two")
    assert read() == "two"
    monkeypatch.setenv("CI_TOKEN", "three")
    assert env_source("CI_TOKEN")() == "three"
    monkeypatch.setenv("CI_TOKEN", "")
    with pytest.raises(ValueError, match="CI_TOKEN holds no token"):
        env_source("CI_TOKEN")()


def test_the_token_file_variable_is_found_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("from-file")
    monkeypatch.setenv("BROKER_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", "http://127.0.0.1:9/unused")
    assert find_source()() == "from-file"


def test_no_source_or_two_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROKER_TOKEN_FILE", raising=False)
    monkeypatch.delenv("ACTIONS_ID_TOKEN_REQUEST_URL", raising=False)
    with pytest.raises(ValueError, match="no workload token source"):
        find_source()
    with pytest.raises(ValueError, match="give one token source"):
        find_source(token_file="f", token_env="V")
