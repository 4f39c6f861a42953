"""broker/audit/merkle.py at an edge mutmut found untested (docs/testing.md): the saved frontier
of an empty log (what the store and an export from index 0 restore) restores, and grows."""

from __future__ import annotations

import pytest

from broker.audit.merkle import EMPTY_ROOT, Frontier, leaf_hash, root_from_leaves


def test_the_frontier_of_an_empty_log_restores() -> None:
    frontier = Frontier.from_hashes(0, [])
    assert (frontier.size, frontier.root(), frontier.hashes) == (0, EMPTY_ROOT, [])
    frontier.append(leaf_hash(b"first"))
    assert frontier.root() == root_from_leaves([b"first"])
    with pytest.raises(ValueError, match="tree size must be >= 0"):
        Frontier.from_hashes(-1, [])
