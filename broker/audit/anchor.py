"""The anchor: the newest checkpoint this broker signed or checked, kept where a database writer
cannot reach.

A file in the data dir (``audit-anchor``, 0600) holds the signed note of the newest checkpoint
signed from this data dir, or signed by another replica with the log's key and found consistent
with it (:meth:`broker.audit.log.AuditLog.check`). The broker refuses to sign a checkpoint that
is not a consistent extension of it (:meth:`broker.audit.log.AuditLog.sign_checkpoint`), and
reports when the store disagrees with it (:mod:`broker.audit.integrity`). So whoever can write
the database but not the data dir cannot make the broker vouch for a rewritten history: the
rewrite no longer hashes to a root the broker remembers.

NOTE: the anchor only moves forward. Processes sharing a data dir take turns on a lock file and
write a checkpoint only if it is larger than the one there, atomically (a crash leaves the old
note or the new one).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker.audit.checkpoint import Checkpoint, CheckpointError, NoteVerifier
from broker.store.files import owner_only, write_secret

ANCHOR_FILE = "audit-anchor"


class AnchorError(Exception):
    """The anchor file exists but cannot be trusted (unreadable, malformed, a bad signature)."""


class AnchorFile:
    """The anchor in ``path``, whose note must verify with ``verifier``."""

    def __init__(self, path: Path, verifier: NoteVerifier) -> None:
        self.path = path
        self._verifier = verifier
        self._lock_path = path.with_name(path.name + ".lock")

    def load(self) -> Checkpoint | None:
        """The anchored checkpoint, or None when nothing was anchored yet (a new data dir, or
        one from a version without anchors). Raises AnchorError naming what is wrong."""
        try:
            note = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AnchorError(f"the anchor {self.path} cannot be read: {exc.strerror}") from None
        return self._parse(note)

    def note(self) -> bytes | None:
        """The anchor's signed note as stored, or None when there is none."""
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def advance(self, note: bytes) -> bool:
        """Anchor the checkpoint of ``note`` if it is larger than the anchored one. Returns
        whether it was written. Raises AnchorError if ``note`` does not verify, OSError when
        the file cannot be written."""
        new = self._parse(note)
        with self._locked():
            current = self.load()
            if current is not None and current.size >= new.size:
                return False
            write_secret(self.path, note)
            return True

    def _parse(self, note: bytes) -> Checkpoint:
        try:
            return self._verifier.verify(note)
        except CheckpointError as exc:
            raise AnchorError(f"the anchor {self.path} does not verify: {exc}") from None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            owner_only(self._lock_path, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock
