"""Sealing a key with the KEK: AES-256-GCM, bound to the key's purpose, id and label.

A sealed blob is ``version (1 byte) || nonce (12 random bytes) || ciphertext || tag``. The
associated data names the format version, the purpose, the key id and the label, so a blob
copied to another row (another purpose, another kid, another origin) does not open: the
database's writer can delete keys but cannot swap one for another or forge one.

NOTE: random 96-bit nonces are safe for far more seals than a broker ever makes (NIST SP
800-38D bounds them at 2^32 per key); every seal draws a new one.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_VERSION = 1
KEK_BYTES = 32
NONCE_BYTES = 12


class SealError(Exception):
    """A sealed blob does not open: another KEK, or the blob or its row was altered."""


def _aad(purpose: str, kid: str, label: str) -> bytes:
    # NUL-separated: no field holds a NUL (purposes and kids are ASCII names), so the split is
    # unambiguous ("a" + "b\0c" cannot read as "a\0b" + "c").
    fields = ("broker-key", str(FORMAT_VERSION), purpose, kid, label)
    if any("\0" in f for f in fields):
        raise ValueError("a key's purpose, id and label hold no NUL")
    return "\0".join(fields).encode()


def seal(kek: bytes, purpose: str, kid: str, label: str, secret: bytes) -> bytes:
    """``secret`` encrypted with ``kek`` (32 bytes) for the row (purpose, kid, label)."""
    nonce = os.urandom(NONCE_BYTES)
    body = AESGCM(kek).encrypt(nonce, secret, _aad(purpose, kid, label))
    return bytes([FORMAT_VERSION]) + nonce + body


def unseal(kek: bytes, purpose: str, kid: str, label: str, sealed: bytes) -> bytes:
    """The secret of a blob made by :func:`seal` for the same row. Raises SealError."""
    if len(sealed) < 1 + NONCE_BYTES + 16 or sealed[0] != FORMAT_VERSION:
        raise SealError("not a sealed key of a known format")
    nonce, body = sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :]
    try:
        return AESGCM(kek).decrypt(nonce, body, _aad(purpose, kid, label))
    except InvalidTag:
        raise SealError("it does not open with this KEK (another KEK, or it was altered)") from None
