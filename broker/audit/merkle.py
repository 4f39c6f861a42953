"""RFC 6962 / RFC 9162 Merkle tree maths for the audit log: pure functions, no I/O.

The tree over ``n`` leaves is the RFC 6962 §2.1 Merkle Tree Hash (MTH). Every node of that tree
is either a *perfect* subtree (``2**level`` leaves starting at leaf ``index * 2**level``) or the
partial right edge, whose hash is the right fold of the perfect subtrees it decomposes into.
So a store only ever keeps perfect-subtree hashes (see :class:`HashReader`), and:

* appending a leaf costs O(log n) hashes (:class:`Frontier`, a compact range of the right edge);
* inclusion and consistency proofs read O(log n) stored hashes;
* verification follows the RFC 9162 §2.1.3.2 and §2.1.4.2 algorithms literally.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from hashlib import sha256
from typing import Protocol

HASH_SIZE = 32
"""Length in bytes of every hash in the tree (SHA-256)."""

EMPTY_ROOT = sha256(b"").digest()
"""MTH({}) of the empty tree (RFC 6962 §2.1)."""

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """Return the RFC 6962 leaf hash ``SHA-256(0x00 || data)`` of one log entry."""
    return sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 6962 interior node hash ``SHA-256(0x01 || left || right)``."""
    return sha256(_NODE_PREFIX + left + right).digest()


class HashReader(Protocol):
    """Read access to stored perfect-subtree hashes.

    ``get_node(level, index)`` returns the hash of the perfect subtree of ``2**level`` leaves
    starting at leaf ``index * 2**level`` (level 0 holds the leaf hashes). Implementations raise
    ``LookupError`` for a node they do not hold (for instance one not yet complete).
    """

    def get_node(self, level: int, index: int) -> bytes: ...


class MemoryHashReader:
    """A :class:`HashReader` holding every perfect-subtree hash of a list of leaf hashes.

    Built in O(n) hashes; meant for tests and for verifying an exported log offline.
    """

    def __init__(self, leaf_hashes: Iterable[bytes]) -> None:
        """Store ``leaf_hashes`` and every perfect subtree above them.

        Raises ``ValueError`` if a leaf hash is not 32 bytes.
        """
        level = [_checked_hash(h, "leaf hash") for h in leaf_hashes]
        self._levels: list[list[bytes]] = [level]
        while len(level) > 1:
            level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            self._levels.append(level)

    @property
    def size(self) -> int:
        """Number of leaves."""
        return len(self._levels[0])

    def get_node(self, level: int, index: int) -> bytes:
        """Return the stored hash of perfect subtree ``(level, index)``.

        Raises ``LookupError`` if the tree holds no complete subtree at that position.
        """
        if 0 <= level < len(self._levels) and 0 <= index < len(self._levels[level]):
            return self._levels[level][index]
        raise LookupError(f"no complete subtree at level {level}, index {index}")


class Frontier:
    """The right frontier (compact range ``[0, size)``) of an append-only Merkle tree.

    It holds one hash per set bit of ``size``: the roots of the perfect subtrees the tree
    decomposes into, largest (leftmost) first. That is all that is needed to append in O(log n)
    and to compute the current root, so a log never rehashes its history.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        """Create the frontier of the empty tree."""
        self._size = 0
        self._hashes: list[bytes] = []

    @classmethod
    def from_hashes(cls, size: int, hashes: Sequence[bytes]) -> Frontier:
        """Restore a frontier saved as ``(size, hashes)`` (see :attr:`hashes`).

        Raises ``ValueError`` if ``size`` is negative, the number of hashes is not the number of
        set bits of ``size``, or a hash is not 32 bytes.
        """
        if size < 0:
            raise ValueError(f"tree size must be >= 0, got {size}")
        if len(hashes) != size.bit_count():
            raise ValueError(
                f"a frontier of size {size} has {size.bit_count()} hashes, got {len(hashes)}"
            )
        frontier = cls()
        frontier._size = size
        frontier._hashes = [_checked_hash(h, "frontier hash") for h in hashes]
        return frontier

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    @property
    def hashes(self) -> list[bytes]:
        """A copy of the perfect-subtree roots, largest first: the serialised form."""
        return list(self._hashes)

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Append one leaf hash and return the perfect subtrees it completes.

        The result is a list of ``(level, index, hash)``, starting with the leaf itself at
        ``(0, old_size)``; a store persists them so that :func:`inclusion_proof` and
        :func:`consistency_proof` can read them later. Costs at most ``log2(size) + 1`` hashes.
        Raises ``ValueError`` if ``leaf`` is not 32 bytes.
        """
        current = _checked_hash(leaf, "leaf hash")
        index = self._size
        level = 0
        completed = [(0, index, current)]
        # Each trailing 1 bit of the old size is a same-sized left sibling waiting in the frontier.
        while index & 1:
            current = node_hash(self._hashes.pop(), current)
            index >>= 1
            level += 1
            completed.append((level, index, current))
        self._hashes.append(current)
        self._size += 1
        return completed

    def root(self) -> bytes:
        """Return the root hash MTH of the tree, ``EMPTY_ROOT`` when empty."""
        return _fold_right(self._hashes)


def root_of_leaf_hashes(leaf_hashes: Iterable[bytes]) -> bytes:
    """Return the root of the tree whose leaf hashes are ``leaf_hashes``, in one streaming pass.

    Uses O(log n) memory and one node hash per leaf on average.
    Raises ``ValueError`` if a leaf hash is not 32 bytes.
    """
    stack: list[bytes] = []
    for index, leaf in enumerate(leaf_hashes):
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"leaf hash {index}: expected {HASH_SIZE} bytes, got {len(leaf)}")
        # NOTE: the frontier update is inlined (rather than Frontier.append) because this is the
        # hot loop of verifying a whole exported log.
        current = leaf
        pending = index
        while pending & 1:
            current = sha256(_NODE_PREFIX + stack.pop() + current).digest()
            pending >>= 1
        stack.append(current)
    return _fold_right(stack)


def root_from_leaves(leaves: Iterable[bytes]) -> bytes:
    """Return the root MTH of the tree over the raw entries ``leaves`` (hashing each as a leaf)."""
    return root_of_leaf_hashes(sha256(_LEAF_PREFIX + data).digest() for data in leaves)


def inclusion_proof(index: int, size: int, reader: HashReader) -> list[bytes]:
    """Return the RFC 9162 §2.1.3.1 inclusion proof of leaf ``index`` in the tree of ``size``.

    Reads at most ``2 * log2(size)`` stored hashes. Raises ``ValueError`` unless
    ``0 <= index < size``; ``LookupError`` from ``reader`` propagates.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is outside the tree of size {size}")
    return _path(0, index, size, reader)


def consistency_proof(old_size: int, new_size: int, reader: HashReader) -> list[bytes]:
    """Return the RFC 9162 §2.1.4.1 consistency proof from tree ``old_size`` to ``new_size``.

    The proof is empty when the sizes are equal. Reads O(log n) stored hashes.
    Raises ``ValueError`` unless ``0 < old_size <= new_size`` (no proof is meaningful from the
    empty tree); ``LookupError`` from ``reader`` propagates.
    """
    if not 0 < old_size <= new_size:
        raise ValueError(f"need 0 < old size <= new size, got {old_size} and {new_size}")
    if old_size == new_size:
        return []
    # The largest perfect subtree ending at old_size; the proof is its inclusion path in the new
    # tree, preceded by the subtree's own hash unless it is the whole old tree (the verifier
    # already knows that one: it is the old root).
    level = (old_size & -old_size).bit_length() - 1
    index = (old_size - 1) >> level
    path = _path(level, index, new_size, reader)
    if index == 0:
        return path
    return [reader.get_node(level, index), *path]


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Check an inclusion proof with the RFC 9162 §2.1.3.2 algorithm.

    Returns ``True`` only if ``proof`` proves that ``leaf`` (a leaf hash) is entry ``index`` of
    the tree of ``size`` whose root is ``root``. Never raises on bad input: returns ``False``.
    NOTE: the proof binds ``leaf`` to the pair ``(size, root)``; take both from one verified
    checkpoint, never a root from one source and a size from another.
    """
    if not 0 <= index < size or not _all_hashes(leaf, root, *proof):
        return False
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Check a consistency proof with the RFC 9162 §2.1.4.2 algorithm.

    Returns ``True`` only if ``proof`` proves that the tree of ``new_size`` with ``new_root``
    extends the tree of ``old_size`` with ``old_root``. Equal sizes need an empty proof and
    equal roots; ``old_size == 0`` is always rejected (a proof from the empty tree proves
    nothing). Never raises on bad input: returns ``False``.
    NOTE: as for :func:`verify_inclusion`, each size must come with its own root from a verified
    checkpoint.
    """
    if not 0 < old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if not proof or not _all_hashes(old_root, new_root, *proof):
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


def _path(level: int, index: int, size: int, reader: HashReader) -> list[bytes]:
    """Sibling hashes from node ``(level, index)`` up to the root of the tree of ``size``.

    A sibling that lies wholly beyond ``size`` does not exist (the node is promoted unchanged,
    as in RFC 6962's unbalanced tree); a sibling cut by ``size`` is the partial right edge.
    """
    proof: list[bytes] = []
    while (size - 1) >> level:
        sibling_start = (index ^ 1) << level
        if sibling_start < size:
            sibling_end = min(sibling_start + (1 << level), size)
            proof.append(_range_hash(sibling_start, sibling_end, reader))
        index >>= 1
        level += 1
    return proof


def _range_hash(start: int, end: int, reader: HashReader) -> bytes:
    """MTH of leaves ``[start, end)``, a subtree of the RFC 6962 tree, from perfect subtrees.

    ``start`` is aligned to the subtree's width, so the range splits by the bits of its length
    into at most log2(n) perfect subtrees, largest first.
    """
    hashes = []
    width = end - start
    for level in range(width.bit_length() - 1, -1, -1):
        if width >> level & 1:
            hashes.append(reader.get_node(level, start >> level))
            start += 1 << level
    return _fold_right(hashes)


def _fold_right(hashes: Sequence[bytes]) -> bytes:
    """Combine perfect-subtree roots (largest first) into the root of their concatenation."""
    if not hashes:
        return EMPTY_ROOT
    current = hashes[-1]
    for left in reversed(hashes[:-1]):
        current = sha256(_NODE_PREFIX + left + current).digest()
    return current


def _checked_hash(value: bytes, what: str) -> bytes:
    if len(value) != HASH_SIZE:
        raise ValueError(f"{what}: expected {HASH_SIZE} bytes, got {len(value)}")
    return bytes(value)


def _all_hashes(*values: bytes) -> bool:
    return all(len(v) == HASH_SIZE for v in values)
