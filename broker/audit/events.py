"""Audit events: canonical bytes, appended with a dense index in the caller's transaction.

Each event's ``body`` is the canonical JSON that the tamper-evident log hashes as a Merkle leaf
(RFC 6962 ``leaf = SHA-256(0x00 ‖ body)``), so it is written once and never re-encoded.
NOTE: an event never holds a token or a credential, only its ``jti``, issuer and subject.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from broker.store.tables import EventRow, LogHeadRow

EVENT_VERSION = 1
MAX_EVENT_BYTES = 64 * 1024


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: sorted keys, no spaces, UTF-8."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def rfc3339(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def append_event(
    session: Session,
    type_: str,
    at: dt.datetime,
    data: dict[str, Any],
    *,
    grant_id: str | None = None,
) -> int:
    """Append one event in ``session``'s transaction and return its index.

    The index comes from incrementing the single ``log_head`` row, which serialises appenders and
    keeps indexes dense even when a transaction rolls back (a sequence would leave gaps).
    Raises ValueError when the encoded event exceeds MAX_EVENT_BYTES.
    """
    body = canonical_json(
        {"v": EVENT_VERSION, "type": type_, "at": rfc3339(at), "grant_id": grant_id, **data}
    )
    if len(body) > MAX_EVENT_BYTES:
        raise ValueError(f"event {type_} is {len(body)} bytes; the limit is {MAX_EVENT_BYTES}")
    size = session.execute(
        update(LogHeadRow)
        .where(LogHeadRow.id == 1)
        .values(size=LogHeadRow.size + 1)
        .returning(LogHeadRow.size)
    ).scalar_one()
    idx = size - 1
    session.add(EventRow(idx=idx, type=type_, at=at, grant_id=grant_id, body=body))
    return idx
