"""Verification of a log: from the store, or offline from an export and a public key.

Pure: callers hand in the entries (index, exact leaf bytes, optionally the leaf hash recorded at
append time) and the signed checkpoints; :func:`verify_log` recomputes every leaf and the tree,
checks every checkpoint's signature, and that each signed root equals the recomputed root at its
size. Because all signed roots are checked against one recomputed history, they are consistent
with each other. Problems name the first index where the history disagrees.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from hashlib import sha256

from broker.audit.checkpoint import Checkpoint, CheckpointError, NoteVerifier
from broker.audit.merkle import Frontier

_LEAF = b"\x00"


@dataclass(frozen=True)
class Problem:
    index: int | None
    message: str

    def __str__(self) -> str:
        return self.message if self.index is None else f"index {self.index}: {self.message}"


@dataclass
class Report:
    start: int
    size: int = 0
    checkpoints: int = 0
    latest_checkpoint: int | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad_index(self) -> int | None:
        indexes = [p.index for p in self.problems if p.index is not None]
        return min(indexes) if indexes else None


def _verified_checkpoints(
    notes: Iterable[bytes], verifier: NoteVerifier, report: Report
) -> dict[int, Checkpoint]:
    good: dict[int, Checkpoint] = {}
    for note in notes:
        try:
            cp = verifier.verify(note)
        except CheckpointError as exc:
            report.problems.append(Problem(None, f"a stored checkpoint does not verify: {exc}"))
            continue
        good[cp.size] = cp
    report.checkpoints = len(good)
    report.latest_checkpoint = max(good) if good else None
    return good


@dataclass(frozen=True)
class Trusted:
    """A checkpoint held outside the store (an auditor's copy, the broker's anchor), already
    verified; ``label`` names it in problems."""

    label: str
    checkpoint: Checkpoint


def verify_log(
    entries: Iterable[tuple[int, bytes, bytes | None]],
    checkpoint_notes: Iterable[bytes],
    verifier: NoteVerifier,
    *,
    frontier: Frontier | None = None,
    head_size: int | None = None,
    trusted: Sequence[Trusted] = (),
) -> Report:
    """Verify ``entries`` (index, leaf bytes, recorded leaf hash or None) in index order.

    ``frontier`` is the compact range before the first entry (an export starting after 0);
    ``head_size`` is how many entries the store says it has; the recomputed tree must also
    have the root of each ``trusted`` checkpoint at its size. Never raises on bad data: every
    disagreement is a :class:`Problem` in the report.
    """
    tree = frontier or Frontier()
    report = Report(start=tree.size)
    signed = _verified_checkpoints(checkpoint_notes, verifier, report)
    held = {t.checkpoint.size: t for t in trusted if t.checkpoint.size > tree.size}
    # Entries under a signed root are proven by hashing their bytes into it; parsing them only
    # names what went wrong, so it is done where a recorded hash disagrees or no root covers them.
    anchored = max(signed, default=0)
    first_changed: int | None = None
    for index, leaf, recorded in entries:
        expected = tree.size
        if index != expected:
            what = "missing" if index > expected else "duplicated"
            report.problems.append(Problem(expected, f"entry {what} (next stored is {index})"))
            break
        digest = sha256(_LEAF + leaf).digest()
        problem = None
        if recorded is None or recorded != digest or index >= anchored:
            problem = check_entry(index, leaf)
        if recorded is not None and recorded != digest:
            problem = problem or "its bytes differ from the leaf hash recorded when it was appended"
        if problem:
            report.problems.append(Problem(index, problem))
            first_changed = index if first_changed is None else first_changed
        tree.append(digest)
        outside = held.get(tree.size)
        if outside is not None and outside.checkpoint.root != tree.root():
            report.problems.append(
                Problem(
                    first_changed,
                    f"entries {report.start}..{tree.size - 1} do not hash to {outside.label} "
                    f"(size {tree.size}): history was rewritten before index {tree.size}",
                )
            )
        cp = signed.get(tree.size)
        if cp is not None and cp.root != tree.root():
            where = first_changed if first_changed is not None else report.start
            report.problems.append(
                Problem(
                    where,
                    f"the entries do not hash to the signed checkpoint of size {tree.size}: "
                    "history was rewritten at or after this index",
                )
            )
    report.size = tree.size
    if head_size is not None and head_size != tree.size:
        report.problems.append(
            Problem(tree.size, f"the log head says {head_size} entries but {tree.size} were found")
        )
    for size in sorted(s for s in held if s > tree.size):
        report.problems.append(
            Problem(
                tree.size,
                f"{held[size].label} covers {size} entries but the store has {tree.size}: "
                "the log was truncated or rolled back",
            )
        )
    beyond = sorted(s for s in signed if s > tree.size)
    if beyond:
        report.problems.append(
            Problem(tree.size, f"a checkpoint covers {beyond[-1]} entries: the log was truncated")
        )
    return report


def check_entry(index: int, leaf: bytes) -> str | None:
    """Why ``leaf`` is not the JSON event recorded at ``index``, or None."""
    try:
        event = json.loads(leaf)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "the entry is not valid JSON"
    if not isinstance(event, dict) or event.get("idx") != index:
        got = event.get("idx") if isinstance(event, dict) else None
        return f"the entry holds the event recorded as index {got} (moved or swapped)"
    return None
