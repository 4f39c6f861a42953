"""Audit log routes (auditor or admin): checkpoint, verifier key, entries and proofs."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from broker.api.deps import BrokerDep, Permission, PersonDep, require
from broker.errors import InvalidRequest

router = APIRouter(prefix="/v1/audit", tags=["audit"])
MAX_ENTRIES = 1000


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@router.get("/checkpoint", response_class=PlainTextResponse)
def checkpoint(broker: BrokerDep, person: PersonDep) -> PlainTextResponse:
    """The newest signed checkpoint (a C2SP signed note), signed now if the log has grown."""
    require(person, Permission.READ_AUDIT)
    with broker.store.write() as session:
        signed = broker.audit.sign_checkpoint(session, dt.datetime.now(dt.UTC))
    return PlainTextResponse(signed.note, media_type="text/plain; charset=utf-8")


@router.get("/key", response_class=PlainTextResponse)
def key(broker: BrokerDep, person: PersonDep) -> PlainTextResponse:
    """The checkpoint verifier key: ``<name>+<hex key id>+<base64(0x01 ‖ pubkey)>``."""
    require(person, Permission.READ_AUDIT)
    return PlainTextResponse(broker.audit.verifier_key() + "\n")


@router.get("/entries")
def entries(
    broker: BrokerDep,
    person: PersonDep,
    start: int = Query(ge=0),
    end: int = Query(gt=0),
) -> dict[str, Any]:
    """Entries ``start <= index < end`` (at most 1000): exact leaf bytes and the decoded event."""
    require(person, Permission.READ_AUDIT)
    if end <= start or end - start > MAX_ENTRIES:
        raise InvalidRequest(f"start/end: expected start < end <= start + {MAX_ENTRIES}")
    with broker.store.read() as session:
        rows = broker.audit.entries(session, start, end)
    return {
        "entries": [
            {"index": r.idx, "leaf": _b64(r.body), "event": json.loads(r.body)} for r in rows
        ]
    }


@router.get("/proof/inclusion")
def inclusion(broker: BrokerDep, person: PersonDep, index: int, size: int) -> dict[str, Any]:
    require(person, Permission.READ_AUDIT)
    with broker.store.read() as session:
        proof = broker.audit.inclusion_proof(session, index, size)
    return {"index": index, "size": size, "proof": [_b64(h) for h in proof]}


@router.get("/proof/consistency")
def consistency(
    broker: BrokerDep,
    person: PersonDep,
    from_: int = Query(alias="from"),
    to: int = Query(),
) -> dict[str, Any]:
    require(person, Permission.READ_AUDIT)
    with broker.store.read() as session:
        proof = broker.audit.consistency_proof(session, from_, to)
    return {"from": from_, "to": to, "proof": [_b64(h) for h in proof]}
