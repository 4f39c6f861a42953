"""The policy digest: one stable name for "the policy that decided this".

Grants and audit entries record the digest, so it must change with every change of meaning and
with nothing else. It is ``sha256:`` + the hex SHA-256 of the canonical JSON (sorted keys, no
whitespace, UTF-8) of the *validated* policy, so key order, comments, YAML style and spelled-out
defaults (``approvals: 0``, ``max_ttl: 3600`` vs ``1h``) do not change it, while every field
that the broker acts on does.

An issuer's ``console`` client settings stay out of it: they decide no exchange or approval.

NOTE: ``jwks_file`` enters the digest as the fingerprint of the key set it contains, not as a
path. The digest is then the same wherever the repository is checked out, and replacing the
trusted keys behind an unchanged path does change it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from broker.policy.model import Policy

PREFIX = "sha256:"


def canonical_json(document: Any) -> bytes:
    """Serialise a JSON-compatible ``document`` canonically: sorted keys, no whitespace, UTF-8."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def sha256_digest(document: Any) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``document``."""
    return PREFIX + hashlib.sha256(canonical_json(document)).hexdigest()


def policy_digest(policy: Policy, *, jwks_fingerprints: Mapping[str, str]) -> str:
    """Digest of ``policy``.

    ``jwks_fingerprints`` maps the name of every issuer that has a ``jwks_file`` to
    :func:`sha256_digest` of the key set read from that file.

    Raises:
        ValueError: an issuer has a ``jwks_file`` but no fingerprint was given for it.
    """
    document = policy.model_dump(mode="json")
    for issuer in document["issuers"]:
        # NOTE: how the console signs people in decides nothing that a grant or an approval
        # binds to; changing its client must not invalidate every pending approval.
        issuer.pop("console", None)
        if issuer["jwks_file"] is None:
            continue
        fingerprint = jwks_fingerprints.get(issuer["name"])
        if fingerprint is None:
            raise ValueError(f"no key set fingerprint for issuer {issuer['name']!r}")
        issuer["jwks_file"] = fingerprint
    return sha256_digest(document)
