"""The tamper-evident audit log: RFC 6962 Merkle maths and signed C2SP checkpoints (pure core)."""

from broker.audit.checkpoint import Checkpoint, CheckpointError, NoteSigner, NoteVerifier
from broker.audit.merkle import (
    EMPTY_ROOT,
    Frontier,
    HashReader,
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

__all__ = [
    "EMPTY_ROOT",
    "Checkpoint",
    "CheckpointError",
    "Frontier",
    "HashReader",
    "MemoryHashReader",
    "NoteSigner",
    "NoteVerifier",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_from_leaves",
    "root_of_leaf_hashes",
    "verify_consistency",
    "verify_inclusion",
]
