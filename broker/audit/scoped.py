"""Scoped exports: the entries of some models only, each provable on its own, verified offline.

A scoped export is one JSON document (``FORMAT``):

- ``origin``, ``models`` (the globs), ``size`` and ``checkpoint``: the signed note of the whole
  log at ``size``, signed when the export was made;
- ``entries``: ``{"index", "leaf" (base64 of the exact bytes), "event", "proof"}``, where
  ``proof`` is the RFC 9162 inclusion proof of the leaf in the tree of ``checkpoint``;
- ``checkpoints``: earlier checkpoints the broker signed (for each entry, the first one that
  covered it), ascending, each with ``consistency``: the RFC 9162 consistency proof to the next
  one, the last to ``checkpoint``. Whoever kept one of them (``broker audit monitor``, a
  publication) sees that this export extends the history they saw.

The recipient needs nothing but the document and the log's verifier key: no other entry. What
it cannot show is that no entry of the scope was left out (docs/audit.md).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.audit.checkpoint import Checkpoint, CheckpointError, NoteVerifier
from broker.audit.log import AuditLog, StoreHashReader
from broker.audit.merkle import (
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from broker.audit.scope import ModelScope, ScopeTracker
from broker.audit.verify import Problem, Report, check_entry
from broker.store.tables import CheckpointRow, EventRow

FORMAT = "broker-scoped-export/1"
BATCH = 10_000
_CHUNK = 500


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def export_scoped(session: Session, audit: AuditLog, scope: ModelScope) -> dict[str, Any]:
    """The scoped export of ``scope``'s entries, signing a checkpoint of the whole log first.
    Must run in a write transaction (signing does). Reads every entry once (to follow grants
    and approval requests to their models) and O(log n) tree nodes per exported entry."""
    signed = audit.sign_checkpoint(session, dt.datetime.now(dt.UTC))
    tracker = ScopeTracker(scope)
    chosen: list[tuple[int, bytes, Any]] = []
    query = select(EventRow.idx, EventRow.body).where(EventRow.idx < signed.size)
    for idx, body in session.execute(
        query.order_by(EventRow.idx).execution_options(yield_per=BATCH)
    ):
        event = json.loads(body)
        if tracker.admits(event):
            chosen.append((idx, bytes(body), event))
    reader = StoreHashReader(session)
    entries = [
        {
            "index": idx,
            "leaf": _b64(body),
            "event": event,
            "proof": [_b64(h) for h in inclusion_proof(idx, signed.size, reader)],
        }
        for idx, body, event in chosen
    ]
    return {
        "format": FORMAT,
        "origin": audit.origin,
        "models": list(scope.patterns),
        "size": signed.size,
        "checkpoint": signed.note,
        "checkpoints": _earlier(session, [idx for idx, _, _ in chosen], signed.size, reader),
        "entries": entries,
    }


def _earlier(
    session: Session, indexes: list[int], size: int, reader: StoreHashReader
) -> list[dict[str, Any]]:
    """For each index, the first stored checkpoint covering it (below ``size``), ascending,
    each with its consistency proof to the next (the last: to ``size``)."""
    sizes = list(
        session.scalars(
            select(CheckpointRow.size)
            .where(CheckpointRow.size > 0, CheckpointRow.size < size)
            .order_by(CheckpointRow.size)
        )
    )
    wanted = sorted(
        {sizes[at] for at in (bisect_right(sizes, i) for i in indexes) if at < len(sizes)}
    )
    notes: dict[int, str] = {}
    for start in range(0, len(wanted), _CHUNK):
        part = wanted[start : start + _CHUNK]
        rows = session.execute(
            select(CheckpointRow.size, CheckpointRow.note).where(CheckpointRow.size.in_(part))
        )
        notes.update({int(s): str(n) for s, n in rows})
    ends = [*wanted[1:], size][: len(wanted)]
    return [
        {"note": notes[old], "consistency": [_b64(h) for h in consistency_proof(old, new, reader)]}
        for old, new in zip(wanted, ends, strict=True)
    ]


@dataclass
class ScopedReport(Report):
    entries: int = 0
    models: tuple[str, ...] = ()


class _Malformed(ValueError):
    pass


def _field(item: Mapping[str, Any], name: str, kind: type, where: str) -> Any:
    value = item.get(name) if isinstance(item, Mapping) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Malformed(f"{where}: {name} is missing or not a {kind.__name__}")
    return value


def _hashes(values: Any, where: str) -> list[bytes]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise _Malformed(f"{where}: expected a list of base64 hashes")
    try:
        return [base64.b64decode(v, validate=True) for v in values]
    except binascii.Error:
        raise _Malformed(f"{where}: a hash is not valid base64") from None


def verify_scoped(doc: Any, vkey: str) -> ScopedReport:
    """Verify a scoped export with nothing but the document and the log's verifier key:
    every checkpoint's signature, the consistency of each checkpoint with the next, each
    entry's inclusion in the signed tree, and that each entry is of the export's models.
    Never raises on bad data: every disagreement is a :class:`Problem`, first found first.
    Raises CheckpointError only for a malformed ``vkey``."""
    verifier = NoteVerifier.from_vkey(vkey)
    report = ScopedReport(start=0)
    try:
        _verify(doc, verifier, report)
    except _Malformed as exc:
        report.problems.append(Problem(None, f"the export is malformed: {exc}"))
    return report


def _verify(doc: Any, verifier: NoteVerifier, report: ScopedReport) -> None:
    if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
        raise _Malformed(f"format: expected {FORMAT!r}")
    models = _field(doc, "models", list, "the export")
    try:
        scope = ModelScope([str(m) for m in models])
    except ValueError as exc:
        raise _Malformed(f"models: {exc}") from None
    report.models = scope.patterns
    note = _field(doc, "checkpoint", str, "the export")
    try:
        head = verifier.verify(note.encode())
    except CheckpointError as exc:
        report.problems.append(Problem(None, f"the export's checkpoint does not verify: {exc}"))
        return
    report.size = head.size
    report.latest_checkpoint = head.size
    report.checkpoints = 1 + _check_chain(
        _field(doc, "checkpoints", list, "the export"), head, verifier, report
    )
    _check_entries(_field(doc, "entries", list, "the export"), head, scope, report)


def _check_chain(
    items: list[Any], head: Checkpoint, verifier: NoteVerifier, report: ScopedReport
) -> int:
    """Check each earlier checkpoint's signature and its consistency proof to the next."""
    verified: list[tuple[Checkpoint, list[bytes]]] = []
    for number, item in enumerate(items, start=1):
        where = f"earlier checkpoint {number}"
        try:
            old = verifier.verify(_field(item, "note", str, where).encode())
        except CheckpointError as exc:
            report.problems.append(Problem(None, f"{where} does not verify: {exc}"))
            continue
        verified.append((old, _hashes(item.get("consistency"), f"{where}: consistency")))
    for at, (old, proof) in enumerate(verified):
        new = verified[at + 1][0] if at + 1 < len(verified) else head
        if not verify_consistency(old.size, new.size, old.root, new.root, proof):
            report.problems.append(
                Problem(
                    None,
                    f"checkpoint {old.size} is not consistent with checkpoint {new.size}: "
                    "the history it signed was rewritten, or the proof was altered",
                )
            )
    return len(verified)


def _check_entries(
    items: list[Any], head: Checkpoint, scope: ModelScope, report: ScopedReport
) -> None:
    tracker = ScopeTracker(scope)
    previous = -1
    for number, item in enumerate(items, start=1):
        where = f"entry {number}"
        index = _field(item, "index", int, where)
        try:
            leaf = base64.b64decode(_field(item, "leaf", str, where), validate=True)
        except binascii.Error:
            raise _Malformed(f"{where}: leaf is not valid base64") from None
        proof = _hashes(item.get("proof"), f"{where}: proof")
        report.entries += 1
        if index <= previous:
            report.problems.append(Problem(index, "entries are not in ascending index order"))
        previous = max(previous, index)
        if not verify_inclusion(leaf_hash(leaf), index, head.size, proof, head.root):
            report.problems.append(
                Problem(
                    index,
                    f"its inclusion proof does not lead to the signed checkpoint of size "
                    f"{head.size}: the entry or its proof was altered",
                )
            )
            continue
        problem = check_entry(index, leaf)
        if problem:
            report.problems.append(Problem(index, problem))
            continue
        event = json.loads(leaf)
        if item.get("event") != event:
            report.problems.append(Problem(index, "the decoded event differs from the leaf bytes"))
        if not tracker.admits(event):
            report.problems.append(
                Problem(index, f"the entry is not of the export's models {list(scope.patterns)}")
            )
