"""Audit log routes (auditor or admin): checkpoint, verifier key, entries and proofs."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse

from broker.api.deps import (
    BrokerDep,
    Permission,
    PersonDep,
    model_access,
    require,
    require_unscoped,
)
from broker.audit.scope import ModelScope
from broker.audit.scoped import export_scoped
from broker.bounds import shown
from broker.errors import Forbidden, InvalidRequest
from broker.identity.types import Person
from broker.policy.roles import ModelAccess
from broker.runtime import Broker

router = APIRouter(prefix="/v1/audit", tags=["audit"])
MAX_ENTRIES = 1000
MAX_GLOBS = 20


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
    """Entries ``start <= index < end`` (at most 1000): exact leaf bytes and the decoded event.
    NOTE: entries of every model: a role scoped to models reads a scoped export instead."""
    access = model_access(broker, person, Permission.READ_AUDIT)
    require_unscoped(access, person, "reading entries (use GET /v1/audit/export?model=)")
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


def export_of(
    broker: Broker, person: Person, access: ModelAccess, model: list[str]
) -> dict[str, Any]:
    """The scoped export of the models ``model`` (globs) matches, for ``person`` holding
    ``access`` (their auditor role): the API's and the console's. Raises InvalidRequest for
    bad globs, Forbidden for one that may reach a model ``access`` does not cover."""
    if not model or len(model) > MAX_GLOBS or any(not m or len(m) > 200 for m in model):
        raise InvalidRequest(
            f"model: expected 1 to {MAX_GLOBS} globs of 1 to 200 characters, got "
            f"{', '.join(shown(m) for m in model[:MAX_GLOBS]) or 'none'}"
        )
    beyond = [m for m in model if not access.covers_glob(m)]
    if beyond:
        raise Forbidden(
            f"{person.subject} of issuer {person.issuer_name} holds {access.describe()}; "
            f"{', '.join(shown(m) for m in beyond)} may reach other models (name your globs "
            "or single models)"
        )
    with broker.store.write() as session:
        return export_scoped(session, broker.audit, ModelScope(model))


@router.get("/export")
def export(
    broker: BrokerDep, person: PersonDep, model: Annotated[list[str], Query(min_length=1)]
) -> dict[str, Any]:
    """A scoped export (broker.audit.scoped) of the entries of the models ``model`` matches,
    for ``broker audit verify --export``; a checkpoint of the whole log is signed first."""
    return export_of(broker, person, model_access(broker, person, Permission.READ_AUDIT), model)
