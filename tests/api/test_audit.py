"""Audit routes: auditor role, the signed note, the vkey, entries with exact leaf bytes, proofs."""

from __future__ import annotations

import base64

from fastapi.testclient import TestClient

from broker.audit.checkpoint import NoteVerifier
from broker.audit.merkle import leaf_hash, verify_consistency, verify_inclusion
from broker.runtime import Broker
from tests.conftest import eval_token, exchange_form, person_token


def test_audit_routes(client: TestClient, broker: Broker) -> None:
    auditor = {"Authorization": f"Bearer {person_token(broker, 'auditor')}"}
    assert client.get("/v1/audit/key").status_code == 401
    approver = {"Authorization": f"Bearer {person_token(broker, 'approver')}"}
    assert client.get("/v1/audit/key", headers=approver).status_code == 403

    vkey = client.get("/v1/audit/key", headers=auditor).text.strip()
    verifier = NoteVerifier.from_vkey(vkey)
    first = client.get("/v1/audit/checkpoint", headers=auditor)
    assert first.headers["content-type"].startswith("text/plain")
    old = verifier.verify(first.content)
    for _ in range(3):
        client.post("/v1/token", data=exchange_form(eval_token(broker)))
    new = verifier.verify(client.get("/v1/audit/checkpoint", headers=auditor).content)
    assert (old.size, new.size) == (1, 4)

    entries = client.get(
        "/v1/audit/entries", params={"start": 0, "end": 4}, headers=auditor
    ).json()["entries"]
    assert [e["index"] for e in entries] == [0, 1, 2, 3]
    assert entries[1]["event"]["type"] == "exchange.allowed"
    for e in entries:
        leaf = base64.b64decode(e["leaf"])
        proof = client.get(
            "/v1/audit/proof/inclusion", params={"index": e["index"], "size": 4}, headers=auditor
        )
        hashes = [base64.b64decode(h) for h in proof.json()["proof"]]
        assert verify_inclusion(leaf_hash(leaf), e["index"], 4, hashes, new.root)
    cons = client.get(
        "/v1/audit/proof/consistency", params={"from": 1, "to": 4}, headers=auditor
    ).json()
    assert verify_consistency(
        1, 4, old.root, new.root, [base64.b64decode(h) for h in cons["proof"]]
    )

    bad = client.get("/v1/audit/proof/inclusion", params={"index": 0, "size": 99}, headers=auditor)
    assert bad.status_code == 400 and "size" in bad.json()["error_description"]
    assert (
        client.get("/v1/audit/entries", params={"start": 5, "end": 2}, headers=auditor).status_code
        == 400
    )
