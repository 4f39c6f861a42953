"""The verifier exactly at its limits (times, size), a header without a usable alg, and what a
verified person carries: survivors of mutmut on broker/identity/verifier.py (docs/testing.md).
``NOW`` is the env's clock."""

from __future__ import annotations

import pytest

from broker.errors import IdentityRejected
from broker.identity import LEEWAY_SECONDS, MAX_TOKEN_BYTES

from .support import NOW, SSO, Env, b64json

T = int(NOW)


@pytest.mark.parametrize(
    ("claims", "accepted"),
    [
        ({"exp": T - LEEWAY_SECONDS + 1}, True),
        ({"exp": T - LEEWAY_SECONDS}, False),  # expired, even counting the leeway
        ({"nbf": T - 3600}, True),  # valid since an hour: the usual case
        ({"nbf": T + LEEWAY_SECONDS}, True),
        ({"nbf": T + LEEWAY_SECONDS + 1}, False),
    ],
)
def test_time_limits(env: Env, claims: dict[str, int], accepted: bool) -> None:
    token = env.token(**claims)
    if accepted:
        assert env.verifier.verify_workload(token).subject == "workload-1"
    else:
        with pytest.raises(IdentityRejected, match=f"leeway {LEEWAY_SECONDS}s"):
            env.verifier.verify_workload(token)


def test_a_person_carries_the_issuer_url_and_the_raw_groups(env: Env) -> None:
    """Per-model approver groups are matched against ``groups`` (the roles claim's values)."""
    token = env.token(SSO, groups=["ml-safety-reviewers", "model-owners"])
    person = env.verifier.verify_person(token)
    assert person.issuer == SSO
    assert person.groups == frozenset({"ml-safety-reviewers", "model-owners"})
    assert person.roles == frozenset({"approver"})


@pytest.mark.parametrize(
    ("token", "message"),
    [
        # At the limit a token is read (and found malformed); the cap is for larger ones.
        ("a" * MAX_TOKEN_BYTES, "token is not a compact JWS: expected 3 segments, got 1"),
        ("a" * (MAX_TOKEN_BYTES + 1), f"the limit is {MAX_TOKEN_BYTES}"),
        # Non-ASCII, exactly MAX_TOKEN_BYTES bytes in UTF-8: refused for what it is.
        ("\u00e9" + "a" * (MAX_TOKEN_BYTES - 2), "token contains non-ASCII characters"),
    ],
    ids=["at-limit", "over-limit", "non-ascii-at-limit"],
)
def test_size_limit(env: Env, token: str, message: str) -> None:
    with pytest.raises(IdentityRejected) as caught:
        env.verifier.verify_workload(token)
    assert message in caught.value.description


@pytest.mark.parametrize("header", [{}, {"alg": ""}, {"alg": 256}], ids=["none", "empty", "number"])
def test_a_header_without_a_string_alg_is_refused(env: Env, header: dict[str, object]) -> None:
    token = f"{b64json({**header, 'kid': 'rsa-1'})}.{b64json(env.claims())}.c2ln"
    with pytest.raises(IdentityRejected, match=r"^header alg is required$"):
        env.verifier.verify_workload(token)


def test_an_unencoded_payload_header_is_refused(env: Env) -> None:
    """RFC 7797 ``b64: false``: the signature would cover bytes other than those parsed."""
    token = env.rsa.craft({"alg": "RS256", "kid": "rsa-1", "b64": False}, env.claims())
    with pytest.raises(IdentityRejected, match=r"^header b64 is not accepted"):
        env.verifier.verify_workload(token)


def test_a_signature_of_a_length_no_base64_has_is_refused(env: Env) -> None:
    header, payload, signature = env.token().split(".")
    signature += "A" * ((1 - len(signature)) % 4)  # 4n + 1 characters
    token = f"{header}.{payload}.{signature}"
    with pytest.raises(IdentityRejected, match=r"^token signature is not base64url-encoded$"):
        env.verifier.verify_workload(token)


def test_the_claims_acted_on_are_the_ones_the_signature_covers(env: Env) -> None:
    """The payload is parsed once; a payload swapped under another token's signature fails."""
    header, _, signature = env.token().split(".")
    other = b64json(env.claims(sub="workload-2"))
    with pytest.raises(IdentityRejected, match=r"^signature does not verify with key 'rsa-1'$"):
        env.verifier.verify_workload(f"{header}.{other}.{signature}")
    assert env.verifier.verify_workload(env.token(sub="workload-2")).subject == "workload-2"
