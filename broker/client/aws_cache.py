"""A cache for ``broker aws credential-process``, as aws-cli caches SSO credentials.

The AWS CLI runs ``credential_process`` again in every new process. With a single-use issuer
(GitHub Actions' tokens in the example policy) the second exchange of the same token is
refused as replayed, so the answer is kept, one 0600 file per broker URL, profile, model,
action, token file and TTL, and reused until shortly before it expires.

NOTE: a cache file is trusted only when it is a regular file of this user with mode 0600 in
a 0700 directory of this user: anyone who could write it could hand us credentials, anyone who
could read it could take them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import stat
from pathlib import Path

from broker.client.files import write_private

REUSE_MARGIN = dt.timedelta(minutes=10)
"""Reused while more than this is left: botocore refreshes at 15 minutes left (advisory) and
insists at 10 (mandatory), so what we hand over is never already due."""


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "broker" / "credential-process"


def cache_key(*parts: str | None) -> str:
    return hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()


def _private(path: Path, mode: int) -> bool:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    kind = stat.S_ISDIR if mode == 0o700 else stat.S_ISREG
    return kind(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == mode


class CredentialProcessCache:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def get(self, key: str, now: dt.datetime | None = None) -> str | None:
        """The cached credential_process JSON for ``key``, or None when there is none, it is
        due (:data:`REUSE_MARGIN`), unreadable, or not private to this user."""
        path = self.dir / f"{key}.json"
        if not (_private(self.dir, 0o700) and _private(path, 0o600)):
            return None
        try:
            text = path.read_text()
            stamp = json.loads(text)["Expiration"].replace("Z", "+00:00")
            expires = dt.datetime.fromisoformat(stamp)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if expires - (now or dt.datetime.now(dt.UTC)) <= REUSE_MARGIN:
            return None
        return text

    def put(self, key: str, text: str) -> None:
        """Raises OSError."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        write_private(self.dir / f"{key}.json", text)
