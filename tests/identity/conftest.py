"""Fixtures for identity tests: real keys generated at run time (RSA 2048, EC P-256), a
verifier over a real JWK-set file, and a real counting HTTP server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.identity import JWKSCache, Verifier

from .support import (
    AUDIENCE,
    CI,
    CLUSTER,
    GITHUB,
    GITLAB,
    MESH,
    SSO,
    Clock,
    Env,
    KeyServer,
    Signer,
    make_policy,
    roles_for,
    write_jwks,
)


@pytest.fixture(scope="session")
def rsa_signer() -> Signer:
    return Signer(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256", "rsa-1")


@pytest.fixture(scope="session")
def rsa_signer_2() -> Signer:
    return Signer(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256", "rsa-2")


@pytest.fixture(scope="session")
def ec_signer() -> Signer:
    return Signer(ec.generate_private_key(ec.SECP256R1()), "ES256", "ec-1")


@pytest.fixture(scope="session")
def attacker(rsa_signer: Signer) -> Signer:
    """A key nobody trusts, using the trusted key's kid."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Signer(key, "RS256", rsa_signer.kid)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def env(
    tmp_path: Path, rsa_signer: Signer, ec_signer: Signer, attacker: Signer, clock: Clock
) -> Iterator[Env]:
    path = tmp_path / "jwks.json"
    write_jwks(path, rsa_signer.jwk(), ec_signer.jwk())
    common = {"audiences": [AUDIENCE], "jwks_file": str(path)}
    policy = make_policy(
        {"name": "ci", "issuer": CI, **common},
        {"name": "github", "issuer": GITHUB, "single_use": True, **common},
        {"name": "gitlab", "issuer": GITLAB, **common},
        {"name": "cluster", "issuer": CLUSTER, "profile": "kubernetes", **common},
        {"name": "mesh", "issuer": MESH, "profile": "spiffe", **common},
        {"name": "sso", "issuer": SSO, "kind": "people", "roles_claim": "groups", **common},
    )
    keys = JWKSCache(clock=clock)
    verifier = Verifier(policy, keys, roles_for=roles_for, clock=clock)
    yield Env(verifier, path, rsa_signer, ec_signer, attacker, clock)
    keys.close()


@pytest.fixture
def key_server() -> Iterator[KeyServer]:
    server = KeyServer()
    yield server
    server.stop()
