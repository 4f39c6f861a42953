"""RFC 6962 Merkle maths against published vectors and a brute-force RFC 6962 §2.1 reference."""

from __future__ import annotations

import base64
import json
import os
import random
from collections.abc import Iterator
from functools import cache
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest

from broker.audit.merkle import (
    EMPTY_ROOT,
    Frontier,
    MemoryHashReader,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_leaves,
    root_of_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)
from tests.servers import Part, require, unavailable

MAX_SIZE = 300
ALL_PAIRS_UP_TO = 130

# The leaves of the RFC 6962 test tree used by transparency-dev/merkle (and its vectors).
RFC_LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
RFC_ROOT_8 = "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"

# --- brute force, straight from RFC 6962 §2.1 (its own hashing, no code under test) -------------

DATA = [f"entry {i}".encode() for i in range(MAX_SIZE)]


def _k(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


@cache
def mth(start: int, end: int) -> bytes:
    """MTH(D[start:end])."""
    n = end - start
    if n == 0:
        return sha256(b"").digest()
    if n == 1:
        return sha256(b"\x00" + DATA[start]).digest()
    k = _k(n)
    return sha256(b"\x01" + mth(start, start + k) + mth(start + k, end)).digest()


def path(m: int, start: int, end: int) -> list[bytes]:
    """PATH(m, D[start:end]) with m relative to start."""
    n = end - start
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*path(m, start, start + k), mth(start + k, end)]
    return [*path(m - k, start + k, end), mth(start, start + k)]


def subproof(m: int, start: int, end: int, b: bool) -> list[bytes]:
    """SUBPROOF(m, D[start:end], b)."""
    n = end - start
    if m == n:
        return [] if b else [mth(start, end)]
    k = _k(n)
    if m <= k:
        return [*subproof(m, start, start + k, b), mth(start + k, end)]
    return [*subproof(m - k, start + k, end, False), mth(start, start + k)]


def brute_consistency(m: int, n: int) -> list[bytes]:
    return subproof(m, 0, n, True)


# --- helpers --------------------------------------------------------------------------------------


class CountingReader:
    """Wraps a reader, counts reads and checks each node lies inside the tree being proven."""

    def __init__(self, inner: MemoryHashReader, size: int) -> None:
        self.inner = inner
        self.size = size
        self.reads = 0

    def get_node(self, level: int, index: int) -> bytes:
        assert (index + 1) << level <= self.size, f"node ({level}, {index}) beyond {self.size}"
        self.reads += 1
        return self.inner.get_node(level, index)


@pytest.fixture(scope="module")
def reader() -> MemoryHashReader:
    return MemoryHashReader(leaf_hash(d) for d in DATA)


def tampered_inclusion(proof: list[bytes]) -> Iterator[list[bytes]]:
    for i in range(len(proof)):
        flipped = bytearray(proof[i])
        flipped[i % 32] ^= 0x01
        yield [*proof[:i], bytes(flipped), *proof[i + 1 :]]
    if proof:
        yield proof[:-1]
        yield proof[1:]
    yield [*proof, proof[-1] if proof else EMPTY_ROOT]
    yield [EMPTY_ROOT, *proof]


# --- hashing and the frontier ---------------------------------------------------------------------


def test_hashes_have_rfc_domain_separation() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert leaf_hash(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    assert node_hash(b"a" * 32, b"b" * 32) == sha256(b"\x01" + b"a" * 32 + b"b" * 32).digest()


def test_rfc_test_tree_root() -> None:
    assert root_from_leaves(RFC_LEAVES).hex() == RFC_ROOT_8
    assert root_from_leaves([]) == EMPTY_ROOT


def test_frontier_root_matches_brute_force_for_every_size() -> None:
    frontier = Frontier()
    assert frontier.root() == EMPTY_ROOT == mth(0, 0)
    for n in range(1, MAX_SIZE + 1):
        frontier.append(leaf_hash(DATA[n - 1]))
        assert frontier.size == n
        assert frontier.root() == mth(0, n), n
        assert len(frontier.hashes) == n.bit_count()


def test_frontier_append_returns_completed_subtrees(reader: MemoryHashReader) -> None:
    frontier = Frontier()
    seen: dict[tuple[int, int], bytes] = {}
    for n in range(MAX_SIZE):
        completed = frontier.append(leaf_hash(DATA[n]))
        assert completed[0] == (0, n, leaf_hash(DATA[n]))
        # One leaf plus one node per trailing 1 bit of the old size: O(log n).
        assert len(completed) == 1 + (~n & (n + 1)).bit_length() - 1
        for level, index, value in completed:
            assert (level, index) not in seen
            assert (
                value == reader.get_node(level, index) == mth(index << level, (index + 1) << level)
            )
            seen[level, index] = value
    # Every perfect subtree of the final tree was reported exactly once.
    assert len(seen) == sum(MAX_SIZE >> level for level in range(MAX_SIZE.bit_length()))


def test_frontier_round_trips_through_hashes() -> None:
    frontier = Frontier()
    for n in range(1, 40):
        frontier.append(leaf_hash(DATA[n - 1]))
        restored = Frontier.from_hashes(frontier.size, frontier.hashes)
        assert restored.root() == frontier.root()
        restored.append(leaf_hash(b"next"))
        frontier_copy = Frontier.from_hashes(frontier.size, frontier.hashes)
        frontier_copy.append(leaf_hash(b"next"))
        assert restored.root() == frontier_copy.root()


@pytest.mark.parametrize(
    ("size", "hashes"),
    [(-1, []), (3, [EMPTY_ROOT]), (2, [EMPTY_ROOT, EMPTY_ROOT]), (1, [b"short"])],
)
def test_frontier_rejects_inconsistent_state(size: int, hashes: list[bytes]) -> None:
    with pytest.raises(ValueError, match=r"frontier|size"):
        Frontier.from_hashes(size, hashes)


def test_frontier_rejects_wrong_length_leaf() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Frontier().append(b"\x00" * 31)


def test_streaming_root_matches_brute_force() -> None:
    for n in range(MAX_SIZE + 1):
        assert root_of_leaf_hashes(leaf_hash(d) for d in DATA[:n]) == mth(0, n)
    assert root_from_leaves(DATA) == mth(0, MAX_SIZE)


def test_streaming_root_rejects_wrong_length_leaf() -> None:
    with pytest.raises(ValueError, match="leaf hash 1"):
        root_of_leaf_hashes([EMPTY_ROOT, b"x"])


def test_memory_reader_refuses_incomplete_nodes(reader: MemoryHashReader) -> None:
    assert reader.size == MAX_SIZE
    with pytest.raises(LookupError):
        reader.get_node(0, MAX_SIZE)
    with pytest.raises(LookupError):
        reader.get_node(2, MAX_SIZE // 4)  # covers leaves 300..303
    with pytest.raises(LookupError):
        reader.get_node(-1, 0)


# --- proofs against the brute force ---------------------------------------------------------------


def test_inclusion_proofs_match_brute_force(reader: MemoryHashReader) -> None:
    for n in range(1, MAX_SIZE + 1):
        root = mth(0, n)
        for m in range(n):
            counting = CountingReader(reader, n)
            proof = inclusion_proof(m, n, counting)
            assert proof == path(m, 0, n), (m, n)
            assert counting.reads <= 2 * n.bit_length()
            assert verify_inclusion(leaf_hash(DATA[m]), m, n, proof, root)


def test_consistency_proofs_match_brute_force(reader: MemoryHashReader) -> None:
    pairs = [(m, n) for n in range(1, ALL_PAIRS_UP_TO + 1) for m in range(1, n + 1)]
    sample = random.Random(6962)
    pairs += [
        (sample.randint(1, n), n)
        for n in range(ALL_PAIRS_UP_TO + 1, MAX_SIZE + 1)
        for _ in range(8)
    ]
    pairs += [(n, MAX_SIZE) for n in (1, 2, 64, 128, 255, 256, 257, 299, 300)]
    for m, n in pairs:
        counting = CountingReader(reader, n)
        proof = consistency_proof(m, n, counting)
        assert proof == brute_consistency(m, n), (m, n)
        assert counting.reads <= 2 * n.bit_length() + 1
        assert verify_consistency(m, n, mth(0, m), mth(0, n), proof), (m, n)


def test_proof_arguments_are_checked(reader: MemoryHashReader) -> None:
    for index, size in [(0, 0), (5, 5), (-1, 3)]:
        with pytest.raises(ValueError, match="outside the tree"):
            inclusion_proof(index, size, reader)
    for old, new in [(0, 0), (0, 5), (6, 5), (-1, 2)]:
        with pytest.raises(ValueError, match="old size"):
            consistency_proof(old, new, reader)
    with pytest.raises(LookupError):
        inclusion_proof(0, MAX_SIZE + 1, reader)


# --- verification rejects tampering ---------------------------------------------------------------


def test_tampered_inclusion_proofs_are_rejected(reader: MemoryHashReader) -> None:
    sizes = [*range(1, 65), 127, 128, 129, 255, 256, 257, MAX_SIZE]
    for n in sizes:
        root = mth(0, n)
        for m in range(n):
            leaf = leaf_hash(DATA[m])
            proof = inclusion_proof(m, n, reader)
            for bad in tampered_inclusion(proof):
                assert not verify_inclusion(leaf, m, n, bad, root), (m, n, bad)
            for other in {m - 1, m + 1, m ^ 1, m ^ 2, n}:
                assert not verify_inclusion(leaf, other, n, proof, root), (m, n, other)
            for other_size in {n - 1, n + 1, 2 * n, n // 2}:
                # Claimed against the genuine root of that size, it fails unless the proof
                # happens to be the genuine proof for that size too.
                if m < other_size <= MAX_SIZE:
                    genuine = inclusion_proof(m, other_size, reader) == proof
                    ok = verify_inclusion(leaf, m, other_size, proof, mth(0, other_size))
                    assert ok is genuine, (m, n, other_size)
            assert not verify_inclusion(leaf_hash(b"forged"), m, n, proof, root)
            assert not verify_inclusion(leaf, m, n, proof, mth(0, n - 1))


def test_tampered_consistency_proofs_are_rejected(reader: MemoryHashReader) -> None:
    pairs = [(m, n) for n in range(1, 70) for m in range(1, n)]
    pairs += [(m, 300) for m in (1, 99, 128, 200, 256, 299)]
    for m, n in pairs:
        old_root, new_root = mth(0, m), mth(0, n)
        proof = consistency_proof(m, n, reader)
        for bad in tampered_inclusion(proof):
            assert not verify_consistency(m, n, old_root, new_root, bad), (m, n, bad)
        assert not verify_consistency(m, n, old_root, new_root, [])
        assert not verify_consistency(m, n, new_root, old_root, proof)
        assert not verify_consistency(m, n, old_root, mth(0, n - 1), proof)
        assert not verify_consistency(m, n, mth(0, m - 1), new_root, proof)
        assert not verify_consistency(n, m, new_root, old_root, proof)
        for other_m, other_n in {(m - 1, n), (m + 1, n), (m, n + 1), (m, n - 1)}:
            if 0 < other_m < other_n <= MAX_SIZE:
                genuine = consistency_proof(other_m, other_n, reader) == proof
                ok = verify_consistency(other_m, other_n, mth(0, other_m), mth(0, other_n), proof)
                assert ok is genuine, (m, n, other_m, other_n)


def test_consistency_of_equal_and_empty_trees() -> None:
    root = mth(0, 5)
    assert verify_consistency(5, 5, root, root, [])
    assert not verify_consistency(5, 5, root, root, [root])
    assert not verify_consistency(5, 5, root, mth(0, 4), [])
    assert not verify_consistency(0, 5, EMPTY_ROOT, root, [])
    assert not verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])


# --- transparency-dev/merkle vectors --------------------------------------------------------------


def _vectors_dir() -> Path:
    shared = os.environ.get("BROKER_SHARED_DIR")
    base = Path(shared) if shared else Path(__file__).resolve().parents[3] / "shared"
    return base / "testdata" / "rfc6962-proofs"


VECTORS = _vectors_dir()
VECTORS_MISSING = f"RFC 6962 proof vectors not found at {VECTORS} (set BROKER_SHARED_DIR)"


def _load(kind: str) -> list[Any]:
    if not VECTORS.is_dir():
        return [pytest.param(None, id=f"{kind}-absent")]
    files = sorted((VECTORS / kind).rglob("*.json"))
    return [
        pytest.param(json.loads(f.read_text()), id=str(f.relative_to(VECTORS / kind)))
        for f in files
    ]


def _b64(value: str) -> bytes:
    return base64.b64decode(value)


def _b64_list(values: list[str] | None) -> list[bytes]:
    return [_b64(v) for v in values or []]


@pytest.mark.parametrize("case", _load("inclusion"))
def test_inclusion_vector(case: dict[str, Any] | None) -> None:
    if case is None:
        unavailable(Part.RFC6962_VECTORS, VECTORS_MISSING)
    ok = verify_inclusion(
        _b64(case["leafHash"]),
        case["leafIdx"],
        case["treeSize"],
        _b64_list(case["proof"]),
        _b64(case["root"]),
    )
    assert ok is not case["wantErr"], case["desc"]


@pytest.mark.parametrize("case", _load("consistency"))
def test_consistency_vector(case: dict[str, Any] | None) -> None:
    if case is None:
        unavailable(Part.RFC6962_VECTORS, VECTORS_MISSING)
    ok = verify_consistency(
        case["size1"],
        case["size2"],
        _b64(case["root1"]),
        _b64(case["root2"]),
        _b64_list(case["proof"]),
    )
    assert ok is not case["wantErr"], case["desc"]


def test_vector_happy_paths_are_what_we_generate() -> None:
    require(Part.RFC6962_VECTORS, None if VECTORS.is_dir() else VECTORS_MISSING)
    rfc_reader = MemoryHashReader(leaf_hash(d) for d in RFC_LEAVES)
    inclusion = sorted(VECTORS.glob("inclusion/*/happy-path.json"))
    consistency = sorted(VECTORS.glob("consistency/*/happy-path.json"))
    assert inclusion and consistency
    for file in inclusion:
        case = json.loads(file.read_text())
        index, size = case["leafIdx"], case["treeSize"]
        assert _b64(case["leafHash"]) == leaf_hash(RFC_LEAVES[index])
        assert _b64(case["root"]) == root_from_leaves(RFC_LEAVES[:size])
        assert inclusion_proof(index, size, rfc_reader) == _b64_list(case["proof"]), file
    for file in consistency:
        case = json.loads(file.read_text())
        old, new = case["size1"], case["size2"]
        assert _b64(case["root1"]) == root_from_leaves(RFC_LEAVES[:old])
        assert consistency_proof(old, new, rfc_reader) == _b64_list(case["proof"]), file
