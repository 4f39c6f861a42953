"""The vault backend over HTTPS: the broker's Vault token goes only to a server whose
certificate chains to the configured CA (``VAULT_CACERT``), and nothing in the environment
widens that trust."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.backends.vault import StaticToken, VaultBackend, plan_vault
from broker.errors import BackendUnavailable
from tests.backends.vault.conftest import (
    EXAMPLE_CONFIG,
    apply_plan,
    broker_token,
    example_policy,
    make_grant,
)
from tests.servers import OpenBao, require_bao, run_openbao

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpenBao, str]]:
    """An OpenBao dev server with its own CA, set up from the plan; and the broker's token."""
    with run_openbao(require_bao(), tmp_path_factory.mktemp("openbao-tls"), tls=True) as bao:
        plan = plan_vault(example_policy().policy, EXAMPLE_CONFIG)
        apply_plan(bao.root, plan)
        yield bao, broker_token(bao.root, plan, 600)


def _backend(bao: OpenBao, token: str, verify: bool | str) -> VaultBackend:
    return VaultBackend(
        bao.url, StaticToken(token), example_policy(), config=EXAMPLE_CONFIG, verify=verify
    )


def test_the_configured_ca_is_trusted(tls_vault: tuple[OpenBao, str]) -> None:
    bao, token = tls_vault
    assert bao.url.startswith("https://") and bao.ca is not None
    backend = _backend(bao, token, str(bao.ca))
    try:
        grant = make_grant()
        cred = backend.issue(grant)
        assert bao.client(cred.access_token).auth.token.lookup_self()["data"]["meta"][
            "grant_id"
        ] == (grant.id)
        assert backend.revoke(grant, cred.credential_ref) is True
        assert not bao.token_works(cred.access_token)
    finally:
        backend.close()


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_a_server_outside_the_trusted_cas_gets_nothing(
    tls_vault: tuple[OpenBao, str], monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    bao, token = tls_vault
    assert bao.ca is not None
    # The environment names the server's CA; the broker's settings do not, so it is not trusted.
    monkeypatch.setenv(variable, str(bao.ca))
    seen = len(bao.audit_entries())
    backend = _backend(bao, token, True)
    try:
        with pytest.raises(BackendUnavailable, match=r"is unreachable: SSLError while trying to"):
            backend.issue(make_grant())
    finally:
        backend.close()
    assert len(bao.audit_entries()) == seen, "a request reached a server the broker does not trust"


def test_a_ca_that_does_not_match_is_refused(
    tls_vault: tuple[OpenBao, str], tmp_path: Path
) -> None:
    bao, token = tls_vault
    other = tmp_path / "other-ca.pem"
    other.write_bytes(_self_signed_ca())
    backend = _backend(bao, token, str(other))
    try:
        with pytest.raises(BackendUnavailable, match="SSLError"):
            backend.check()
    finally:
        backend.close()


def _self_signed_ca() -> bytes:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)
