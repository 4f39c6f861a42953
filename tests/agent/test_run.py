"""The agent's loop in-process against a running dev broker: an action that needs approval is
waited for, naming the request, then exchanged with it; a denial ends the agent."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import httpx
import pytest

from broker.agent import Agent, Sink
from broker.client import BrokerClient, BrokerJWT, Provider
from broker.client.sources import file_source
from broker.runtime import Broker
from tests.approvals.test_flow import K8S, TRAINER
from tests.conftest import LiveServer, person_token
from tests.poll import POLL_LIMIT_S, poll


def trainer_token(broker: Broker, path: Path) -> None:
    assert broker.dev_issuer is not None
    path.write_text(broker.dev_issuer.mint(sub=TRAINER, claims=K8S))


def run_in_thread(agent: Agent) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(agent.run()), daemon=True)
    thread.start()
    return thread, result


def pending_approval(server: LiveServer, broker: Broker) -> str | None:
    admin = {"Authorization": f"Bearer {person_token(broker, 'admin')}"}
    listed = httpx.get(f"{server.url}/v1/approvals", params={"status": "pending"}, headers=admin)
    found = listed.json()["approvals"]
    return str(found[0]["id"]) if found else None


def decide(server: LiveServer, broker: Broker, approval_id: str, verb: str) -> None:
    assert broker.dev_issuer is not None
    bob = broker.dev_issuer.mint(sub="bob@example.com", roles=["approver"])
    resp = httpx.post(
        f"{server.url}/v1/approvals/{approval_id}/{verb}",
        json={"reason": f"{verb}: ok"},
        headers={"Authorization": f"Bearer {bob}"},
    )
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(("verb", "code"), [("approve", 0), ("deny", 1)])
def test_waits_for_approval_naming_the_request(
    live_broker: tuple[LiveServer, Broker],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    verb: str,
    code: int,
) -> None:
    server, broker = live_broker
    token_file, sink = tmp_path / "token", tmp_path / "cred.json"
    trainer_token(broker, token_file)
    provider = Provider(
        BrokerClient(server.url), file_source(token_file), model="llama-7b", action="fine-tune"
    )
    stop = threading.Event()
    agent = Agent(provider, Sink(sink, "json"), exit_after_auth=True, stop=stop, backoff_first=0.05)
    caplog.set_level(logging.INFO, logger="broker.agent")
    thread, result = run_in_thread(agent)
    try:
        approval_id = poll(lambda: pending_approval(server, broker), "the approval request")
        poll(lambda: approval_id in caplog.text or None, "the agent naming the request")
        assert f"broker approvals show {approval_id}" in caplog.text
        trainer_token(broker, token_file)  # the refused exchange spent the single-use token
        decide(server, broker, approval_id, verb)
        thread.join(timeout=POLL_LIMIT_S)
        assert result == [code]
    finally:
        stop.set()
        thread.join(timeout=POLL_LIMIT_S)
    if verb == "approve":
        assert isinstance(agent.current, BrokerJWT) and sink.exists()
        assert broker.approvals.get(approval_id)["status"] == "used"
    else:
        assert agent.current is None and not sink.exists()
        assert f"approval {approval_id} is denied" in caplog.text


def test_stops_while_waiting_for_approval(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live_broker
    token_file = tmp_path / "token"
    trainer_token(broker, token_file)
    provider = Provider(
        BrokerClient(server.url), file_source(token_file), model="llama-7b", action="fine-tune"
    )
    stop = threading.Event()
    thread, result = run_in_thread(Agent(provider, Sink(tmp_path / "c", "json"), stop=stop))
    try:
        poll(lambda: pending_approval(server, broker), "the approval request")
    finally:
        stop.set()
        thread.join(timeout=POLL_LIMIT_S)
    assert result == [0]
