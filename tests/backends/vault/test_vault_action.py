"""The GitHub Action (action.yml) with the vault backend: a dynamic PostgreSQL login through
OpenBao, its username and password in GITHUB_ENV, the password masked before anything prints
it, and the login working against the database."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.api.app import create_app
from broker.runtime import Broker
from tests.backends.vault.conftest import VaultSetup
from tests.backends.vault.test_vault_exchange import make_broker
from tests.conftest import EVAL_SUB, EVAL_WORKFLOW, LiveServer, free_port
from tests.github_runner import (
    Runner,
    assert_masked_first,
    run_action,
    serve_runner,
)
from tests.servers import Postgres


@pytest.fixture
def runner() -> Iterator[Runner]:
    """The runner's endpoint; the test makes it hand out dev-issuer tokens."""
    with serve_runner(rsa.generate_private_key(public_exponent=65537, key_size=2048)) as state:
        yield state


pytestmark = pytest.mark.integration


@pytest.fixture
def vault_broker(
    tmp_path: Path, vault: VaultSetup, database: Postgres
) -> Iterator[tuple[LiveServer, Broker]]:
    broker = make_broker(tmp_path / "data", vault)
    port = free_port()
    try:
        with LiveServer(create_app(broker=broker), port) as server:
            yield server, broker
    finally:
        broker.close()


def test_a_database_login_is_masked_and_exported(
    vault_broker: tuple[LiveServer, Broker],
    runner: Runner,
    database: Postgres,
    tmp_path: Path,
) -> None:
    server, broker = vault_broker
    assert broker.dev_issuer is not None
    issuer = broker.dev_issuer
    runner.mint = lambda aud: issuer.mint(
        sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW}, aud=aud
    )
    run = run_action(
        tmp_path,
        runner,
        **{"broker-url": server.url, "model": "llama-7b", "action": "evaluate"},
        backend="vault",
        python=sys.executable,
    )
    assert run.code == 0, run.log
    assert run.outputs["issued-token-type"] == "urn:broker:token-type:database-credentials"
    user, password = run.env["DB_USERNAME"], run.env["DB_PASSWORD"]
    assert_masked_first(run.log, password)
    assert_masked_first(run.log, runner.issued[0])
    with psycopg.connect(
        host=database.host, port=database.port, user=user, password=password, dbname="postgres"
    ) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
