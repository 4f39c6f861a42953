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
