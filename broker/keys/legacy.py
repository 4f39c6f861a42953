"""Keys of an earlier version's data dir move into the store on first start.

Earlier versions kept every key as a file in the data dir. On start, each purpose's files are
sealed into the store (one transaction per purpose) unless the store already holds that
purpose's keys; then the files are renamed ``<name>.migrated`` and never read again. So a
broker upgraded in place keeps its JWKS kids and its audit verifier key (old checkpoints still
verify), and a replica whose data dir holds other keys than the store's gets the store's, with
a warning naming the files it ignored.

NOTE: the ``.migrated`` files still hold the keys in the clear; they are kept so that a
downgrade is possible, and every start warns until they are deleted (docs/deployment.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.keys import stored_hmac_key, stored_signing_key
from broker.backends.keys import SigningKey, new_private
from broker.errors import ConfigError
from broker.keys.store import (
    ACTIVE,
    AUDIT_HMAC,
    AUDIT_SIGNING,
    CURRENT,
    DEV_ISSUER,
    JWT,
    NEXT,
    PREVIOUS,
    KeyStore,
    NewKey,
    StoredKey,
)

log = logging.getLogger("broker.keys")
MIGRATED = ".migrated"
JWT_FILES = {
    CURRENT: "keys/jwt-current.pem",
    NEXT: "keys/jwt-next.pem",
    PREVIOUS: "keys/jwt-previous.pem",
}
AUDIT_KEY, AUDIT_ORIGIN, AUDIT_HMAC_FILE = "audit-key.pem", "audit-origin", "audit-hmac.key"
DEV_ISSUER_FILE = "dev-issuer-key.pem"
LEGACY_FILES = (*JWT_FILES.values(), AUDIT_KEY, AUDIT_ORIGIN, AUDIT_HMAC_FILE, DEV_ISSUER_FILE)


def _pem(path: Path) -> object:
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise  # moved meanwhile by another process of this data dir (see import_data_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the key {path}: {type(exc).__name__}") from None


def _ec(path: Path) -> SigningKey:
    key = _pem(path)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"the key {path} is not an EC P-256 key")
    return SigningKey.of(key)


def _jwt(data_dir: Path) -> list[NewKey]:
    found = {slot: data_dir / name for slot, name in JWT_FILES.items()}
    if not found[CURRENT].exists():
        raise ConfigError(f"{found[CURRENT]} is missing, though other signing key files exist")
    keys = {slot: _ec(path) for slot, path in found.items() if path.exists()}
    keys.setdefault(NEXT, SigningKey.of(new_private()))
    return [key.stored(slot) for slot, key in keys.items()]


def _audit_signing(data_dir: Path, default_origin: str | None) -> list[NewKey]:
    origin_file = data_dir / AUDIT_ORIGIN
    origin = origin_file.read_text().strip() if origin_file.exists() else default_origin
    if not origin:
        raise ConfigError(f"{data_dir / AUDIT_KEY} exists but {origin_file} does not")
    key = _pem(data_dir / AUDIT_KEY)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"the audit signing key {data_dir / AUDIT_KEY} is not an Ed25519 key")
    return [stored_signing_key(origin, key)]


def _audit_hmac(data_dir: Path) -> list[NewKey]:
    return [stored_hmac_key((data_dir / AUDIT_HMAC_FILE).read_bytes())]


def _dev_issuer(data_dir: Path) -> list[NewKey]:
    return [_ec(data_dir / DEV_ISSUER_FILE).stored(ACTIVE)]


def _ignored(
    purpose: str, present: list[Path], held: list[StoredKey], read: Callable[[], list[NewKey]]
) -> None:
    """Warn when the files hold other keys than the store (which wins)."""
    try:
        differ = bool({k.kid for k in read()} - {k.kid for k in held})
    except ConfigError:
        differ = True
    if differ:
        log.warning(
            "the store already holds %s keys, other than those in %s: the store's are used, "
            "those files are ignored (renamed *%s)",
            purpose,
            ", ".join(str(p) for p in present),
            MIGRATED,
        )


def _import(
    keys: KeyStore, purpose: str, present: list[Path], read: Callable[[], list[NewKey]]
) -> None:
    held = keys.find(purpose)
    if held:
        _ignored(purpose, present, held, read)
        return
    new = read()
    stored, created = keys.ensure(purpose, lambda: new)
    if not created:  # another replica stored its own meanwhile
        _ignored(purpose, present, stored, lambda: new)
        return
    log.warning(
        "moved the %s keys of %s into the store; the files are renamed *%s and no longer read",
        purpose,
        ", ".join(str(p) for p in present),
        MIGRATED,
    )


def import_data_dir(data_dir: Path, keys: KeyStore, default_origin: str | None) -> None:
    """Move the key files of an earlier version in ``data_dir`` into the store (see the module
    docstring). Raises ConfigError when a file cannot be read as the key it should be."""
    groups: list[tuple[str, list[str], Callable[[], list[NewKey]]]] = [
        (JWT, list(JWT_FILES.values()), lambda: _jwt(data_dir)),
        (
            AUDIT_SIGNING,
            [AUDIT_KEY, AUDIT_ORIGIN],
            lambda: _audit_signing(data_dir, default_origin),
        ),
        (AUDIT_HMAC, [AUDIT_HMAC_FILE], lambda: _audit_hmac(data_dir)),
        (DEV_ISSUER, [DEV_ISSUER_FILE], lambda: _dev_issuer(data_dir)),
    ]
    for purpose, names, read in groups:
        present = [data_dir / n for n in names if (data_dir / n).exists()]
        if not present or (purpose == AUDIT_SIGNING and not (data_dir / AUDIT_KEY).exists()):
            continue
        try:
            _import(keys, purpose, present, read)
        except FileNotFoundError:
            continue  # another process of this data dir (--workers) moved them meanwhile
        for path in present:
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, path.with_name(path.name + MIGRATED))
    leftovers = [data_dir / (n + MIGRATED) for n in LEGACY_FILES]
    if any(p.exists() for p in leftovers):
        log.warning(
            "%s hold keys in the clear from an earlier version; the broker no longer reads "
            "them: delete them once no downgrade is needed",
            ", ".join(str(p) for p in leftovers if p.exists()),
        )
