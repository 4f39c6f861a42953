"""Scoped exports (issue 17): only the entries of some models, each with its inclusion proof,
verified offline with the public key alone; every alteration is found and named."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.audit.checkpoint import NoteSigner
from broker.audit.scope import ModelScope, ScopeTracker
from broker.audit.scoped import verify_scoped
from broker.cli.main import main
from broker.runtime import Broker, build_broker
from broker.settings import Settings
from tests.audit.conftest import bearer
from tests.conftest import eval_token, exchange_form
from tests.vendor import VENDOR_SUB, vendor_policy


@pytest.fixture
def vendor(tmp_path: Path, data_dir: Path) -> Iterator[tuple[TestClient, Broker]]:
    policy = vendor_policy(tmp_path)
    broker = build_broker(Settings(dev=True, data_dir=data_dir, policy=policy, port=8080))
    with TestClient(create_app(broker=broker)) as client:
        yield client, broker


def _exchange(client: TestClient, broker: Broker, model: str, sub: str | None = None) -> Any:
    assert broker.dev_issuer is not None
    token = eval_token(broker) if sub is None else broker.dev_issuer.mint(sub=sub)
    return client.post("/v1/token", data=exchange_form(token, model=model))


@pytest.fixture
def mixed(vendor: tuple[TestClient, Broker]) -> tuple[TestClient, Broker]:
    """Entries of vendor-llm, vendor-tts and llama-7b interleaved; a vendor grant revoked;
    a denial for a vendor model; checkpoints signed in between."""
    client, broker = vendor
    grants = []
    for n in range(4):
        grants.append(_exchange(client, broker, "vendor-llm", VENDOR_SUB).json()["grant_id"])
        assert _exchange(client, broker, "llama-7b").status_code == 200
        if n == 1:
            with broker.store.write() as s:
                broker.audit.sign_checkpoint(s, dt.datetime.now(dt.UTC))
    assert _exchange(client, broker, "vendor-tts", VENDOR_SUB).status_code == 200
    assert _exchange(client, broker, "vendor-llm").status_code == 403  # denied, still logged
    revoked = client.post(
        f"/v1/grants/{grants[0]}/revoke", json={"reason": "drill"}, headers=bearer(broker, "admin")
    )
    assert revoked.status_code == 200, revoked.text
    with broker.store.write() as s:
        broker.audit.sign_checkpoint(s, dt.datetime.now(dt.UTC))
    assert _exchange(client, broker, "vendor-llm", VENDOR_SUB).status_code == 200
    return client, broker


def _export(broker: Broker, data_dir: Path, out: Path, *globs: str) -> dict[str, Any]:
    args = ["audit", "export", str(out), "--data-dir", str(data_dir)]
    for glob in globs:
        args += ["--model", glob]
    assert main(args) == 0
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def _verify(
    capsys: pytest.CaptureFixture[str], path: Path, key: str, doc: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    if doc is not None:
        path.write_text(json.dumps(doc))
    capsys.readouterr()
    code = main(["audit", "verify", "--export", str(path), "--key", key, "--json"])
    return code, json.loads(capsys.readouterr().out)


def _flip(b64: str, at: int = 5) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[at % len(raw)] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def test_a_scoped_export_holds_only_its_models_and_verifies_offline(
    mixed: tuple[TestClient, Broker],
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, broker = mixed
    doc = _export(broker, data_dir, tmp_path / "vendor.json", "vendor-*")
    models = {e["event"].get("model") for e in doc["entries"]}
    types = [e["event"]["type"] for e in doc["entries"]]
    assert models == {"vendor-llm", "vendor-tts", None}
    assert types.count("exchange.allowed") == 6 and "exchange.denied" in types
    assert "grant.revoked" in types and "policy.loaded" not in types
    # The backend's confirmation names no model: it follows its (vendor) grant.
    [confirmed] = [e["event"] for e in doc["entries"] if e["event"].get("model") is None]
    assert confirmed["type"] == "grant.backend_revocation_confirmed"
    # The earlier checkpoints that first covered an entry, each consistent with the next.
    assert [c["note"].split("\n")[1] for c in doc["checkpoints"]] == ["5", "13"]
    offline = tmp_path / "elsewhere.json"
    offline.write_text((tmp_path / "vendor.json").read_text())  # nothing but the file
    code, report = _verify(capsys, offline, broker.audit.verifier_key())
    assert (code, report["ok"], report["entries"]) == (0, True, len(doc["entries"]))
    assert report["models"] == ["vendor-*"] and report["size"] == doc["size"]

    only = _export(broker, data_dir, tmp_path / "tts.json", "vendor-tts")
    assert {e["event"]["model"] for e in only["entries"]} == {"vendor-tts"}
    nothing = _export(broker, data_dir, tmp_path / "none.json", "nobody-*")
    assert (nothing["entries"], nothing["checkpoints"]) == ([], [])
    assert _verify(capsys, tmp_path / "none.json", broker.audit.verifier_key())[0] == 0


def test_every_alteration_fails_and_the_first_problem_is_named(
    mixed: tuple[TestClient, Broker],
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, broker = mixed
    key = broker.audit.verifier_key()
    doc = _export(broker, data_dir, tmp_path / "vendor.json", "vendor-*")
    path = tmp_path / "altered.json"

    def failed(altered: dict[str, Any]) -> str:
        code, report = _verify(capsys, path, key, altered)
        assert (code, report["ok"]) == (1, False), report
        return str(report["problems"][0])

    # One byte of an entry (the event re-decoded to match, so only the proof can tell).
    altered = copy.deepcopy(doc)
    entry = altered["entries"][2]
    leaf = base64.b64decode(entry["leaf"]).replace(b"vendor-llm", b"vendor-llx", 1)
    entry["leaf"], entry["event"] = base64.b64encode(leaf).decode(), json.loads(leaf)
    assert failed(altered).startswith(f"index {entry['index']}: its inclusion proof does not")

    # One node of a proof.
    altered = copy.deepcopy(doc)
    entry = altered["entries"][3]
    entry["proof"][0] = _flip(entry["proof"][0])
    assert failed(altered).startswith(f"index {entry['index']}: its inclusion proof does not")

    # The export's checkpoint signature, and an earlier checkpoint's.
    altered = copy.deepcopy(doc)
    body, _, sig = altered["checkpoint"].rpartition(" ")
    altered["checkpoint"] = f"{body} {_flip(sig.strip(), 10)}\n"
    assert failed(altered).startswith("the export's checkpoint does not verify")
    altered = copy.deepcopy(doc)
    body, _, sig = altered["checkpoints"][0]["note"].rpartition(" ")
    altered["checkpoints"][0]["note"] = f"{body} {_flip(sig.strip(), 10)}\n"
    assert failed(altered).startswith("earlier checkpoint 1 does not verify")
    # A checkpoint signed by another key.
    altered = copy.deepcopy(doc)
    other = NoteSigner(broker.audit.origin, Ed25519PrivateKey.generate())
    assert _verify(capsys, path, other.verifier_key(), altered)[0] == 1

    # A consistency proof.
    altered = copy.deepcopy(doc)
    altered["checkpoints"][0]["consistency"][-1] = _flip(
        altered["checkpoints"][0]["consistency"][-1]
    )
    assert failed(altered) == (
        "checkpoint 5 is not consistent with checkpoint 13: the history it signed was "
        "rewritten, or the proof was altered"
    )

    # An entry of another model slipped in, with a forged proof (a vendor entry's).
    with broker.store.read() as s:
        llama = next(
            r
            for r in broker.audit.entries(s, 0, doc["size"])
            if json.loads(r.body).get("model") == "llama-7b"
        )
    altered = copy.deepcopy(doc)
    slipped = {
        "index": llama.idx,
        "leaf": base64.b64encode(llama.body).decode(),
        "event": json.loads(llama.body),
        "proof": altered["entries"][0]["proof"],
    }
    altered["entries"] = sorted([*altered["entries"], slipped], key=lambda e: e["index"])
    assert failed(altered).startswith(f"index {llama.idx}: its inclusion proof does not")
    # ... and with its true proof: in the log, but not of the export's models.
    with broker.store.read() as s:
        true_proof = broker.audit.inclusion_proof(s, llama.idx, doc["size"])
    slipped["proof"] = [base64.b64encode(h).decode() for h in true_proof]
    assert (
        failed(altered)
        == f"index {llama.idx}: the entry is not of the export's models ['vendor-*']"
    )

    # The untouched export still verifies.
    assert _verify(capsys, path, key, doc)[0] == 0


def test_the_api_serves_the_same_export_to_auditors(
    mixed: tuple[TestClient, Broker], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    client, broker = mixed
    resp = client.get(
        "/v1/audit/export", params={"model": "vendor-tts"}, headers=bearer(broker, "auditor")
    )
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert {e["event"]["model"] for e in doc["entries"]} == {"vendor-tts"}
    assert verify_scoped(doc, broker.audit.verifier_key()).ok
    many = client.get(
        "/v1/audit/export", params={"model": ["x"] * 21}, headers=bearer(broker, "auditor")
    )
    assert many.status_code == 400 and "model: expected 1 to 20 globs" in many.text


def test_events_without_a_model_follow_their_grant_or_approval_request() -> None:
    tracker = ScopeTracker(ModelScope(["vendor-*"]))
    events = [
        {"type": "approval.requested", "approval_id": "a1", "request": {"model": "vendor-x"}},
        {"type": "approval.approved", "approval_id": "a1"},
        {"type": "exchange.allowed", "grant_id": "g1", "model": "vendor-x", "approval_id": "a1"},
        {"type": "grant.backend_revocation_confirmed", "grant_id": "g1"},
        {"type": "exchange.allowed", "grant_id": "g2", "model": "llama-7b"},
        {"type": "grant.backend_revocation_confirmed", "grant_id": "g2"},
        {"type": "policy.loaded", "digest": "sha256:x"},
        {"type": "grant.failed", "grant_id": "g-unknown"},
    ]
    assert [tracker.admits(e) for e in events] == [
        True,
        True,
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    with pytest.raises(ValueError, match="at least one glob"):
        ModelScope([])


def test_a_malformed_export_is_named(
    vendor: tuple[TestClient, Broker], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, broker = vendor
    key = broker.audit.verifier_key()
    code, report = _verify(capsys, tmp_path / "x.json", key, {"format": "something-else"})
    assert code == 1 and report["problems"][0].startswith("the export is malformed: format")
    (tmp_path / "y.json").write_text("not json")
    assert main(["audit", "verify", "--export", str(tmp_path / "y.json"), "--key", key]) == 2
    assert "is not a JSON scoped export" in capsys.readouterr().err
