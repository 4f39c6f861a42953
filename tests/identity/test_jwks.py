"""JWKSCache against a real HTTP server on 127.0.0.1 and real files, with a movable clock."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jwt.algorithms import RSAAlgorithm

from broker.errors import ConfigError, IdentityRejected
from broker.identity import JWKSCache
from broker.identity.verifier import KeysNotReady
from broker.policy.model import IssuerConfig

from .support import NOW, Clock, KeyServer, Signer, jwks, write_jwks

JWKS_PATH = "/jwks"


def issuer(**fields: Any) -> IssuerConfig:
    config = {"name": "idp", "issuer": "https://idp.example.com", "audiences": ["model-broker"]}
    return IssuerConfig.model_validate(config | fields)


@pytest.fixture
def cache(clock: Clock) -> Iterator[JWKSCache]:
    cache = JWKSCache(clock=clock, min_refresh_interval=30, refresh_after=300)
    yield cache
    cache.close()


@pytest.fixture
def remote(key_server: KeyServer, rsa_signer: Signer) -> IssuerConfig:
    key_server.serve(JWKS_PATH, jwks(rsa_signer.jwk()))
    return issuer(jwks_uri=key_server.url + JWKS_PATH, max_key_age="1h")


def lookup_concurrently(cache: JWKSCache, config: IssuerConfig, kid: str) -> list[str | None]:
    """Eight threads released at once, each looking up ``kid``; their results."""
    barrier = threading.Barrier(8)
    found: list[str | None] = []

    def lookup() -> None:
        barrier.wait()
        found.append(cache.key_for(config, kid).key_id)

    threads = [threading.Thread(target=lookup) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    return found


def test_fetches_once_and_caches(
    cache: JWKSCache, remote: IssuerConfig, key_server: KeyServer, rsa_signer: Signer
) -> None:
    first = cache.key_for(remote, "rsa-1")
    assert cache.key_for(remote, "rsa-1") is first
    assert first.key_id == "rsa-1"
    assert key_server.count(JWKS_PATH) == 1


def test_oidc_discovery(cache: JWKSCache, key_server: KeyServer, rsa_signer: Signer) -> None:
    key_server.serve(
        "/.well-known/openid-configuration",
        {"issuer": key_server.url, "jwks_uri": key_server.url + JWKS_PATH},
    )
    key_server.serve(JWKS_PATH, jwks(rsa_signer.jwk()))
    assert cache.key_for(issuer(issuer=key_server.url), "rsa-1").key_id == "rsa-1"
    assert key_server.hits == ["/.well-known/openid-configuration", JWKS_PATH]


def test_discovery_must_name_the_configured_issuer(
    cache: JWKSCache, key_server: KeyServer, rsa_signer: Signer
) -> None:
    key_server.serve(
        "/.well-known/openid-configuration",
        {"issuer": "https://evil.example.com", "jwks_uri": key_server.url + JWKS_PATH},
    )
    key_server.serve(JWKS_PATH, jwks(rsa_signer.jwk()))
    with pytest.raises(
        IdentityRejected, match=r"names issuer 'https://evil.example.com', expected"
    ):
        cache.key_for(issuer(issuer=key_server.url), "rsa-1")
    assert JWKS_PATH not in key_server.hits


@pytest.mark.parametrize(
    "fields",
    [
        {"jwks_uri": "http://idp.example.com/jwks"},
        {"issuer": "http://idp.example.com"},
        {"jwks_uri": "http://127.0.0.1.nip.io/jwks"},
        {"jwks_uri": "ftp://127.0.0.1/jwks"},
    ],
)
def test_fetched_urls_must_be_https_unless_loopback(
    cache: JWKSCache, fields: dict[str, str]
) -> None:
    with pytest.raises(IdentityRejected, match="must use https"):
        cache.key_for(issuer(**fields), "rsa-1")


def test_discovered_jwks_uri_must_be_https(cache: JWKSCache, key_server: KeyServer) -> None:
    key_server.serve(
        "/.well-known/openid-configuration",
        {"issuer": key_server.url, "jwks_uri": "http://keys.example.com/jwks"},
    )
    with pytest.raises(IdentityRejected, match=r"http://keys.example.com/jwks must use https"):
        cache.key_for(issuer(issuer=key_server.url), "rsa-1")


def test_redirects_are_not_followed(
    cache: JWKSCache, key_server: KeyServer, rsa_signer: Signer
) -> None:
    key_server.serve("/moved", {}, status=302, Location=key_server.url + JWKS_PATH)
    key_server.serve(JWKS_PATH, jwks(rsa_signer.jwk()))
    with pytest.raises(IdentityRejected, match="HTTP 302"):
        cache.key_for(issuer(jwks_uri=key_server.url + "/moved"), "rsa-1")
    assert key_server.hits == ["/moved"]


def test_unknown_kid_triggers_a_refresh(
    cache: JWKSCache,
    remote: IssuerConfig,
    key_server: KeyServer,
    clock: Clock,
    rsa_signer: Signer,
    rsa_signer_2: Signer,
) -> None:
    cache.key_for(remote, "rsa-1")
    key_server.serve(JWKS_PATH, jwks(rsa_signer.jwk(), rsa_signer_2.jwk()))
    clock.advance(31)
    assert cache.key_for(remote, "rsa-2").key_id == "rsa-2"
    assert key_server.count(JWKS_PATH) == 2


def test_unknown_kid_refresh_is_rate_limited(
    cache: JWKSCache, remote: IssuerConfig, key_server: KeyServer, clock: Clock
) -> None:
    cache.key_for(remote, "rsa-1")
    for _ in range(5):
        clock.advance(1)
        with pytest.raises(IdentityRejected, match="key 'nope' is not in the key set"):
            cache.key_for(remote, "nope")
    assert key_server.count(JWKS_PATH) == 1
    clock.advance(30)
    with pytest.raises(IdentityRejected):
        cache.key_for(remote, "nope")
    assert key_server.count(JWKS_PATH) == 2


def test_concurrent_unknown_kid_requests_fetch_once(
    cache: JWKSCache,
    remote: IssuerConfig,
    key_server: KeyServer,
    clock: Clock,
    rsa_signer: Signer,
    rsa_signer_2: Signer,
) -> None:
    cache.key_for(remote, "rsa-1")
    key_server.serve(JWKS_PATH, jwks(rsa_signer.jwk(), rsa_signer_2.jwk()))
    key_server.delay = 0.2
    clock.advance(31)
    found = lookup_concurrently(cache, remote, "rsa-2")
    assert found == ["rsa-2"] * 8
    assert key_server.count(JWKS_PATH) == 2


def test_waiting_requests_reuse_the_fetch_they_waited_for(
    clock: Clock,
    remote: IssuerConfig,
    key_server: KeyServer,
    rsa_signer: Signer,
    rsa_signer_2: Signer,
) -> None:
    """Even without a rate limit, threads queued behind a refresh do not fetch again."""
    cache = JWKSCache(clock=clock, min_refresh_interval=0)
    cache.key_for(remote, "rsa-1")
    key_server.serve(JWKS_PATH, jwks(rsa_signer.jwk(), rsa_signer_2.jwk()))
    key_server.delay = 0.2
    found = lookup_concurrently(cache, remote, "rsa-2")
    cache.close()
    assert found == ["rsa-2"] * 8
    assert key_server.count(JWKS_PATH) == 2


def test_old_set_is_refreshed(
    cache: JWKSCache, remote: IssuerConfig, key_server: KeyServer, clock: Clock
) -> None:
    cache.key_for(remote, "rsa-1")
    clock.advance(299)
    cache.key_for(remote, "rsa-1")
    assert key_server.count(JWKS_PATH) == 1
    clock.advance(1)
    cache.key_for(remote, "rsa-1")
    assert key_server.count(JWKS_PATH) == 2


def test_refresh_comes_before_max_key_age(
    cache: JWKSCache, key_server: KeyServer, rsa_signer: Signer, clock: Clock
) -> None:
    key_server.serve(JWKS_PATH, jwks(rsa_signer.jwk()))
    short = issuer(jwks_uri=key_server.url + JWKS_PATH, max_key_age=120)
    cache.key_for(short, "rsa-1")
    clock.advance(60)
    cache.key_for(short, "rsa-1")
    assert key_server.count(JWKS_PATH) == 2


def test_key_rotated_out_is_rejected(
    cache: JWKSCache,
    remote: IssuerConfig,
    key_server: KeyServer,
    clock: Clock,
    rsa_signer_2: Signer,
) -> None:
    cache.key_for(remote, "rsa-1")
    key_server.serve(JWKS_PATH, jwks(rsa_signer_2.jwk()))
    clock.advance(300)
    with pytest.raises(IdentityRejected, match=r"key 'rsa-1' is not in the key set .* rotated out"):
        cache.key_for(remote, "rsa-1")
    assert cache.key_for(remote, "rsa-2").key_id == "rsa-2"


@pytest.mark.parametrize("outage", ["http-500", "server-down"])
def test_failed_refresh_keeps_last_good_set(
    cache: JWKSCache, remote: IssuerConfig, key_server: KeyServer, clock: Clock, outage: str
) -> None:
    good = cache.key_for(remote, "rsa-1")
    if outage == "http-500":
        key_server.serve(JWKS_PATH, {"error": "boom"}, status=500)
    else:
        key_server.stop()
    clock.advance(301)
    assert cache.key_for(remote, "rsa-1") is good


def test_invalid_refreshed_set_keeps_last_good_set(
    cache: JWKSCache, remote: IssuerConfig, key_server: KeyServer, clock: Clock
) -> None:
    good = cache.key_for(remote, "rsa-1")
    key_server.serve(JWKS_PATH, {"keys": []})
    clock.advance(301)
    assert cache.key_for(remote, "rsa-1") is good
    assert key_server.count(JWKS_PATH) == 2


def test_stale_keys_are_rejected(
    cache: JWKSCache, remote: IssuerConfig, key_server: KeyServer, clock: Clock
) -> None:
    cache.key_for(remote, "rsa-1")
    key_server.stop()
    clock.advance(3601)
    expected = "keys for issuer 'idp' are stale: last refreshed 3601 s ago, bound 3600 s"
    with pytest.raises(IdentityRejected, match=expected):
        cache.key_for(remote, "rsa-1")


def test_stale_keys_recover_when_the_server_returns(
    cache: JWKSCache, remote: IssuerConfig, key_server: KeyServer, clock: Clock
) -> None:
    cache.key_for(remote, "rsa-1")
    key_server.serve(JWKS_PATH, {}, status=503)
    clock.advance(3601)
    with pytest.raises(IdentityRejected, match="stale"):
        cache.key_for(remote, "rsa-1")
    key_server.routes.clear()
    with pytest.raises(IdentityRejected, match="stale"):  # rate-limited: not retried yet
        cache.key_for(remote, "rsa-1")
    assert key_server.count(JWKS_PATH) == 2


def test_first_fetch_failure_rejects(cache: JWKSCache, key_server: KeyServer) -> None:
    missing = issuer(jwks_uri=key_server.url + "/missing")
    with pytest.raises(IdentityRejected, match=r"keys for issuer 'idp' are unavailable: .* 404"):
        cache.key_for(missing, "rsa-1")


def test_unusable_entries_are_ignored(
    cache: JWKSCache, key_server: KeyServer, rsa_signer: Signer, rsa_signer_2: Signer
) -> None:
    private = json.loads(RSAAlgorithm.to_jwk(rsa_signer_2.private_key))  # a full private JWK
    private.update({"kid": "private", "use": "sig"})
    key_server.serve(
        JWKS_PATH,
        jwks(
            {"kty": "oct", "kid": "symmetric", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"},
            rsa_signer_2.with_kid("encryption").jwk(use="enc"),
            rsa_signer_2.with_kid("hmac-alg").jwk(alg="HS256"),
            rsa_signer_2.with_kid("list-alg").jwk(alg=["RS256"]),
            private,
            {"kty": "RSA", "kid": "broken", "n": "x", "e": "AQAB"},
            "not-an-object",
            rsa_signer.jwk(),
        ),
    )
    config = issuer(jwks_uri=key_server.url + JWKS_PATH)
    for kid in ("symmetric", "encryption", "hmac-alg", "list-alg", "private", "broken"):
        with pytest.raises(IdentityRejected, match=f"key '{kid}' is not in the key set"):
            cache.key_for(config, kid)
    assert cache.key_for(config, "rsa-1").key_id == "rsa-1"
    assert cache.key_for(config, None).key_id == "rsa-1"  # the only usable key


def test_set_without_usable_keys_is_unavailable(cache: JWKSCache, key_server: KeyServer) -> None:
    key_server.serve(JWKS_PATH, jwks({"kty": "oct", "kid": "s", "k": "c2VjcmV0"}))
    with pytest.raises(IdentityRejected, match="no usable signing keys"):
        cache.key_for(issuer(jwks_uri=key_server.url + JWKS_PATH), "s")


def test_token_without_kid_needs_a_single_key(
    cache: JWKSCache, key_server: KeyServer, rsa_signer: Signer, ec_signer: Signer
) -> None:
    key_server.serve(JWKS_PATH, jwks(rsa_signer.with_kid(None).jwk()))
    single = issuer(jwks_uri=key_server.url + JWKS_PATH)
    assert cache.key_for(single, None).key_type == "RSA"
    key_server.serve("/two", jwks(rsa_signer.with_kid(None).jwk(), ec_signer.jwk()))
    two = issuer(name="two", issuer="https://two.example.com", jwks_uri=key_server.url + "/two")
    with pytest.raises(IdentityRejected, match="token has no kid and issuer 'two' has 2 usable"):
        cache.key_for(two, None)


def test_duplicate_kid_is_ambiguous(
    cache: JWKSCache, key_server: KeyServer, rsa_signer: Signer, rsa_signer_2: Signer
) -> None:
    key_server.serve(JWKS_PATH, jwks(rsa_signer.jwk(), rsa_signer_2.with_kid("rsa-1").jwk()))
    with pytest.raises(IdentityRejected, match="key 'rsa-1' appears more than once"):
        cache.key_for(issuer(jwks_uri=key_server.url + JWKS_PATH), "rsa-1")


def test_file_is_reread_when_it_changes(
    cache: JWKSCache, tmp_path: Path, rsa_signer: Signer, rsa_signer_2: Signer
) -> None:
    path = tmp_path / "keys.json"
    write_jwks(path, rsa_signer.jwk(), mtime=NOW)
    config = issuer(jwks_file=path)
    assert cache.key_for(config, "rsa-1").key_id == "rsa-1"
    write_jwks(path, rsa_signer_2.jwk(), mtime=NOW + 10)
    assert cache.key_for(config, "rsa-2").key_id == "rsa-2"
    with pytest.raises(IdentityRejected, match="key 'rsa-1' is not in the key set"):
        cache.key_for(config, "rsa-1")


def test_broken_file_keeps_last_good_set_until_stale(
    cache: JWKSCache, tmp_path: Path, rsa_signer: Signer, clock: Clock
) -> None:
    path = tmp_path / "keys.json"
    write_jwks(path, rsa_signer.jwk(), mtime=NOW)
    config = issuer(jwks_file=path, max_key_age="1h")
    good = cache.key_for(config, "rsa-1")
    path.write_text("{not json")
    clock.advance(60)
    assert cache.key_for(config, "rsa-1") is good
    clock.advance(3600)
    with pytest.raises(IdentityRejected, match="stale: last refreshed 3660 s ago, bound 3600 s"):
        cache.key_for(config, "rsa-1")


def test_missing_file_is_unavailable(cache: JWKSCache, tmp_path: Path) -> None:
    with pytest.raises(IdentityRejected, match=r"are unavailable: cannot read .*nope.json"):
        cache.key_for(issuer(jwks_file=tmp_path / "nope.json"), "rsa-1")


def test_unchanged_file_stays_fresh(
    cache: JWKSCache, tmp_path: Path, rsa_signer: Signer, clock: Clock
) -> None:
    path = tmp_path / "keys.json"
    write_jwks(path, rsa_signer.jwk(), mtime=NOW)
    config = issuer(jwks_file=path, max_key_age="1h")
    for _ in range(3):
        clock.advance(3000)
        assert cache.key_for(config, "rsa-1").key_id == "rsa-1"


def test_dev_issuer_uses_static_keys(
    clock: Clock, key_server: KeyServer, rsa_signer: Signer
) -> None:
    cache = JWKSCache(clock=clock, static={"dev": jwks(rsa_signer.jwk())})
    dev = issuer(name="dev", issuer=key_server.url, dev=True)
    assert cache.key_for(dev, "rsa-1").key_id == "rsa-1"
    clock.advance(10 * 86400)
    assert cache.key_for(dev, "rsa-1").key_id == "rsa-1"
    assert key_server.hits == []


def test_static_keys_never_replace_a_real_issuers_source(
    clock: Clock, key_server: KeyServer, rsa_signer: Signer
) -> None:
    cache = JWKSCache(clock=clock, static={"idp": jwks(rsa_signer.jwk())})
    with pytest.raises(IdentityRejected, match=r"unavailable: .* 404"):
        cache.key_for(issuer(jwks_uri=key_server.url + "/nothing-here"), "rsa-1")


def test_dev_issuer_without_static_keys_is_rejected(cache: JWKSCache) -> None:
    with pytest.raises(IdentityRejected, match="dev issuer 'dev' has no in-process keys"):
        cache.key_for(issuer(name="dev", dev=True), "rsa-1")


def test_invalid_static_keys_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="static keys of issuer 'dev'"):
        JWKSCache(static={"dev": {"keys": []}})


def test_age_is_the_time_since_the_last_good_fetch(
    cache: JWKSCache, remote: IssuerConfig, key_server: KeyServer, clock: Clock
) -> None:
    assert cache.age(remote) is None  # no token needed the keys yet: nothing is fetched
    assert key_server.hits == []
    cache.key_for(remote, "rsa-1")
    assert cache.age(remote) == 0
    clock.advance(200)
    assert cache.age(remote) == 200  # cached keys used, not refreshed
    key_server.serve(JWKS_PATH, {"error": "boom"}, status=500)
    clock.advance(101)
    cache.key_for(remote, "rsa-1")  # the refresh fails; the last good set is kept
    assert cache.age(remote) == 301
    assert key_server.count(JWKS_PATH) == 2
    assert cache.age(issuer(dev=True)) is None


def test_age_is_none_for_an_issuer_that_never_got_good_keys(
    cache: JWKSCache, key_server: KeyServer
) -> None:
    key_server.serve(JWKS_PATH, {"error": "boom"}, status=500)
    broken = issuer(jwks_uri=key_server.url + JWKS_PATH)
    with pytest.raises(IdentityRejected):
        cache.key_for(broken, "rsa-1")
    assert cache.age(broken) is None


def test_offline_key_for_answers_from_memory_or_says_it_would_fetch_or_read(
    cache: JWKSCache,
    remote: IssuerConfig,
    key_server: KeyServer,
    rsa_signer: Signer,
    clock: Clock,
    tmp_path: Path,
) -> None:
    """The event loop verifies a token itself only with ``offline``: keys fetched and not due
    for a refresh (and knowing the kid), or a file read and unchanged since. Offline never
    fetches or reads; it raises KeysNotReady where the online lookup would."""
    with pytest.raises(KeysNotReady):  # nothing fetched yet
        cache.key_for(remote, "rsa-1", offline=True)
    assert key_server.count(JWKS_PATH) == 0
    fetched = cache.key_for(remote, "rsa-1")
    assert cache.key_for(remote, "rsa-1", offline=True) is fetched
    with pytest.raises(KeysNotReady):  # an unknown kid would refresh
        cache.key_for(remote, "rsa-unknown", offline=True)
    clock.advance(301)  # past refresh_after: due
    with pytest.raises(KeysNotReady):
        cache.key_for(remote, "rsa-1", offline=True)
    assert key_server.count(JWKS_PATH) == 1

    path = tmp_path / "jwks.json"
    write_jwks(path, rsa_signer.jwk(), mtime=NOW - 10)
    local = issuer(name="local", jwks_file=str(path))
    with pytest.raises(KeysNotReady):
        cache.key_for(local, "rsa-1", offline=True)
    cache.key_for(local, "rsa-1")
    assert cache.key_for(local, "rsa-1", offline=True).key_id == "rsa-1"
    write_jwks(path, rsa_signer.jwk(), mtime=NOW)  # changed: key_for would read it again
    with pytest.raises(KeysNotReady):
        cache.key_for(local, "rsa-1", offline=True)
