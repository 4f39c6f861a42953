"""How fast does `broker audit verify` check a large log? (issue 3: 1,000,000 entries < 10 s)

Builds a SQLite store of N realistic exchange events (bulk-inserted with their tree nodes, their
grants and a signed checkpoint, as the broker would have written them), then times
`verify_store` over it (the log) and `verify_state` (the tables held against the log, issue 13).

    .venv/bin/python bench/bench_audit_verify.py --entries 1000000
"""

from __future__ import annotations

import argparse
import datetime as dt
import resource
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert

from broker.audit.checkpoint import Checkpoint, NoteVerifier
from broker.audit.export import verify_store
from broker.audit.log import AuditLog, canonical_json
from broker.audit.merkle import Frontier, leaf_hash
from broker.audit.state import verify_state
from broker.keys.kek import kek_for
from broker.keys.store import KeyStore
from broker.store.db import Store, sqlite_url
from broker.store.tables import CheckpointRow, EventRow, GrantRow, LogHeadRow, TreeNodeRow

BATCH = 20_000
AT = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)
CLAIMS = {"job_workflow_ref": "acme/workflows/.github/workflows/eval.yml@refs/heads/main"}


def event(idx: int) -> bytes:
    return canonical_json(
        {
            "v": 1,
            "idx": idx,
            "type": "exchange.allowed",
            "at": "2026-11-25T00:00:00.000Z",
            "grant_id": f"g_{idx:024x}",
            "identity": {
                "issuer": "github",
                "issuer_url": "https://token.actions.githubusercontent.com",
                "subject": "repo:acme/evals:ref:refs/heads/main",
                "jti": f"{idx:032x}",
            },
            "model": "llama-7b",
            "action": "evaluate",
            "tier": "low",
            "backend": "jwt",
            "rule": "nightly-eval",
            "policy_digest": "sha256:" + "ab" * 32,
            "claims": CLAIMS,
            "audience": "model:llama-7b",
            "expires_at": "2026-11-25T01:00:00.000Z",
            "token_hmac": "hmac-sha256:" + "cd" * 32,
        }
    )


def grant(idx: int) -> dict[str, object]:
    """The grants row of event ``idx``, as the broker writes it."""
    return {
        "id": f"g_{idx:024x}",
        "issuer": "github",
        "issuer_url": "https://token.actions.githubusercontent.com",
        "subject": "repo:acme/evals:ref:refs/heads/main",
        "identity_claims": CLAIMS,
        "subject_jti": f"{idx:032x}",
        "model": "llama-7b",
        "action": "evaluate",
        "tier": "low",
        "backend": "jwt",
        "rule": "nightly-eval",
        "policy_digest": "sha256:" + "ab" * 32,
        "audience": "model:llama-7b",
        "issued_at": AT,
        "expires_at": AT + dt.timedelta(hours=1),
        "status": "active",
    }


def build(store: Store, audit: AuditLog, n: int) -> None:
    frontier = Frontier()
    with store.write() as session:
        for start in range(0, n, BATCH):
            events, nodes, grants = [], [], []
            for idx in range(start, min(n, start + BATCH)):
                body = event(idx)
                events.append(
                    {
                        "idx": idx,
                        "type": "exchange.allowed",
                        "at": AT,
                        "grant_id": f"g_{idx:024x}",
                        "body": body,
                    }
                )
                grants.append(grant(idx))
                nodes += [
                    {"level": lv, "idx": i, "hash": h}
                    for lv, i, h in frontier.append(leaf_hash(body))
                ]
            session.execute(insert(EventRow), events)
            session.execute(insert(TreeNodeRow), nodes)
            session.execute(insert(GrantRow), grants)
        session.execute(LogHeadRow.__table__.update().values(size=n))
        note = audit.signer.sign(Checkpoint(audit.origin, n, frontier.root())).decode()
        session.add(CheckpointRow(size=n, root=frontier.root(), note=note, signed_at=AT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--dir", help="keep the store here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.dir or tmp)
        data.mkdir(parents=True, exist_ok=True)
        store = Store(sqlite_url(data), sqlite_synchronous="NORMAL")
        store.migrate()
        kek = kek_for(None, data_dir=data, database_url=store.url, dev=False)
        keys = KeyStore(store, kek)
        audit = AuditLog.from_store(keys, data_dir=data, default_origin="bench.example/audit")
        t0 = time.perf_counter()
        build(store, audit, args.entries)
        print(f"built {args.entries} entries in {time.perf_counter() - t0:.1f} s")
        verifier = NoteVerifier.from_vkey(audit.verifier_key())
        t0 = time.perf_counter()
        with store.read() as session:
            report = verify_store(session, verifier)
        elapsed = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rate = args.entries / elapsed
        print(
            f"verify_store: {args.entries} entries in {elapsed:.2f} s = {rate:,.0f} entries/s; "
            f"ok={report.ok}; peak RSS {rss:.0f} MB"
        )
        t0 = time.perf_counter()
        with store.read() as session:
            findings = verify_state(session.connection())
        elapsed = time.perf_counter() - t0
        store.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rate = args.entries / elapsed
    print(
        f"verify_state: {args.entries} events and grants in {elapsed:.2f} s = {rate:,.0f}/s; "
        f"findings={len(findings)}; peak RSS {rss:.0f} MB"
    )
    return 0 if report.ok and not findings else 1


if __name__ == "__main__":
    sys.exit(main())
