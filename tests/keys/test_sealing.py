"""Sealing with the KEK: a blob opens only with its KEK, for its own purpose, kid and label."""

from __future__ import annotations

import os

import pytest

from broker.keys.sealing import SealError, seal, unseal

KEK = os.urandom(32)
SECRET = os.urandom(48)
ROW = ("audit-signing", "kid-1", "broker.example/audit")


def test_a_sealed_key_opens_to_its_secret() -> None:
    sealed = seal(KEK, *ROW, SECRET)
    assert unseal(KEK, *ROW, sealed) == SECRET
    assert SECRET not in sealed


def test_every_seal_draws_a_new_nonce() -> None:
    one, two = seal(KEK, *ROW, SECRET), seal(KEK, *ROW, SECRET)
    assert one[1:13] != two[1:13] and one != two


@pytest.mark.parametrize(
    "row",
    [
        ("audit-hmac", "kid-1", "broker.example/audit"),
        ("audit-signing", "kid-2", "broker.example/audit"),
        ("audit-signing", "kid-1", "evil.example/audit"),
        ("audit-signin", "g\0kid-1", "broker.example/audit"),
    ],
    ids=["other-purpose", "other-kid", "other-label", "shifted-fields"],
)
def test_a_blob_copied_to_another_row_does_not_open(row: tuple[str, str, str]) -> None:
    sealed = seal(KEK, *ROW, SECRET)
    with pytest.raises((SealError, ValueError)):
        unseal(KEK, *row, sealed)


def test_an_altered_byte_anywhere_is_refused() -> None:
    sealed = seal(KEK, *ROW, SECRET)
    for position in range(len(sealed)):
        altered = bytearray(sealed)
        altered[position] ^= 0x01
        with pytest.raises(SealError):
            unseal(KEK, *ROW, bytes(altered))
    with pytest.raises(SealError):
        unseal(KEK, *ROW, sealed[:-1])


def test_another_kek_cannot_open_it() -> None:
    with pytest.raises(SealError, match="does not open with this KEK"):
        unseal(os.urandom(32), *ROW, seal(KEK, *ROW, SECRET))
