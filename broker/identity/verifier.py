"""Verification of workload and people identity tokens (RFC 7519 JWTs under RFC 8725's rules).

The only code that makes a :class:`WorkloadIdentity` or a :class:`Person`. Checks run in this
order, cheapest and most dangerous first, and the first failure rejects the token
(``docs/identity.md`` explains each):

1. size (``MAX_TOKEN_BYTES``) and shape: compact JWS, three base64url segments;
2. header: ``alg`` (never ``none``, never ``HS*``), no key-carrying or URL parameters, no ``crit``,
   a well-formed ``kid``, a non-empty signature;
3. issuer chosen by the unverified ``iss``; it must be trusted and of the kind the call needs;
   the profile's header rules; ``alg`` in the issuer's allow-list;
4. key from the :class:`KeySource`, bound to the token's ``alg``;
5. signature (the key's PyJWT algorithm, over the very segments parsed), ``iss`` and the
   required claims (the note before :class:`KeySource`);
6. ``aud`` (every value ours), ``exp``/``nbf``/``iat`` against the clock, ``jti`` if single-use;
7. profile claims (workloads) or roles (people).

Nothing here does I/O: keys come from the injected :class:`KeySource`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import jwt

from broker.bounds import has_unsafe_text
from broker.errors import IdentityRejected
from broker.identity import profiles
from broker.identity.types import Person, WorkloadIdentity, _seal_person, _seal_workload
from broker.policy.model import IssuerConfig, IssuerKind, Policy

MAX_TOKEN_BYTES = 16 * 1024
LEEWAY_SECONDS = 30
MAX_EXP_AHEAD_SECONDS = 10 * 366 * 86400
"""``exp`` at most this far ahead (ten years), and no time claim before 1970: a time beyond
every calendar the store and the backends use is refused as a claim, not met as a crash."""

MAX_KID_LENGTH = 128
_KID = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_KID_LENGTH}}}")
# NOTE: compact JWS segments are unpadded base64url (RFC 7515 §2); anything else, including
# '=' padding or whitespace, is refused rather than silently skipped by a lenient decoder.
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")

# NOTE: these header parameters name or carry a key. Honouring them would let the token choose
# its own key (RFC 8725 §3.10), so keys come only from the issuer's configured key source.
FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c", "x5t", "x5t#S256")
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat")

# NOTE: the token is parsed once, by _decode_segment (strict: duplicate members, NaN and unsafe
# text refused), and its signature is checked over exactly the segments parsed, by the issuer
# key's own PyJWT algorithm (_check_signature). PyJWT's jwt.decode would parse header and payload
# a second time, leniently (~7 % of an exchange's GIL time, measured in docs/performance.md);
# what its options checked is spelled out here instead:
# - the signature, with the algorithm bound to the key (RFC 8725 §3.1), refusing weak keys
#   (RSA < 2048 bits) rather than warning (PyJWT's enforce_minimum_key_length);
# - REQUIRED_CLAIMS present and not null; `iss` equal to the configured issuer URL exactly (we
#   chose the issuer by it, unverified); `sub` and `jti` (when present) strings.
# - not here: `aud` (PyJWT accepts a list that merely contains one of ours; we require every
#   value to be ours: _check_audience) and exp/nbf/iat (against the verifier's clock with
#   LEEWAY_SECONDS, so there is one notion of now: _check_times).


class KeySource(Protocol):
    """Where the verifier gets an issuer's public keys (see :class:`broker.identity.JWKSCache`)."""

    def key_for(self, issuer: IssuerConfig, kid: str | None, *, offline: bool = False) -> jwt.PyJWK:
        """The issuer's key with this ``kid``; raises :class:`IdentityRejected` if none fits.
        ``offline``: answer from memory or raise :class:`KeysNotReady` (no fetch, no file read,
        no wait for another thread's fetch)."""
        ...


class KeysNotReady(Exception):
    """``verify_workload(..., offline=True)``: the issuer's keys need a fetch or a read first,
    which may block; nothing else was decided. Verify again where blocking is allowed."""


@dataclass(frozen=True, slots=True)
class _Trusted:
    """An issuer with its allow-lists precomputed for the hot path."""

    config: IssuerConfig
    algorithms: frozenset[str]
    audiences: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Verified:
    trusted: _Trusted
    claims: dict[str, Any]
    audience: tuple[str, ...]


def _show(value: object, limit: int = 120) -> str:
    """A claim or header value for an error message: repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _iso(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, tz=UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return str(seconds)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            # NOTE: with duplicate names, parsers disagree on which value wins; refuse.
            raise IdentityRejected(f"duplicate member {_show(key)} in the token")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> None:
    # NOTE: NaN and Infinity are not JSON (RFC 8259); an `exp` of Infinity would never expire.
    raise IdentityRejected(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
"""The strict decoder of header and payload, made once (``json.loads`` with these options
builds a decoder and its scanner per call: two per token)."""


def _decode_segment(segment: str, name: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        # As json.loads reads bytes: UTF-8, -16 or -32, told apart by their first bytes.
        encoding = json.detect_encoding(raw)
        value = _DECODER.decode(raw.decode(encoding, "surrogatepass"))
    except (binascii.Error, ValueError, RecursionError):
        raise IdentityRejected(f"token {name} is not base64url-encoded JSON") from None
    if not isinstance(value, dict):
        raise IdentityRejected(f"token {name} is not a JSON object")
    # NOTE: in UTF-8, only a \u escape or the bytes of a surrogate (0xED A0-BF ..., which
    # "surrogatepass" decodes) can produce NUL or a surrogate; in UTF-16 and -32 anything can.
    # Walk the strings whenever one of those may be there.
    unsafe_possible = encoding != "utf-8" or b"\\u" in raw or b"\xed" in raw
    if unsafe_possible and has_unsafe_text(value):
        raise IdentityRejected(f"token {name} holds a NUL character or an unpaired surrogate")
    return value


def _split(token: object) -> tuple[str, str, str]:
    """Size and shape checks, before any parsing."""
    if not isinstance(token, str):
        raise IdentityRejected("token must be a string")
    # NOTE: cap the size first: everything after this line costs work an attacker chooses.
    if len(token) > MAX_TOKEN_BYTES or not token.isascii():
        size = len(token.encode("utf-8", "replace"))
        if size > MAX_TOKEN_BYTES:
            raise IdentityRejected(f"token is {size} bytes; the limit is {MAX_TOKEN_BYTES}")
        raise IdentityRejected("token contains non-ASCII characters")
    if token.startswith("{"):
        raise IdentityRejected(
            "JWS JSON serialisation is not accepted; send the compact form (header.payload.sig)"
        )
    segments = token.split(".")
    if len(segments) == 5:
        raise IdentityRejected("JWE is not accepted (5 segments); send a signed JWT (JWS)")
    if len(segments) != 3:
        raise IdentityRejected(
            f"token is not a compact JWS: expected 3 segments, got {len(segments)}"
        )
    for name, segment in zip(("header", "payload", "signature"), segments, strict=True):
        if not _SEGMENT.fullmatch(segment):
            raise IdentityRejected(f"token {name} is not base64url (RFC 7515, unpadded)")
    return segments[0], segments[1], segments[2]


def _check_header(header: Mapping[str, Any]) -> tuple[str, str | None]:
    """Issuer-independent header rules; returns (alg, kid)."""
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise IdentityRejected("header alg is required")
    if alg.lower() == "none":
        # NOTE: RFC 8725 §3.1: an unsigned token proves nothing, in any spelling.
        raise IdentityRejected(f"header alg {_show(alg)}: unsigned tokens are never accepted")
    if alg.upper().startswith("HS"):
        # NOTE: RFC 8725 §2.1: an HMAC "signed" with our issuer's public key is a forgery.
        raise IdentityRejected(
            f"header alg {_show(alg)}: symmetric (HMAC) algorithms are never accepted"
        )
    for name in FORBIDDEN_HEADERS:
        if name in header:
            raise IdentityRejected(
                f"header {name!r} is not accepted: keys come only from the issuer's configured "
                "key source, never from the token"
            )
    if "crit" in header:
        # NOTE: RFC 7515 §4.1.11: we must refuse extensions we do not understand, and we
        # understand none (PyJWT's b64 support included).
        raise IdentityRejected(
            f"header crit {_show(header['crit'])}: no critical extensions are supported"
        )
    if "b64" in header:
        # NOTE: RFC 7797 unencoded payloads: the signature would cover other bytes than the
        # ones parsed here. Never supported, whatever crit says.
        raise IdentityRejected("header b64 is not accepted: the payload must be base64url")
    kid = header.get("kid")
    if kid is not None and not (isinstance(kid, str) and _KID.fullmatch(kid)):
        raise IdentityRejected(
            f"header kid: expected 1 to {MAX_KID_LENGTH} characters of [A-Za-z0-9._-], "
            f"got {_show(kid)}"
        )
    return alg, kid


def _check_audience(trusted: _Trusted, claims: Mapping[str, Any]) -> tuple[str, ...]:
    aud = claims["aud"]
    values = [aud] if isinstance(aud, str) else aud
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, str) and v for v in values)
    ):
        raise IdentityRejected(
            f"claim aud: expected a non-empty string or list of strings, got {_show(aud)}"
        )
    foreign = [v for v in values if v not in trusted.audiences]
    if foreign:
        # NOTE: an extra audience means the token is also meant for someone else, who could
        # replay it here; every value must be ours (RFC 8725 §3.9).
        raise IdentityRejected(
            f"claim aud: {_show(foreign)} is not an audience of this broker",
            detail=f"claim aud: expected one of {sorted(trusted.audiences)}, got {_show(values)} "
            f"(not ours: {_show(foreign)})",
        )
    return tuple(values)


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    try:
        seconds = float(value) if isinstance(value, int | float) else math.nan
    except OverflowError:  # an integer beyond any float
        seconds = math.inf
    if isinstance(value, bool) or not math.isfinite(seconds):
        raise IdentityRejected(
            f"claim {name}: expected a finite number of seconds since the epoch, "
            f"got {type(value).__name__}"
        )
    return seconds


def _check_times(claims: Mapping[str, Any], now: float) -> None:
    """exp, nbf and iat against ``now``, with LEEWAY_SECONDS either way; each within 1970 and
    MAX_EXP_AHEAD_SECONDS from now."""
    exp = _number(claims, "exp")
    iat = _number(claims, "iat")
    nbf = None if claims.get("nbf") is None else _number(claims, "nbf")
    for name, seconds in (("exp", exp), ("iat", iat), ("nbf", nbf)):
        if seconds is not None and not 0 <= seconds <= now + MAX_EXP_AHEAD_SECONDS:
            raise IdentityRejected(
                f"claim {name}: {_iso(seconds)} is outside the accepted range "
                f"(1970 to {MAX_EXP_AHEAD_SECONDS // 86400} days from now)"
            )
    if exp <= now - LEEWAY_SECONDS:
        raise IdentityRejected(f"token expired at {_iso(exp)} {_when(now)}")
    if nbf is not None and nbf > now + LEEWAY_SECONDS:
        raise IdentityRejected(f"token is not valid before {_iso(nbf)} {_when(now)}")
    if iat > now + LEEWAY_SECONDS:
        raise IdentityRejected(f"claim iat: token issued in the future at {_iso(iat)} {_when(now)}")


def _when(now: float) -> str:
    """The clock a time claim failed against, for its error (built only then: a date's text
    costs as much as the checks)."""
    return f"(now {_iso(now)}, leeway {LEEWAY_SECONDS}s)"


class Verifier:
    """Verifies identity tokens against a policy's issuers.

    ``keys`` supplies issuer public keys; ``roles_for`` maps the values of a people issuer's
    ``roles_claim`` to broker roles; ``clock`` is "now" in seconds since the epoch.
    Safe to share between threads.
    """

    def __init__(
        self,
        policy: Policy,
        keys: KeySource,
        *,
        roles_for: Callable[[Iterable[str]], frozenset[str]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._roles_for = roles_for
        self._clock = clock
        self._issuers: dict[str, _Trusted] = {
            i.issuer: _Trusted(i, frozenset(i.algorithms), frozenset(i.audiences))
            for i in policy.issuers
        }

    def verify_workload(self, token: str, *, offline: bool = False) -> WorkloadIdentity:
        """Verify a workload identity token from a ``kind: workload`` issuer.

        Returns the sealed identity with the profile's ``attributes`` and all claims flattened.
        Raises :class:`IdentityRejected` naming the first check that failed. ``offline``: for
        the event loop, raise :class:`KeysNotReady` instead of fetching or reading keys.
        """
        verified = self._verify(token, "workload", offline=offline)
        config = verified.trusted.config
        claims = verified.claims
        subject: str = claims["sub"]
        profile = config.effective_profile
        attributes = profiles.workload_attributes(profile, subject, claims)
        flat = profiles.flatten_claims(claims)
        return _seal_workload(
            issuer_name=config.name,
            issuer=config.issuer,
            subject=subject,
            profile=profile,
            claims=flat,
            attributes=attributes,
            audience=verified.audience,
            issued_at=int(claims["iat"]),
            expires_at=int(claims["exp"]),
            jti=claims.get("jti"),
            single_use=config.single_use,
        )

    def verify_person(self, token: str) -> Person:
        """Verify a person's token from a ``kind: people`` issuer.

        Roles are ``roles_for`` of the values of the issuer's ``roles_claim`` (a string or a
        list of strings; missing means no roles). Raises :class:`IdentityRejected`.
        """
        verified = self._verify(token, "people")
        config = verified.trusted.config
        assert config.roles_claim is not None  # the policy schema requires it for people
        groups = verified.claims.get(config.roles_claim)
        if groups is None:
            groups = []
        elif isinstance(groups, str):
            groups = [groups]
        elif not (isinstance(groups, list) and all(isinstance(g, str) for g in groups)):
            raise IdentityRejected(
                f"claim {config.roles_claim}: expected a string or a list of strings, "
                f"got {type(groups).__name__}"
            )
        return _seal_person(
            issuer_name=config.name,
            issuer=config.issuer,
            subject=verified.claims["sub"],
            roles=self._roles_for(groups),
            groups=frozenset(groups),
            expires_at=int(verified.claims["exp"]),
        )

    def _verify(self, token: str, kind: IssuerKind, *, offline: bool = False) -> _Verified:
        # ``stage`` names the class of a rejection (IdentityRejected.reason), which the
        # unverified-refusal summaries count.
        stage = "malformed"
        try:
            header_b64, payload_b64, signature_b64 = _split(token)
            header = _decode_segment(header_b64, "header")
            alg, kid = _check_header(header)
            if not signature_b64:
                raise IdentityRejected("signature is empty: unsigned tokens are never accepted")
            unverified = _decode_segment(payload_b64, "payload")
            stage = "untrusted_issuer"
            trusted = self._issuer(unverified, kind)
            config = trusted.config
            stage = "malformed"
            profiles.check_header(config.effective_profile, header)
            if alg not in trusted.algorithms:
                raise IdentityRejected(
                    f"header alg {_show(alg)} is not allowed for issuer {config.name!r} "
                    f"(allowed: {', '.join(config.algorithms)})"
                )
            stage = "bad_signature"
            key = self._keys.key_for(config, kid, offline=offline)
            _check_signature(header_b64, payload_b64, signature_b64, key, alg, kid, config)
            claims = _check_claims(unverified, config)
            stage = "bad_claims"
            subject = claims["sub"]
            if not subject:
                raise IdentityRejected("claim sub: expected a non-empty string")
            audience = _check_audience(trusted, claims)
            stage = "bad_time"
            _check_times(claims, self._clock())
            stage = "bad_claims"
            if config.single_use and not claims.get("jti"):
                raise IdentityRejected(
                    f"claim jti is required: issuer {config.name!r} is single_use "
                    "(each token may be exchanged once)"
                )
        except IdentityRejected as exc:
            exc.reason = stage
            raise
        return _Verified(trusted, claims, audience)

    def _issuer(self, unverified: Mapping[str, Any], kind: IssuerKind) -> _Trusted:
        iss = unverified.get("iss")
        if not isinstance(iss, str) or not iss:
            raise IdentityRejected("claim iss is required")
        trusted = self._issuers.get(iss)
        if trusted is None:
            raise IdentityRejected(f"issuer {_show(iss)} is not trusted")
        if trusted.config.kind != kind:
            raise IdentityRejected(
                f"issuer {trusted.config.name!r} issues {trusted.config.kind} tokens; "
                f"a {kind} token is needed here"
            )
        return trusted


def _check_signature(
    header_b64: str,
    payload_b64: str,
    signature_b64: str,
    key: jwt.PyJWK,
    alg: str,
    kid: str | None,
    config: IssuerConfig,
) -> None:
    """The signature over ``header_b64.payload_b64`` verifies with ``key``, whose algorithm
    is the token's ``alg``. Raises IdentityRejected."""
    key_name = repr(kid) if kid is not None else "(no kid)"
    if key.algorithm_name != alg:
        # NOTE: RFC 8725 §3.1: a key is used with one algorithm only (the JWK's `alg`, or
        # the default for its type), so a token cannot pick another one for it.
        raise IdentityRejected(
            f"key {key_name} of issuer {config.name!r} is for {key.algorithm_name}; "
            f"the token says {alg}"
        )
    algorithm = key.Algorithm
    weak = algorithm.check_key_length(key.key)
    if weak:
        raise IdentityRejected(f"key {key_name} of issuer {config.name!r}: {weak}")
    try:
        signature = base64.urlsafe_b64decode(signature_b64 + "=" * (-len(signature_b64) % 4))
    except binascii.Error:  # a length no base64 has (4n + 1)
        raise IdentityRejected("token signature is not base64url-encoded") from None
    if not algorithm.verify(f"{header_b64}.{payload_b64}".encode(), key.key, signature):
        raise IdentityRejected(f"signature does not verify with key {key_name}")


def _check_claims(claims: dict[str, Any], config: IssuerConfig) -> dict[str, Any]:
    """The claims of a token whose signature verified, once they pass the checks PyJWT's
    decode made (see the NOTE at the top). Raises IdentityRejected."""
    for name in REQUIRED_CLAIMS:
        if claims.get(name) is None:
            raise IdentityRejected(f"claim {name} is required")
    if claims["iss"] != config.issuer:
        raise IdentityRejected(f"claim iss: expected {config.issuer!r}")
    if not isinstance(claims["sub"], str):
        raise IdentityRejected("token rejected: Subject must be a string")
    if "jti" in claims and not isinstance(claims["jti"], str):
        raise IdentityRejected("token rejected: JWT ID must be a string")
    return claims
