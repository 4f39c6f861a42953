"""The key-encryption key (KEK): 32 random bytes, base64 in a file, that seals every key in
the store. Replicas share it (``BROKER_KEK_FILE``); a single node gets one in its data dir."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from broker.errors import ConfigError
from broker.keys.sealing import KEK_BYTES
from broker.store.files import write_secret

if TYPE_CHECKING:
    from broker.settings import Settings

log = logging.getLogger("broker.keys")
DEFAULT_KEK_FILE = "kek"
"""The KEK's name in the data dir when ``BROKER_KEK_FILE`` is not set."""


@dataclass(frozen=True)
class Kek:
    key: bytes = field(repr=False)
    source: str
    """Where it came from, for error messages (a file's path; never the key)."""


def generate() -> str:
    """A fresh KEK as its file holds it: base64 of 32 random bytes."""
    return base64.b64encode(os.urandom(KEK_BYTES)).decode()


def load_kek(path: Path) -> Kek:
    """The KEK in ``path``. Warns when others than the owner may read it. Raises ConfigError
    naming the file (never its content) when it cannot be read, is not base64 or is not 32
    bytes."""
    try:
        info = path.stat()
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"the KEK file {path} cannot be read: {exc.strerror}") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        log.warning(
            "the KEK file %s is mode %o: others than its owner may read it (chmod 600 it)",
            path,
            stat.S_IMODE(info.st_mode),
        )
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"the KEK file {path} is not base64 (make one with `broker keys kek generate`)"
        ) from None
    if len(key) != KEK_BYTES:
        raise ConfigError(
            f"the KEK file {path} holds {len(key)} bytes; a KEK is {KEK_BYTES} random bytes "
            "(make one with `broker keys kek generate`)"
        )
    return Kek(key, str(path))


def broker_kek(settings: Settings) -> Kek:
    """The KEK of a broker with these (resolved) settings: unwrapped by the transit key
    ``BROKER_KEK_TRANSIT_KEY`` when set (:mod:`broker.keys.transit`), else :func:`kek_for`.
    Raises ConfigError."""
    if settings.kek_transit_key:
        if settings.kek_file is None:
            raise ConfigError(
                "BROKER_KEK_TRANSIT_KEY is set but BROKER_KEK_FILE is not: it names the file "
                "that holds the wrapped KEK"
            )
        from broker.keys.transit import unwrap_kek  # noqa: PLC0415 (hvac only when used)

        return unwrap_kek(settings.kek_file, settings)
    assert settings.database_url is not None
    return kek_for(
        settings.kek_file,
        data_dir=settings.data_dir,
        database_url=settings.database_url,
        dev=settings.dev,
    )


def _is_sqlite(database_url: str) -> bool:
    return database_url.startswith("sqlite")


def require_shared_kek(database_url: str, kek_file: Path | None, *, dev: bool) -> None:
    """Refuse a shared (non-SQLite) database without ``BROKER_KEK_FILE`` outside --dev (see
    :func:`kek_for`). Raises ConfigError."""
    if kek_file is None and not dev and not _is_sqlite(database_url):
        raise ConfigError(
            "BROKER_DATABASE_URL is not SQLite, so replicas may share it, but "
            "BROKER_KEK_FILE is not set: every replica needs the same KEK file (make one "
            "with `broker keys kek generate --out FILE`; docs/deployment.md)"
        )


def kek_for(kek_file: Path | None, *, data_dir: Path, database_url: str, dev: bool) -> Kek:
    """The broker's KEK: ``kek_file`` when given; else ``<data_dir>/kek``, created (0600) on
    first start, so a single node needs no setup.

    NOTE: a KEK of the data dir's own is only safe when nothing else shares the store. On
    PostgreSQL, replicas each with their own data dir would each make their own KEK and the
    second could not open the first's keys; so outside ``--dev`` a PostgreSQL store needs
    ``BROKER_KEK_FILE``. Raises ConfigError.
    """
    if kek_file is not None:
        return load_kek(kek_file)
    require_shared_kek(database_url, kek_file, dev=dev)
    if not _is_sqlite(database_url):
        log.warning(
            "--dev on a shared database without BROKER_KEK_FILE: the KEK is %s, this data "
            "dir's own; another broker on this database cannot open its keys",
            data_dir / DEFAULT_KEK_FILE,
        )
    path = data_dir / DEFAULT_KEK_FILE
    if create_exclusive(path, (generate() + "\n").encode()):
        log.info("created the KEK %s (back it up apart from the database)", path)
    return load_kek(path)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` (0600) holding ``data`` unless it exists; whole or not at all, so that
    processes starting at once (``--workers``) all end up reading the one that won. Returns
    whether this call created it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    write_secret(tmp, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True
