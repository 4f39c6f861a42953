"""Workload profiles: which claims identify a workload, per kind of issuer. Pure; no I/O.

A profile turns the verified claims of a token into ``attributes`` (the strings a grant records
and a rule matches on) and adds the checks that kind of issuer needs (a GitHub token without
``repository`` or a Kubernetes token whose ``sub`` disagrees with its service account is
rejected). Profiles run after the signature and the registered claims are verified.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from broker.errors import IdentityRejected
from broker.identity.types import ClaimValue
from broker.policy.model import ProfileName

# NOTE: a JWT-SVID header carries only these parameters (SPIFFE JWT-SVID spec §2); anything
# else (cty, jku, ...) means the token was not made by a SPIFFE implementation we understand.
SPIFFE_HEADERS = frozenset({"alg", "kid", "typ"})
SPIFFE_TYPES = frozenset({"JWT", "JOSE"})

MAX_SPIFFE_ID_BYTES = 2048
# NOTE: the SPIFFE ID grammar (SPIFFE-ID spec §2): lowercase trust domain; path segments of
# letters, digits, '.', '-', '_'. That alone excludes ports, userinfo, queries and fragments.
_SPIFFE_ID = re.compile(r"spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._-]+)+)")

_GITHUB_REQUIRED = ("repository", "repository_owner_id")
_GITHUB_OPTIONAL = ("job_workflow_ref", "environment", "ref")
_GITLAB_REQUIRED = ("project_path", "namespace_path")
_GITLAB_OPTIONAL = ("ref", "ref_type", "environment", "ci_config_ref_uri", "pipeline_source")
_K8S = "kubernetes.io"


def _show(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _string(value: object, claim: str) -> str:
    if not isinstance(value, str) or not value:
        raise IdentityRejected(
            f"claim {claim}: expected a non-empty string, got {type(value).__name__}"
        )
    return value


def _strings(
    claims: Mapping[str, Any], profile: str, required: Iterable[str], optional: Iterable[str]
) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for name in required:
        if claims.get(name) is None:
            raise IdentityRejected(f"claim {name} is required by the {profile} profile")
        attributes[name] = _string(claims[name], name)
    for name in optional:
        if claims.get(name) is not None:
            attributes[name] = _string(claims[name], name)
    return attributes


def _github(subject: str, claims: Mapping[str, Any]) -> dict[str, str]:
    # NOTE: never parse `sub` (`repo:owner/name:ref:...`): its format is configurable per
    # repository and owner, so only the dedicated claims are trusted to mean what they say.
    return _strings(claims, "github", _GITHUB_REQUIRED, _GITHUB_OPTIONAL)


def _gitlab(subject: str, claims: Mapping[str, Any]) -> dict[str, str]:
    return _strings(claims, "gitlab", _GITLAB_REQUIRED, _GITLAB_OPTIONAL)


def _k8s_object(parent: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise IdentityRejected(f"claim {where} is required by the kubernetes profile")
    return value


def _kubernetes(subject: str, claims: Mapping[str, Any]) -> dict[str, str]:
    k8s = _k8s_object(claims, _K8S, _K8S)
    account = _k8s_object(k8s, "serviceaccount", f"{_K8S}/serviceaccount")
    attributes: dict[str, str] = {}
    for parent, key, claim in (
        (k8s, "namespace", f"{_K8S}/namespace"),
        (account, "name", f"{_K8S}/serviceaccount/name"),
        # NOTE: the uid tells a recreated service account of the same name from the old one.
        (account, "uid", f"{_K8S}/serviceaccount/uid"),
    ):
        if parent.get(key) is None:
            raise IdentityRejected(f"claim {claim} is required by the kubernetes profile")
        attributes[claim] = _string(parent[key], claim)
    namespace = attributes[f"{_K8S}/namespace"]
    name = attributes[f"{_K8S}/serviceaccount/name"]
    expected = f"system:serviceaccount:{namespace}:{name}"
    if subject != expected:
        raise IdentityRejected(f"claim sub: expected {expected!r}, got {_show(subject)}")
    pod = k8s.get("pod")
    if pod is not None:
        if not isinstance(pod, dict):
            raise IdentityRejected(f"claim {_K8S}/pod: expected an object")
        for key in ("name", "uid"):
            if pod.get(key) is not None:
                claim = f"{_K8S}/pod/{key}"
                attributes[claim] = _string(pod[key], claim)
    return attributes


def parse_spiffe_id(value: str) -> str:
    """Check that ``value`` is a workload SPIFFE ID and return its trust domain.

    Raises :class:`IdentityRejected` unless ``value`` is ``spiffe://<trust-domain>/<path>``
    with a lowercase trust domain, a non-empty path without ``.``/``..`` or empty segments,
    and no port, userinfo, query or fragment.
    """
    if len(value.encode()) > MAX_SPIFFE_ID_BYTES:
        raise IdentityRejected(f"claim sub: a SPIFFE ID is at most {MAX_SPIFFE_ID_BYTES} bytes")
    match = _SPIFFE_ID.fullmatch(value)
    if match is None:
        raise IdentityRejected(
            "claim sub: expected a SPIFFE ID spiffe://<trust-domain>/<path> (lowercase trust "
            f"domain; no port, userinfo, query or fragment), got {_show(value)}"
        )
    if any(segment in (".", "..") for segment in match.group(2).split("/")):
        raise IdentityRejected(
            f"claim sub: SPIFFE ID path segments may not be '.' or '..', got {_show(value)}"
        )
    return match.group(1)


def _spiffe(subject: str, claims: Mapping[str, Any]) -> dict[str, str]:
    return {"spiffe_id": subject, "trust_domain": parse_spiffe_id(subject)}


def _oidc(subject: str, claims: Mapping[str, Any]) -> dict[str, str]:
    return {}


_PROFILES: dict[ProfileName, Callable[[str, Mapping[str, Any]], dict[str, str]]] = {
    "github": _github,
    "gitlab": _gitlab,
    "kubernetes": _kubernetes,
    "spiffe": _spiffe,
    "oidc": _oidc,
}


def check_header(profile: ProfileName, header: Mapping[str, Any]) -> None:
    """Apply the profile's rules on the JOSE header (SPIFFE: only ``alg``, ``kid``, ``typ``).

    Raises :class:`IdentityRejected` naming the offending parameter.
    """
    if profile != "spiffe":
        return
    extra = sorted(set(header) - SPIFFE_HEADERS)
    if extra:
        raise IdentityRejected(
            f"header: a JWT-SVID carries only alg, kid and typ; got also {extra}"
        )
    typ = header.get("typ")
    if typ is not None and not (isinstance(typ, str) and typ in SPIFFE_TYPES):
        raise IdentityRejected(f"header typ: expected 'JWT' or 'JOSE', got {_show(typ)}")


def workload_attributes(
    profile: ProfileName, subject: str, claims: Mapping[str, Any]
) -> dict[str, str]:
    """The attributes that identify the workload under ``profile``, as strings.

    Raises :class:`IdentityRejected` when a claim the profile requires is missing or has the
    wrong type, or (kubernetes, spiffe) when ``sub`` is not what the profile demands.
    """
    return _PROFILES[profile](subject, claims)


def flatten_claims(claims: Mapping[str, Any]) -> dict[str, ClaimValue]:
    """All claims, nested objects flattened with ``/``; lists are kept as lists.

    ``{"kubernetes.io": {"namespace": "x"}}`` becomes ``{"kubernetes.io/namespace": "x"}``.
    Raises :class:`IdentityRejected` if two claims flatten to the same name.
    """
    flat: dict[str, ClaimValue] = {}
    _flatten_into(flat, "", claims)
    return flat


def _flatten_into(flat: dict[str, ClaimValue], prefix: str, claims: Mapping[str, Any]) -> None:
    for key, value in claims.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            _flatten_into(flat, f"{name}/", value)
        elif name in flat:
            # NOTE: `{"a/b": 1, "a": {"b": 2}}` would let one claim shadow another; refuse.
            raise IdentityRejected(f"claims: {_show(name)} appears twice once flattened")
        else:
            flat[name] = value
