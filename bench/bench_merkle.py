"""Benchmark: recompute the Merkle root of N log entries (leaf hashing + frontier).

This is the work of verifying an exported audit log offline; the goal is 1,000,000 entries in
under 10 s (>= 100,000 entries/s). Also times incremental appends through ``Frontier`` (what the
log does per event) and proof generation/verification at the final size.

    python bench/bench_merkle.py --entries 1000000
"""

from __future__ import annotations

import argparse
import gc
import os
import time

from broker.audit.merkle import (
    Frontier,
    MemoryHashReader,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)

GOAL_PER_SECOND = 100_000


def make_entries(count: int, size: int) -> list[bytes]:
    """Distinct entries of ``size`` bytes, roughly the size of one audit event."""
    filler = os.urandom(size)
    return [i.to_bytes(8, "big") + filler[8:] for i in range(count)]


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:>12,.0f}/s  ({seconds:.3f} s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--entry-size", type=int, default=256, help="bytes per entry")
    parser.add_argument("--proofs", type=int, default=1_000, help="proofs to time")
    args = parser.parse_args()
    entries = make_entries(args.entries, args.entry_size)
    gc.freeze()  # the inputs live for the whole run: keep the collector from rescanning them
    print(f"{args.entries:,} entries of {args.entry_size} bytes")

    start = time.perf_counter()
    root = root_from_leaves(entries)
    root_seconds = time.perf_counter() - start
    print(f"root recompute (leaf hash + frontier): {rate(args.entries, root_seconds)}")

    start = time.perf_counter()
    frontier = Frontier()
    for entry in entries:
        frontier.append(leaf_hash(entry))
    append_seconds = time.perf_counter() - start
    assert frontier.root() == root
    print(f"Frontier.append (per-event path):      {rate(args.entries, append_seconds)}")

    reader = MemoryHashReader(leaf_hash(entry) for entry in entries)
    size = args.entries
    indexes = [(i * 7919) % size for i in range(args.proofs)]
    start = time.perf_counter()
    proofs = [inclusion_proof(i, size, reader) for i in indexes]
    for i, proof in zip(indexes, proofs, strict=True):
        assert verify_inclusion(leaf_hash(entries[i]), i, size, proof, root)
    print(
        f"inclusion proof + verify:              {rate(args.proofs, time.perf_counter() - start)}"
    )
    old = max(1, size // 3)
    old_root = root_from_leaves(entries[:old])
    start = time.perf_counter()
    for _ in range(args.proofs):
        assert verify_consistency(old, size, old_root, root, consistency_proof(old, size, reader))
    print(
        f"consistency proof + verify:            {rate(args.proofs, time.perf_counter() - start)}"
    )

    per_second = args.entries / root_seconds
    verdict = "meets" if per_second >= GOAL_PER_SECOND else "MISSES"
    print(f"root {root.hex()}")
    print(f"{verdict} the goal of {GOAL_PER_SECOND:,} entries/s for root recompute")
    return 0 if per_second >= GOAL_PER_SECOND else 1


if __name__ == "__main__":
    raise SystemExit(main())
