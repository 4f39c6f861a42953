"""SigningKey.sign_jwt: what every broker JWT is. Its header and payload are the bytes PyJWT's
``jwt.encode`` writes, its ES256 signature verifies with PyJWT and with ``cryptography``, and
any change to a signed byte makes it fail."""

from __future__ import annotations

import base64
import json

import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.backends.keys import ALGORITHM, KeyRing, SigningKey
from broker.errors import ConfigError

KEY = KeyRing.new_key()

_text = st.text(max_size=40)
_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
CLAIMS = st.dictionaries(_text, _value, max_size=8)


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


@settings(max_examples=150, deadline=None)
@given(CLAIMS)
def test_header_and_payload_are_what_pyjwt_writes(claims: dict[str, object]) -> None:
    ours = KEY.sign_jwt(claims)
    theirs = jwt.encode(
        claims, KEY.private, algorithm=ALGORITHM, headers={"kid": KEY.kid, "typ": "JWT"}
    )
    assert ours.rsplit(".", 1)[0] == theirs.rsplit(".", 1)[0]
    header = jwt.get_unverified_header(ours)
    assert header == {"alg": "ES256", "kid": KEY.kid, "typ": "JWT"}
    assert json.loads(_unb64(ours.split(".")[1])) == claims


def test_the_signature_verifies_with_pyjwt_and_cryptography() -> None:
    claims = {"iss": "https://broker.example", "sub": "s", "aud": "model:m", "exp": 2**31}
    token = KEY.sign_jwt(claims)
    public = KEY.private.public_key()
    assert jwt.decode(token, public, algorithms=["ES256"], audience="model:m") == claims
    head, payload, signature = token.split(".")
    raw = _unb64(signature)
    assert len(raw) == 64 and "=" not in token  # raw r || s (RFC 7518 §3.4), unpadded
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, f"{head}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("part", [0, 1, 2])
def test_a_changed_byte_fails_verification(part: int) -> None:
    token = KEY.sign_jwt({"sub": "s", "n": 1})
    segments = token.split(".")
    seg = segments[part]
    segments[part] = seg[:-2] + ("A" if seg[-2] != "A" else "B") + seg[-1]
    with pytest.raises(jwt.InvalidTokenError):
        jwt.decode(".".join(segments), KEY.private.public_key(), algorithms=["ES256"])


def test_another_keys_signature_does_not_verify() -> None:
    other = KeyRing.new_key()
    token = other.sign_jwt({"sub": "s"})
    forged = KEY.header.decode() + token[token.index(".") :]
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, KEY.private.public_key(), algorithms=["ES256"])


def test_the_header_names_the_key_that_signed() -> None:
    token = KEY.sign_jwt({"sub": "s"})
    assert token.split(".")[0] == KEY.header.decode()
    assert json.loads(_unb64(KEY.header.decode())) == {"alg": "ES256", "kid": KEY.kid, "typ": "JWT"}
    assert isinstance(KEY, SigningKey) and KeyRing.new_key().header != KEY.header


def test_a_key_of_another_curve_is_refused_before_it_signs() -> None:
    with pytest.raises(ConfigError, match="not an EC P-256 key"):
        SigningKey.of(ec.generate_private_key(ec.SECP384R1()))
