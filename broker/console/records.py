"""Record pages: a model's lineage (who changed it, with what, approved by whom) and the audit
log (newest checkpoint, its age, publication, and an export to download)."""

from __future__ import annotations

import datetime as dt
import io
import tarfile
import tempfile
from pathlib import Path

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from broker.api.deps import Permission, require
from broker.audit.export import export_log
from broker.console.web import ConsoleDep, ViewerDep, render
from broker.errors import InvalidRequest

router = APIRouter()


@router.get("/lineage")
def lineage(request: Request, console: ConsoleDep, who: ViewerDep, model: str = "") -> Response:
    require(who.person, Permission.READ_APPROVALS)
    models = sorted(console.broker.policy.policy.models)
    history = console.broker.grants.lineage(model, limit=200) if model in models else []
    return render(
        request, console, "lineage.html", who, model=model, models=models, history=history
    )


@router.get("/audit")
def audit(request: Request, console: ConsoleDep, who: ViewerDep) -> Response:
    require(who.person, Permission.READ_AUDIT)
    broker = console.broker
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
    )


@router.get("/audit/export")
def export(console: ConsoleDep, who: ViewerDep, since: int = Query(default=0, ge=0)) -> Response:
    """``broker audit export`` as a download: a tar.gz of entries.jsonl, checkpoint and
    proof.json (a checkpoint of the whole log is signed first)."""
    require(who.person, Permission.READ_AUDIT)
    broker = console.broker
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
