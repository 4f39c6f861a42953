"""Export the log for offline verification, and verify such an export with only a public key.

An export of entries ``[since, size)`` is a directory with:

- ``entries.jsonl``: one ``{"index", "leaf" (base64 of the exact bytes), "event"}`` per line;
- ``checkpoint``: the signed note of the tree at ``size``;
- ``proof.json``: ``origin``, ``since``, ``size``, ``frontier`` (base64 hashes of the perfect
  subtrees covering ``[0, since)``, so the root can be recomputed without earlier entries) and
  ``previous``: the newest checkpoint at or before ``since`` with a consistency proof to
  ``size``, so whoever kept that earlier checkpoint sees that nothing before was rewritten.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.audit.checkpoint import CheckpointError, NoteVerifier
from broker.audit.log import AuditLog, StoreHashReader, frontier_nodes
from broker.audit.merkle import Frontier, consistency_proof, verify_consistency
from broker.audit.verify import Problem, Report, Trusted, verify_log
from broker.store.tables import CheckpointRow, EventRow

BATCH = 10_000


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def export_log(session: Session, audit: AuditLog, since: int, directory: Path) -> dict[str, Any]:
    """Write an export of ``[since, size)``, signing a checkpoint of the whole log first.
    Must run in a write transaction. Raises ValueError if ``since`` is past the end."""
    signed = audit.sign_checkpoint(session, dt.datetime.now(dt.UTC))
    if not 0 <= since <= signed.size:
        raise ValueError(f"--since: expected 0..{signed.size}, got {since}")
    reader = StoreHashReader(session)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "entries.jsonl").open("w", encoding="utf-8") as out:
        query = select(EventRow.idx, EventRow.body).where(
            EventRow.idx >= since, EventRow.idx < signed.size
        )
        for idx, body in session.execute(
            query.order_by(EventRow.idx).execution_options(yield_per=BATCH)
        ):
            line = {"index": idx, "leaf": _b64(body), "event": json.loads(body)}
            out.write(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")
    (directory / "checkpoint").write_text(signed.note, encoding="utf-8")
    previous_row = session.scalars(
        select(CheckpointRow)
        .where(CheckpointRow.size <= since, CheckpointRow.size > 0)
        .order_by(CheckpointRow.size.desc())
    ).first()
    previous = None
    if previous_row is not None:
        proof = consistency_proof(previous_row.size, signed.size, reader)
        previous = {"note": previous_row.note, "consistency": [_b64(h) for h in proof]}
    manifest = {
        "origin": audit.origin,
        "since": since,
        "size": signed.size,
        "frontier": [_b64(reader.get_node(lv, i)) for lv, i in frontier_nodes(since)],
        "previous": previous,
    }
    (directory / "proof.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _entries(path: Path, report: Report) -> Iterator[tuple[int, bytes, bytes | None]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                item = json.loads(line)
                leaf = base64.b64decode(item["leaf"], validate=True)
                index = int(item["index"])
            except (ValueError, KeyError, TypeError):
                report.problems.append(Problem(None, f"entries.jsonl line {number} is malformed"))
                return
            if item.get("event") != json.loads(leaf):
                report.problems.append(
                    Problem(index, "the decoded event differs from the leaf bytes")
                )
            yield index, leaf, None


def verify_export(directory: Path, vkey: str) -> Report:
    """Verify an export with nothing but its files and the log's public verifier key."""
    verifier = NoteVerifier.from_vkey(vkey)
    manifest = json.loads((directory / "proof.json").read_text())
    note = (directory / "checkpoint").read_bytes()
    since, size = int(manifest["since"]), int(manifest["size"])
    frontier = Frontier.from_hashes(since, [base64.b64decode(h) for h in manifest["frontier"]])
    pending = Report(start=since)
    report = verify_log(
        _entries(directory / "entries.jsonl", pending), [note], verifier, frontier=frontier
    )
    report.problems[:0] = pending.problems
    if report.latest_checkpoint != size or report.size != size:
        report.problems.append(
            Problem(None, f"the export should cover [{since}, {size}) and end at its checkpoint")
        )
    previous = manifest.get("previous")
    if previous and report.latest_checkpoint == size:
        _check_previous(previous, verifier, note, report)
    return report


def _check_previous(
    previous: dict[str, Any], verifier: NoteVerifier, note: bytes, report: Report
) -> None:
    try:
        old = verifier.verify(previous["note"].encode())
        new = verifier.verify(note)
    except CheckpointError as exc:
        report.problems.append(Problem(None, f"previous checkpoint does not verify: {exc}"))
        return
    proof = [base64.b64decode(h) for h in previous["consistency"]]
    if not verify_consistency(old.size, new.size, old.root, new.root, proof):
        report.problems.append(
            Problem(None, f"checkpoint {new.size} is not consistent with checkpoint {old.size}")
        )


def verify_store(
    session: Session, verifier: NoteVerifier, trusted: Sequence[Trusted] = ()
) -> Report:
    """Verify the whole log in the store: every leaf against the bytes stored with it and the
    hash recorded at append time, the tree against every signed checkpoint and every
    ``trusted`` one (held outside the store), the head's size."""
    notes = [row.note.encode() for row in session.scalars(select(CheckpointRow))]
    head = AuditLog.size(session)
    conn = session.connection()
    # NOTE: two plain ordered scans through the driver: a join, or ORM rows, cost more than
    # hashing and the tree together (see docs/performance.md).
    events = conn.exec_driver_sql("SELECT idx, body FROM events ORDER BY idx")
    leaves = conn.exec_driver_sql("SELECT idx, hash FROM tree_nodes WHERE level = 0 ORDER BY idx")
    return verify_log(
        _with_recorded(events, leaves), notes, verifier, head_size=head, trusted=trusted
    )


def _with_recorded(
    events: Iterable[Any], leaves: Iterable[Any]
) -> Iterator[tuple[int, bytes, bytes | None]]:
    """Pair each event with the leaf hash recorded for its index (None where there is none)."""
    recorded = iter(leaves)
    pending = next(recorded, None)
    for idx, body in events:
        while pending is not None and pending[0] < idx:
            pending = next(recorded, None)
        digest = bytes(pending[1]) if pending is not None and pending[0] == idx else None
        yield idx, bytes(body), digest
