"""What whoever can write a stopped broker's database (and nothing else) can do to it (issue 13).

Plain sqlite3 on the data dir's ``broker.db``, never the broker's own store code: delete every
checkpoint, rewrite event bodies, and recompute ``tree_nodes`` so that the tree matches the new
bodies (RFC 6962 is public; the attacker has the same maths). The data dir's other files (log
key, anchor) are left alone, as a database writer cannot reach them.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

from broker.audit.merkle import Frontier, leaf_hash

Edit = Callable[[dict[str, Any]], None]


def _canonical(event: dict[str, Any]) -> bytes:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def connect(data_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(data_dir / "broker.db")


def rewrite_history(data_dir: Path, edits: Mapping[int, Edit]) -> None:
    """``DELETE FROM checkpoints``, apply ``edits`` (index → change of the parsed event) to the
    event bodies, and recompute every tree node from the bodies."""
    with closing(connect(data_dir)) as db, db:
        db.execute("DELETE FROM checkpoints")
        for idx, edit in edits.items():
            (body,) = db.execute("SELECT body FROM events WHERE idx = ?", (idx,)).fetchone()
            event = json.loads(body)
            edit(event)
            db.execute("UPDATE events SET body = ? WHERE idx = ?", (_canonical(event), idx))
        db.execute("DELETE FROM tree_nodes")
        frontier = Frontier()
        for (body,) in db.execute("SELECT body FROM events ORDER BY idx").fetchall():
            db.executemany(
                "INSERT INTO tree_nodes (level, idx, hash) VALUES (?, ?, ?)",
                frontier.append(leaf_hash(body)),
            )


def event_index(data_dir: Path, type_: str, grant_id: str | None = None) -> int:
    """The index of the first event of ``type_`` (for ``grant_id`` if given)."""
    query = "SELECT idx FROM events WHERE type = ?" + (" AND grant_id = ?" if grant_id else "")
    params = (type_, grant_id) if grant_id else (type_,)
    with closing(connect(data_dir)) as db:
        row = db.execute(query + " ORDER BY idx", params).fetchone()
    assert row is not None, f"no {type_} event"
    return int(row[0])


def reactivate(data_dir: Path, grant_id: str) -> None:
    """Turn a revoked grant back to active in the ``grants`` table."""
    with closing(connect(data_dir)) as db, db:
        done = db.execute(
            "UPDATE grants SET status = 'active', revoked_at = NULL, revoked_by = NULL, "
            "revoke_reason = NULL WHERE id = ?",
            (grant_id,),
        )
        assert done.rowcount == 1


def execute(data_dir: Path, sql: str, *params: Any) -> int:
    """Any other statement a database writer might run; returns the rows it changed."""
    with closing(connect(data_dir)) as db, db:
        return db.execute(sql, params).rowcount
