"""What the Merkle log costs an exchange (issue 3): the same in-process exchanges with the full
audit log, and with the log's Merkle part (leaf hashing, frontier, tree nodes) switched off in
this process only. Events are recorded in both; only the tree differs.

    .venv/bin/python bench/bench_log_overhead.py --exchanges 3000 --threads 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

import broker.audit.log as audit_log
from broker.audit.merkle import Frontier
from broker.grants.service import ExchangeRequest
from broker.runtime import build_broker
from broker.settings import EXAMPLE_POLICY, Settings

EVAL_SUB = "repo:acme/evals:ref:refs/heads/main"
WORKFLOW = "acme/workflows/.github/workflows/eval.yml@refs/heads/main"


class _NoTree(Frontier):
    """A frontier that hashes nothing and completes no nodes (bench only)."""

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        return []


def without_merkle() -> None:
    audit_log.AuditLog._frontier_for = lambda self, *a, **k: _NoTree()  # type: ignore[method-assign]
    audit_log._INSERT_NODES = text("SELECT 1")  # type: ignore[attr-defined]
    audit_log.leaf_hash = lambda data: b""  # type: ignore[assignment]


def run(exchanges: int, threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        broker = build_broker(Settings(dev=True, data_dir=Path(tmp), policy=EXAMPLE_POLICY))
        assert broker.dev_issuer is not None
        tokens = [
            broker.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": WORKFLOW})
            for _ in range(exchanges)
        ]
        chunks = [tokens[i::threads] for i in range(threads)]
        errors: list[Any] = []

        def worker(mine: list[str]) -> None:
            for token in mine:
                try:
                    broker.grants.exchange(
                        ExchangeRequest(
                            token, "llama-7b", "evaluate", "urn:ietf:params:oauth:token-type:jwt"
                        )
                    )
                except Exception as exc:
                    errors.append(exc)

        pool = [threading.Thread(target=worker, args=(c,)) for c in chunks]
        started = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        elapsed = time.perf_counter() - started
        broker.close()
    if errors:
        raise SystemExit(f"{len(errors)} exchanges failed: {errors[0]!r}")
    return exchanges / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--without-merkle", action="store_true", help="(run by this script)")
    args = parser.parse_args()
    if args.without_merkle:
        without_merkle()
    rate = run(args.exchanges, args.threads)
    label = "events without the Merkle tree" if args.without_merkle else "full audit log"
    print(f"{label}: {rate:,.0f} exchanges/s in-process ({args.threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
