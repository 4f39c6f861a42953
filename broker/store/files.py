"""Secret files in the data dir (the KEK, the database, the audit anchor): owner-only
(files 0600, directories 0700) whatever the umask; secrets written atomically."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only; a crash leaves the old file or the
    new one, never a torn one."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def owner_only(path: Path, mode: int) -> None:
    """Set ``path`` (which exists) to exactly ``mode`` (0o600 or 0o700) if this process owns it.

    NOTE: modes given to ``open``/``mkdir`` pass through the umask, and a file or directory made
    by an earlier version (or by hand) keeps whatever mode it had; so the mode is set, not
    asked for. A path someone else owns (a mounted volume) is left as it is, with a warning if
    others may read it: the broker cannot fix it and its owner may have reasons.
    """
    info = path.stat()
    if stat.S_IMODE(info.st_mode) == mode:
        return
    if info.st_uid == os.geteuid():
        path.chmod(mode)
    elif info.st_mode & 0o077:
        logging.getLogger("broker.store").warning(
            "%s is mode %o and owned by uid %d, not this process: others may read it",
            path,
            stat.S_IMODE(info.st_mode),
            info.st_uid,
        )


def create_owner_only(path: Path) -> None:
    """Create the empty file ``path`` as 0600 unless it exists, then make it 0600 (see
    :func:`owner_only`)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    owner_only(path, 0o600)


def write_private_key(path: Path, key: PrivateKeyTypes) -> None:
    """A private key as unencrypted PKCS#8 PEM (the data dir's 0700/0600 modes protect it)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_secret(path, pem)
