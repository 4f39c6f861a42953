"""The verifier: happy paths, and the RFC 8725 catalogue of attacks, each rejected with a
message that names what failed and never echoes the token."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.errors import IdentityRejected
from broker.identity import LEEWAY_SECONDS, MAX_TOKEN_BYTES, JWKSCache, Verifier
from broker.identity import verifier as verifier_module
from broker.identity.verifier import FORBIDDEN_HEADERS

from .support import (
    AUDIENCE,
    CI,
    DROP,
    GITHUB,
    NOW,
    SSO,
    Env,
    KeyServer,
    Signer,
    b64,
    b64json,
    make_policy,
    roles_for,
    write_jwks,
)


def reject(env: Env, token: str, match: str, *, person: bool = False) -> IdentityRejected:
    verify = env.verifier.verify_person if person else env.verifier.verify_workload
    with pytest.raises(IdentityRejected, match=match) as caught:
        verify(token)
    message = caught.value.description
    # NOTE: whatever failed, the message never carries the token or any part of its signature.
    assert token not in message
    signature = token.rsplit(".", 1)[-1]
    assert len(signature) < 8 or signature not in message
    assert caught.value.code == "invalid_request"
    return caught.value


# --- happy paths ---------------------------------------------------------------------------------


def test_rsa_token_verifies(env: Env) -> None:
    identity = env.verifier.verify_workload(env.token(sub="job-7"))
    assert (identity.issuer_name, identity.issuer, identity.subject) == ("ci", CI, "job-7")
    assert identity.profile == "oidc"
    assert identity.attributes == {}
    assert identity.audience == (AUDIENCE,)
    assert (identity.issued_at, identity.expires_at) == (int(NOW) - 10, int(NOW) + 300)
    assert identity.jti == "jti-1"
    assert identity.single_use is False


def test_ec_p256_token_verifies(env: Env) -> None:
    identity = env.verifier.verify_workload(env.ec.sign(env.claims()))
    assert identity.subject == "workload-1"


def test_aud_list_of_our_audiences_verifies(env: Env) -> None:
    identity = env.verifier.verify_workload(env.token(aud=[AUDIENCE]))
    assert identity.audience == (AUDIENCE,)


def test_times_within_leeway_are_accepted(env: Env) -> None:
    late = env.token(exp=int(NOW) - LEEWAY_SECONDS + 1, iat=int(NOW) + LEEWAY_SECONDS)
    assert env.verifier.verify_workload(late).subject == "workload-1"


def test_claims_are_flattened_and_lists_kept(env: Env) -> None:
    token = env.token(ctx={"team": "ml", "deep": {"x": 1}}, tags=["a", "b"])
    claims = env.verifier.verify_workload(token).claims
    assert claims["ctx/team"] == "ml"
    assert claims["ctx/deep/x"] == 1
    assert claims["tags"] == ["a", "b"]
    assert "ctx" not in claims


def test_flattening_collision_is_rejected(env: Env) -> None:
    reject(env, env.token(**{"ctx/team": "x", "ctx": {"team": "y"}}), "appears twice")


def test_person_gets_roles_from_list(env: Env) -> None:
    token = env.token(SSO, aud=AUDIENCE, groups=["ml-platform-admins", "someone-else"])
    person = env.verifier.verify_person(token)
    assert (person.issuer_name, person.subject, person.roles) == (
        "sso",
        "workload-1",
        frozenset({"admin"}),
    )
    assert person.expires_at == int(NOW) + 300


def test_person_gets_roles_from_single_string(env: Env) -> None:
    person = env.verifier.verify_person(env.token(SSO, groups="ml-safety-reviewers"))
    assert person.roles == {"approver"}


def test_person_without_roles_claim_has_no_roles(env: Env) -> None:
    assert env.verifier.verify_person(env.token(SSO)).roles == frozenset()


def test_person_with_malformed_roles_claim_is_rejected(env: Env) -> None:
    token = env.token(SSO, groups={"admin": True})
    reject(env, token, "claim groups: expected a string or a list", person=True)


def test_single_use_issuer_exposes_jti(env: Env) -> None:
    token = env.token(GITHUB, repository="acme/evals", repository_owner_id="42", jti="run-1")
    identity = env.verifier.verify_workload(token)
    assert (identity.jti, identity.single_use) == ("run-1", True)


def test_verification_uses_cached_keys(env: Env, rsa_signer_2: Signer) -> None:
    env.verifier.verify_workload(env.token())
    env.jwks_path.unlink()  # the cache neither needs nor notices the file until it changes
    assert env.verifier.verify_workload(env.token()).subject == "workload-1"


# --- the RFC 8725 catalogue ----------------------------------------------------------------------

Case = Callable[[Env], str]


def _none_token(alg: str, signature: str) -> Case:
    def make(env: Env) -> str:
        return f"{b64json({'alg': alg, 'kid': 'rsa-1'})}.{b64json(env.claims())}.{signature}"

    return make


def _hs256_with_public_key(env: Env) -> str:
    """RFC 8725 §2.1: HMAC keyed with the issuer's public key PEM, which anyone can read."""
    pem = env.rsa.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = f"{b64json({'alg': 'HS256', 'kid': 'rsa-1'})}.{b64json(env.claims())}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def _empty_signature(env: Env) -> str:
    return env.token().rsplit(".", 1)[0] + "."


def _header(**extra: Any) -> Case:
    """A token signed by the attacker that adds header parameters."""

    def make(env: Env) -> str:
        header = {"alg": "RS256", "kid": "attacker-1", **extra}
        return env.attacker.craft(header, env.claims())

    return make


def _embedded_jwk(env: Env) -> str:
    attacker = env.attacker.with_kid("attacker-1")
    header = {"alg": "RS256", "kid": "attacker-1", "jwk": attacker.jwk()}
    return attacker.craft(header, env.claims())


def _kid(kid: Any) -> Case:
    def make(env: Env) -> str:
        return env.rsa.craft({"alg": "RS256", "kid": kid}, env.claims())

    return make


def _claims(**overrides: Any) -> Case:
    def make(env: Env) -> str:
        return env.token(**overrides)

    return make


def _untrusted_key(env: Env) -> str:
    """A well-formed token claiming our issuer and our kid, signed by someone else's key."""
    return env.attacker.sign(env.claims())


def _alg_not_of_key(env: Env) -> str:
    """The RSA key's kid with an ES256 signature: the token may not choose the key's algorithm."""
    return env.ec.with_kid("rsa-1").sign(env.claims())


def _oversized(env: Env) -> str:
    """Properly signed, but too big: refused before any parsing."""
    return env.token(padding="x" * MAX_TOKEN_BYTES)


def _json_serialisation(env: Env) -> str:
    header, payload, signature = env.token().split(".")
    return json.dumps(
        {"payload": payload, "signatures": [{"protected": header, "signature": signature}]}
    )


def _jwe(env: Env) -> str:
    header = b64json({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": "rsa-1"})
    return f"{header}.{b64(b'k' * 32)}.{b64(b'iv')}.{b64(b'ciphertext')}.{b64(b'tag')}"


def _segments(count: int) -> Case:
    def make(env: Env) -> str:
        return ".".join(env.token().split(".")[:2] + ["c2ln"] * (count - 2))

    return make


def _padded(env: Env) -> str:
    header, payload, signature = env.token().split(".")
    return f"{header}.{payload}==.{signature}"


def _raw_payload(text: str) -> Case:
    """A token signed by the trusted key over a payload written by hand."""

    def make(env: Env) -> str:
        return env.rsa.craft_raw({"alg": "RS256", "kid": "rsa-1"}, text.encode())

    return make


_DUPLICATE_SUB = (
    f'{{"iss":"{CI}","sub":"harmless","sub":"admin","aud":"{AUDIENCE}",'
    f'"iat":{int(NOW)},"exp":{int(NOW) + 60}}}'
)
_NAN_EXP = f'{{"iss":"{CI}","sub":"s","aud":"{AUDIENCE}","iat":{int(NOW)},"exp":NaN}}'
_HUGE_EXP = f'{{"iss":"{CI}","sub":"s","aud":"{AUDIENCE}","iat":{int(NOW)},"exp":1e999}}'
_HUGE_INT_IAT = f'{{"iss":"{CI}","sub":"s","aud":"{AUDIENCE}","iat":{10**400},"exp":{int(NOW)}}}'


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat().replace("+00:00", "Z")


CATALOGUE = [
    pytest.param(_none_token("none", ""), r"header alg 'none': unsigned", id="alg-none-unsigned"),
    pytest.param(_none_token("none", "c2ln"), r"header alg 'none': unsigned", id="alg-none-signed"),
    pytest.param(_none_token("None", "c2ln"), r"header alg 'None': unsigned", id="alg-None"),
    pytest.param(_none_token("NONE", ""), r"header alg 'NONE': unsigned", id="alg-NONE"),
    pytest.param(_empty_signature, "signature is empty", id="empty-signature"),
    pytest.param(_hs256_with_public_key, r"alg 'HS256': symmetric \(HMAC\)", id="hs256-pubkey"),
    pytest.param(_embedded_jwk, "header 'jwk' is not accepted", id="embedded-jwk"),
    pytest.param(_header(x5c=["MIIB"]), "header 'x5c' is not accepted", id="x5c"),
    pytest.param(_header(x5t="abc"), "header 'x5t' is not accepted", id="x5t"),
    pytest.param(_header(crit=["exp"], exp=1), r"header crit \['exp'\]: no critical", id="crit"),
    pytest.param(_header(crit=["b64"], b64=True), r"header crit \['b64'\]", id="crit-b64"),
    pytest.param(_kid("../../x"), r"header kid: expected .* got '\.\./\.\./x'", id="kid-traversal"),
    pytest.param(_kid("' OR 1=1 --"), "header kid: expected", id="kid-sql-injection"),
    pytest.param(_kid("k" * 129), "header kid: expected 1 to 128", id="kid-too-long"),
    pytest.param(_kid(""), "header kid: expected", id="kid-empty"),
    pytest.param(_kid(7), "header kid: expected .* got 7", id="kid-not-a-string"),
    pytest.param(_untrusted_key, "signature does not verify with key 'rsa-1'", id="untrusted-key"),
    pytest.param(
        _alg_not_of_key,
        "key 'rsa-1' of issuer 'ci' is for RS256; the token says ES256",
        id="alg-key-mismatch",
    ),
    pytest.param(
        _claims(exp=int(NOW) - 3600),
        re.escape(f"token expired at {_iso(NOW - 3600)} (now {_iso(NOW)}, leeway 30s)"),
        id="expired",
    ),
    pytest.param(_claims(exp=DROP), "claim exp is required", id="missing-exp"),
    pytest.param(_claims(iat=DROP), "claim iat is required", id="missing-iat"),
    pytest.param(_claims(sub=DROP), "claim sub is required", id="missing-sub"),
    pytest.param(_claims(sub=""), "claim sub: expected a non-empty string", id="empty-sub"),
    pytest.param(
        _claims(exp="tomorrow"), "claim exp: expected a finite number", id="exp-not-a-number"
    ),
    pytest.param(_claims(exp=True), "claim exp: expected a finite number", id="exp-bool"),
    pytest.param(
        _claims(nbf=int(NOW) + 3600),
        re.escape(f"token is not valid before {_iso(NOW + 3600)} (now {_iso(NOW)}, leeway 30s)"),
        id="future-nbf",
    ),
    pytest.param(
        _claims(iat=int(NOW) + 3600), "claim iat: token issued in the future", id="future-iat"
    ),
    pytest.param(
        _claims(aud="someone-else"),
        r"claim aud: \['someone-else'\] is not an audience of this broker$",
        id="wrong-aud",
    ),
    pytest.param(_claims(aud=DROP), "claim aud is required", id="missing-aud"),
    pytest.param(
        _claims(aud=[]), "claim aud is required|claim aud: expected a non-empty", id="empty-aud"
    ),
    pytest.param(
        _claims(aud=[AUDIENCE, "other-service"]),
        r"claim aud: \['other-service'\] is not an audience",
        id="extra-aud",
    ),
    pytest.param(
        _claims(exp=253402300800),
        "claim exp: .* is outside the accepted range",
        id="exp-year-10000",
    ),
    pytest.param(
        _claims(iat=-1), "claim iat: .* is outside the accepted range", id="iat-before-1970"
    ),
    pytest.param(
        _claims(nbf=10**30), "claim nbf: .* is outside the accepted range", id="nbf-far-future"
    ),
    pytest.param(
        _claims(aud=[AUDIENCE, 5]),
        "claim aud: expected a non-empty string or list",
        id="aud-not-strings",
    ),
    pytest.param(
        _claims(iss="https://evil.example.com"),
        "issuer 'https://evil.example.com' is not trusted",
        id="wrong-iss",
    ),
    pytest.param(
        _claims(iss=CI + "/"),
        "issuer 'https://ci.example.com/' is not trusted",
        id="iss-trailing-slash",
    ),
    pytest.param(_claims(iss=DROP), "claim iss is required", id="missing-iss"),
    pytest.param(
        _claims(iss=SSO),
        "issuer 'sso' issues people tokens; a workload token is needed",
        id="people-issuer-for-workload",
    ),
    pytest.param(_oversized, f"the limit is {MAX_TOKEN_BYTES}", id="oversized"),
    pytest.param(
        _json_serialisation, "JWS JSON serialisation is not accepted", id="json-serialisation"
    ),
    pytest.param(_jwe, "JWE is not accepted", id="jwe"),
    pytest.param(_segments(4), "expected 3 segments, got 4", id="four-segments"),
    pytest.param(lambda env: "not-a-jwt", "expected 3 segments, got 1", id="one-segment"),
    pytest.param(_padded, "payload is not base64url", id="padded-segment"),
    pytest.param(lambda env: env.token() + "é", "non-ASCII", id="non-ascii"),
    pytest.param(_raw_payload(_DUPLICATE_SUB), "duplicate member 'sub'", id="duplicate-claim"),
    pytest.param(_raw_payload(_NAN_EXP), "NaN is not a JSON number", id="nan-exp"),
    pytest.param(_raw_payload(_HUGE_EXP), "claim exp: expected a finite", id="infinite-exp"),
    pytest.param(_raw_payload(_HUGE_INT_IAT), "claim iat: expected a finite", id="huge-int-iat"),
]


@pytest.mark.parametrize(("make", "match"), CATALOGUE)
def test_catalogue_is_rejected(env: Env, make: Case, match: str) -> None:
    reject(env, make(env), match)


@pytest.mark.parametrize("sub", ["job\x00-7", "job-\ud800", "\udfff"], ids=["nul", "hi", "lo"])
def test_claims_with_nul_or_lone_surrogates_are_rejected(env: Env, sub: str) -> None:
    """JSON escapes can carry NUL and unpaired surrogates; neither reaches the store or log."""
    reject(env, env.token(sub=sub), "payload holds a NUL character or an unpaired surrogate")


def test_a_paired_surrogate_escape_is_a_character_like_any_other(env: Env) -> None:
    assert env.verifier.verify_workload(env.token(sub="job-\U0001f600")).subject == "job-😀"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"iss": "https://nobody.example"}, "untrusted_issuer"),
        ({"exp": int(NOW) - 3600}, "bad_time"),
        ({"aud": "someone-else"}, "bad_claims"),
    ],
)
def test_rejections_name_their_class(env: Env, overrides: dict[str, Any], reason: str) -> None:
    assert reject(env, env.token(**overrides), ".").reason == reason


def test_garbage_and_forgeries_name_their_class(env: Env) -> None:
    assert reject(env, "not-a-jwt", "not a compact JWS").reason == "malformed"
    forged = env.attacker.sign(env.claims())
    assert reject(env, forged, "signature does not verify").reason == "bad_signature"


@pytest.mark.parametrize("header", ["jku", "x5u"])
def test_key_urls_in_header_are_refused_by_the_header_rule(env: Env, header: str) -> None:
    """RFC 8725 §3.10: a token naming where to fetch its key is refused for that alone."""
    attacker = env.attacker.with_kid("attacker-1")
    token = attacker.craft(
        {"alg": "RS256", "kid": "attacker-1", header: "http://127.0.0.1:9/attacker-jwks"},
        env.claims(),
    )
    reject(env, token, f"header '{header}' is not accepted")


@pytest.mark.parametrize("header", ["jku", "x5u"])
def test_key_urls_in_header_are_never_fetched_even_past_the_header_rule(
    env: Env,
    key_server: KeyServer,
    rsa_signer: Signer,
    monkeypatch: pytest.MonkeyPatch,
    header: str,
) -> None:
    """Keys come only from the issuer's configured source: with the header rule out of the way
    (so the verifier reaches its key lookup), the issuer's key set is fetched from the same
    server and the token's own URL, serving the attacker's key, never is."""
    monkeypatch.setattr(
        verifier_module, "FORBIDDEN_HEADERS", tuple(h for h in FORBIDDEN_HEADERS if h != header)
    )
    key_server.serve("/jwks", {"keys": [rsa_signer.jwk()]})
    attacker = env.attacker.with_kid("attacker-1")
    key_server.serve("/attacker-jwks", {"keys": [attacker.jwk()]})
    issuer = {"name": "ci", "issuer": CI, "audiences": [AUDIENCE]}
    policy = make_policy({**issuer, "jwks_uri": key_server.url + "/jwks"})
    keys = JWKSCache(clock=env.clock)
    verifier = Verifier(policy, keys, roles_for=roles_for, clock=env.clock)
    token = attacker.craft(
        {"alg": "RS256", "kid": "attacker-1", header: key_server.url + "/attacker-jwks"},
        env.claims(),
    )
    try:
        with pytest.raises(IdentityRejected, match="attacker-1") as caught:
            verifier.verify_workload(token)
    finally:
        keys.close()
    assert "is not accepted" not in caught.value.description  # not the header rule
    assert "/jwks" in key_server.hits
    assert "/attacker-jwks" not in key_server.hits


def test_alg_outside_issuer_allow_list_is_rejected(env: Env, ec_signer: Signer) -> None:
    issuer = {"name": "ci", "issuer": CI, "audiences": [AUDIENCE], "algorithms": ["RS256"]}
    policy = make_policy({**issuer, "jwks_file": str(env.jwks_path)})
    verifier = Verifier(policy, JWKSCache(clock=env.clock), roles_for=roles_for, clock=env.clock)
    expected = r"alg 'ES256' is not allowed for issuer 'ci' \(allowed: RS256\)"
    with pytest.raises(IdentityRejected, match=expected):
        verifier.verify_workload(ec_signer.sign(env.claims()))


def test_workload_issuer_for_person_is_rejected(env: Env) -> None:
    reject(env, env.token(), "issuer 'ci' issues workload tokens; a people token", person=True)


def test_single_use_issuer_requires_jti(env: Env) -> None:
    token = env.token(GITHUB, repository="acme/evals", repository_owner_id="42", jti=DROP)
    reject(env, token, "claim jti is required: issuer 'github' is single_use")


def test_jti_must_be_a_string(env: Env) -> None:
    reject(env, env.token(jti=12), "token rejected: JWT ID must be a string")


def test_key_rotated_out_is_rejected(env: Env, rsa_signer_2: Signer) -> None:
    old = env.token()
    env.verifier.verify_workload(old)
    write_jwks(env.jwks_path, rsa_signer_2.jwk(), env.ec.jwk(), mtime=NOW + 60)
    reject(env, old, "key 'rsa-1' is not in the key set of issuer 'ci'")
    assert env.verifier.verify_workload(rsa_signer_2.sign(env.claims())).subject == "workload-1"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_weak_rsa_key_is_refused(env: Env) -> None:
    weak = Signer(rsa.generate_private_key(public_exponent=65537, key_size=1024), "RS256", "weak")
    write_jwks(env.jwks_path, weak.jwk(), mtime=NOW + 60)
    reject(env, weak.sign(env.claims()), "key 'weak' of issuer 'ci': The RSA key is 1024 bits")


def test_audience_message_names_the_expected_ones_only_in_the_detail(env: Env) -> None:
    """Anyone may present a token, so its answer names what it had, not what we accept."""
    error = reject(env, env.token(aud=["a", "b"]), r"claim aud: \['a', 'b'\] is not an audience")
    assert "model-broker" not in error.description
    assert re.search(r"expected one of \['model-broker'\], got \['a', 'b'\]", error.detail)
