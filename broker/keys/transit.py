"""The KEK wrapped by OpenBao's (or Vault's) transit engine, unwrapped at start-up.

With ``BROKER_KEK_TRANSIT_KEY``, the KEK file holds no key but a transit ciphertext
(``vault:v1:...``) of one, made by ``broker keys kek generate --transit-key NAME`` with
``transit/datakey/wrapped`` (so the KEK is never shown to anyone). At start-up the broker logs in
with its own Vault auth (VAULT_ADDR, and BROKER_VAULT_JWT_ROLE + BROKER_VAULT_JWT_FILE or
VAULT_TOKEN) and asks ``transit/decrypt/NAME``; the KEK stays in its memory only. This is how
OpenBao's own auto-unseal works: who holds the file and the database still needs the transit
key's ``decrypt`` permission, which can be revoked.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.errors import ConfigError
from broker.keys.kek import Kek
from broker.keys.sealing import KEK_BYTES

if TYPE_CHECKING:
    from broker.settings import Settings

TIMEOUT_S = 10


def _client(settings: Settings) -> Any:
    """An hvac client logged in with the broker's own Vault auth. Raises ConfigError."""
    # Imported here: hvac costs what a broker without transit need not pay.
    import hvac  # noqa: PLC0415
    import hvac.exceptions  # noqa: PLC0415
    import requests  # noqa: PLC0415

    from broker.backends.vault import token_source  # noqa: PLC0415

    if not settings.vault_addr:
        raise ConfigError("BROKER_KEK_TRANSIT_KEY is set but VAULT_ADDR is not")
    source = token_source(settings)
    verify = settings.vault_cacert or True
    # NOTE: token="" (not None): hvac would otherwise pick up VAULT_TOKEN or ~/.vault-token.
    anonymous = hvac.Client(url=settings.vault_addr, token="", timeout=TIMEOUT_S, verify=verify)
    try:
        login = source.login(anonymous)
    except (hvac.exceptions.VaultError, requests.RequestException) as exc:
        raise ConfigError(
            f"cannot log in to {settings.vault_addr} ({source.where}) to unwrap the KEK: "
            f"{type(exc).__name__}"
        ) from None
    return hvac.Client(url=settings.vault_addr, token=login.token, timeout=TIMEOUT_S, verify=verify)


def _failure(what: str, settings: Settings, exc: Exception) -> ConfigError:
    said = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {said[0][:200]}" if said else type(exc).__name__
    return ConfigError(
        f"cannot {what} with the transit key {settings.kek_transit_key!r} of "
        f"{settings.vault_addr} (mount {settings.kek_transit_mount}): {detail}"
    )


def wrapped_kek(settings: Settings) -> str:
    """A new KEK as a transit ciphertext under ``BROKER_KEK_TRANSIT_KEY`` (the key itself is
    never returned). Raises ConfigError."""
    import hvac.exceptions  # noqa: PLC0415
    import requests  # noqa: PLC0415

    client = _client(settings)
    try:
        answer = client.secrets.transit.generate_data_key(
            settings.kek_transit_key,
            "wrapped",
            bits=KEK_BYTES * 8,
            mount_point=settings.kek_transit_mount,
        )
        return str(answer["data"]["ciphertext"])
    except (hvac.exceptions.VaultError, requests.RequestException, KeyError) as exc:
        raise _failure("make a KEK", settings, exc) from None


def unwrap_kek(path: Path, settings: Settings) -> Kek:
    """The KEK whose transit ciphertext is in ``path``. Raises ConfigError naming the file
    (never its content) and the transit key when it cannot be read or unwrapped."""
    import hvac.exceptions  # noqa: PLC0415
    import requests  # noqa: PLC0415

    try:
        ciphertext = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"the KEK file {path} cannot be read: {exc.strerror}") from None
    if not ciphertext.startswith("vault:v"):
        raise ConfigError(
            f"the KEK file {path} is not a transit ciphertext (vault:v...), yet "
            "BROKER_KEK_TRANSIT_KEY is set (make one with `broker keys kek generate "
            "--transit-key NAME`)"
        )
    client = _client(settings)
    try:
        answer = client.secrets.transit.decrypt_data(
            settings.kek_transit_key, ciphertext, mount_point=settings.kek_transit_mount
        )
        key = base64.b64decode(answer["data"]["plaintext"], validate=True)
    except (hvac.exceptions.VaultError, requests.RequestException, KeyError) as exc:
        raise _failure(f"unwrap the KEK in {path}", settings, exc) from None
    except (binascii.Error, ValueError):
        raise ConfigError(f"the transit key unwrapped {path} to something not base64") from None
    if len(key) != KEK_BYTES:
        raise ConfigError(f"the KEK in {path} unwraps to {len(key)} bytes, not {KEK_BYTES}")
    return Kek(key, f"{path} (unwrapped by transit key {settings.kek_transit_key})")
