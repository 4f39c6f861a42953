"""A monitor of the broker's audit log, as in Certificate Transparency: it remembers the last
checkpoint it saw, outside the broker, and checks that every new one extends it.

Each check fetches ``GET /v1/audit/checkpoint``, verifies its signature with the pinned verifier
key, and checks the RFC 6962 consistency proof (``GET /v1/audit/proof/consistency``) from the
checkpoint it saw last; only then does it remember the new one (atomically, in the state file).
A smaller tree, another root at the same size, a proof that does not verify or a note that
does not verify is a :class:`MonitorAlarm`: whoever holds the broker's store and keys rewrote
its history, or shows this monitor a different one than others.

NOTE: runs on users' machines, so it stays lean: httpx (through the client), the pure
checkpoint and Merkle code and the standard library; nothing of the server (tested).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from broker.audit.checkpoint import Checkpoint, CheckpointError, NoteVerifier
from broker.audit.merkle import verify_consistency
from broker.client.http import BrokerClient

STATE_FORMAT = 1


class MonitorAlarm(Exception):
    """The log seen from here is not append-only (or not signed by the pinned key)."""


class StateError(Exception):
    """The state file is unusable, or pins another key than the one given."""


@dataclass(frozen=True)
class Seen:
    """What the monitor remembers: the last checkpoint it verified, and the key it pinned."""

    key: str
    size: int
    root: str
    """Base64, as in the note."""
    note: str
    url: str
    checked_at: str
    format: int = STATE_FORMAT


@dataclass(frozen=True)
class Checked:
    """The outcome of a check that found nothing wrong."""

    previous: int | None
    """The size seen before (None on the first check)."""
    size: int
    pinned_now: bool
    """The key was taken from the broker on this first check (trust on first use)."""


def load(path: Path) -> Seen | None:
    """The state in ``path``, or None when there is none yet. Raises StateError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateError(f"state file {path}: {exc}") from None
    try:
        seen = Seen(**data)
    except TypeError:
        raise StateError(f"state file {path}: not a monitor state") from None
    if seen.format != STATE_FORMAT:
        raise StateError(f"state file {path}: format {seen.format}, expected {STATE_FORMAT}")
    return seen


def save(path: Path, seen: Seen) -> None:
    """Write ``seen`` to ``path`` atomically: a crash leaves the old state or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(asdict(seen), fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Monitor:
    """Checks one broker's log against the state in ``state``."""

    def __init__(self, client: BrokerClient, url: str, state: Path, key: str | None) -> None:
        self._client = client
        self._url = url
        self._state = state
        self._key = key

    def check(self) -> Checked:
        """One check. Raises MonitorAlarm (inconsistent), StateError (unusable state, another
        key), ClientError (the broker refused or is unreachable: nothing was learned)."""
        seen = load(self._state)
        if seen is not None and self._key is not None and seen.key != self._key:
            raise StateError(f"state file {self._state} pins another verifier key than --key")
        key = self._key or (seen.key if seen else None)
        pinned_now = key is None
        if key is None:
            key = self._client.audit_key()
        try:
            verifier = NoteVerifier.from_vkey(key)
        except CheckpointError as exc:
            raise StateError(f"verifier key: {exc}") from None
        note = self._client.audit_checkpoint()
        try:
            new = verifier.verify(note)
        except CheckpointError as exc:
            raise MonitorAlarm(f"the checkpoint served does not verify: {exc}") from None
        if seen is not None:
            self._extends(seen, new)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        root = base64.b64encode(new.root).decode()
        save(self._state, Seen(key, new.size, root, note.decode(), self._url, now))
        return Checked(seen.size if seen else None, new.size, pinned_now)

    def _extends(self, seen: Seen, new: Checkpoint) -> None:
        """Raise MonitorAlarm unless ``new`` is a consistent extension of ``seen``."""
        old_root = _decoded(seen.root)
        if new.size < seen.size:
            raise MonitorAlarm(
                f"the log shrank: checkpoint {new.size} served after {seen.size} was seen "
                "(truncated or rolled back)"
            )
        if new.size == seen.size:
            if new.root != old_root:
                raise MonitorAlarm(
                    f"two checkpoints of size {new.size} with different roots: the log forked"
                )
            return
        if seen.size == 0:
            return  # every tree extends the empty one
        answer = self._client.audit_consistency(seen.size, new.size)
        proof = _proof(answer, seen.size, new.size)
        if not verify_consistency(seen.size, new.size, old_root, new.root, proof):
            raise MonitorAlarm(
                f"checkpoint {new.size} is not consistent with checkpoint {seen.size} seen "
                "before: history was rewritten"
            )


def _decoded(root: str) -> bytes:
    try:
        return base64.b64decode(root, validate=True)
    except (binascii.Error, ValueError):
        raise StateError("state file: the root is not base64") from None


def _proof(answer: dict[str, Any], old: int, new: int) -> list[bytes]:
    """The hashes of a consistency proof answer for exactly ``old`` → ``new``."""
    if (
        answer.get("from") != old
        or answer.get("to") != new
        or not isinstance(answer.get("proof"), list)
    ):
        raise MonitorAlarm(f"the broker answered another proof than {old} → {new}")
    try:
        return [base64.b64decode(h, validate=True) for h in answer["proof"]]
    except (binascii.Error, ValueError, TypeError):
        raise MonitorAlarm("the consistency proof is not base64") from None
