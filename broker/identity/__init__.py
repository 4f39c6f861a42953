"""Identity: verification of workload and people tokens, and issuer key sets.

:class:`Verifier` is the only maker of :class:`WorkloadIdentity` and :class:`Person`;
:class:`JWKSCache` is the production :class:`KeySource`. See ``docs/identity.md``.
"""

from broker.identity.jwks import JWKSCache
from broker.identity.types import Person, WorkloadIdentity
from broker.identity.verifier import LEEWAY_SECONDS, MAX_TOKEN_BYTES, KeySource, Verifier

__all__ = [
    "LEEWAY_SECONDS",
    "MAX_TOKEN_BYTES",
    "JWKSCache",
    "KeySource",
    "Person",
    "Verifier",
    "WorkloadIdentity",
]
