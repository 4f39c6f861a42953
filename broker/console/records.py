"""Record pages: a model's lineage (who changed it, with what, approved by whom) and the audit
log (newest checkpoint, its age, publication, and an export to download)."""

from __future__ import annotations

import datetime as dt
import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from broker.api.audit import export_of
from broker.api.deps import Permission, model_access, require_model, require_unscoped
from broker.audit.export import export_log
from broker.console.web import ConsoleDep, ViewerDep, render
from broker.errors import InvalidRequest

router = APIRouter()


@router.get("/lineage")
def lineage(request: Request, console: ConsoleDep, who: ViewerDep, model: str = "") -> Response:
    access = model_access(console.broker, who.person, Permission.READ_APPROVALS)
    if model:
        require_model(access, who.person, model)
    models = [m for m in sorted(console.broker.policy.policy.models) if access.allows(m)]
    history = console.broker.grants.lineage(model, limit=200) if model in models else []
    return render(
        request, console, "lineage.html", who, model=model, models=models, history=history
    )


@router.get("/audit")
def audit(request: Request, console: ConsoleDep, who: ViewerDep) -> Response:
    broker = console.broker
    access = model_access(broker, who.person, Permission.READ_AUDIT)
    with broker.store.read() as session:
        checkpoint = broker.audit.latest_checkpoint(session)
        size = broker.audit.size(session)
    now = dt.datetime.now(dt.UTC)
    age = None
    if checkpoint is not None:
        signed_at = checkpoint.signed_at
        if signed_at.tzinfo is None:
            signed_at = signed_at.replace(tzinfo=dt.UTC)
        age = int((now - signed_at).total_seconds())
    publisher = broker.publisher
    targets = []
    if publisher is not None:
        notices = publisher.notices()
        for name, target in publisher.targets.items():
            backlog = publisher.backlog[name]
            targets.append(
                {
                    "name": name,
                    "where": target.describe(),
                    "pending": backlog.pending,
                    "conflicts": backlog.conflicts,
                    "notice": notices.get(f"audit_publication_{name}"),
                }
            )
    return render(
        request,
        console,
        "audit.html",
        who,
        checkpoint=checkpoint,
        size=size,
        age=age,
        targets=targets,
        problems=broker.audit.integrity.problems(),
        verifier_key=broker.audit.verifier_key(),
        # A role scoped to models is offered the scoped export of its own globs only.
        export_models=list(access.patterns) if access.patterns is not None else None,
    )


@router.get("/audit/export")
def export(
    console: ConsoleDep,
    who: ViewerDep,
    since: int = Query(default=0, ge=0),
    model: Annotated[list[str] | None, Query()] = None,
) -> Response:
    """With ``model`` (globs): the scoped export of ``GET /v1/audit/export?model=`` as a JSON
    download, for any auditor whose scope covers them. Without: ``broker audit export`` as a
    download, a tar.gz of entries.jsonl, checkpoint and proof.json, for a role covering every
    model (a checkpoint of the whole log is signed first either way)."""
    broker = console.broker
    access = model_access(broker, who.person, Permission.READ_AUDIT)
    if model:
        doc = export_of(broker, who.person, access, model)
        return Response(
            json.dumps(doc, indent=1, ensure_ascii=False) + "\n",
            media_type="application/json",
            headers={
                "Content-Disposition": f'attachment; filename="audit-export-{doc["size"]}.json"'
            },
        )
    require_unscoped(access, who.person, "downloading the whole log (download your models' export)")
    with tempfile.TemporaryDirectory(prefix="broker-export-") as tmp:
        directory = Path(tmp) / "audit-export"
        try:
            with broker.store.write() as session:
                manifest = export_log(session, broker.audit, since, directory)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            tar.add(directory, arcname="audit-export")
    name = f"audit-export-{since}-{manifest['size']}.tar.gz"
    return Response(
        buffer.getvalue(),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
