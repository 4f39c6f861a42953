"""Three replicas: separate ``broker serve`` processes with data dirs of their own, on one
PostgreSQL database, with one KEK file, one issuer URL and one policy, and nothing else shared.
What one does, the others see (revocations at once, rotations within seconds); killed with
SIGKILL under load, nothing a client was given is lost, the log stays dense and verifies, the
singleton jobs move to a survivor, and a single-use token stays single-use across them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest

from broker.dev.issuer import DevIssuer
from broker.keys.kek import generate
from broker.store.db import Store
from tests.conftest import exchange_form
from tests.integration.replicas import (
    TAKEOVER_S,
    Load,
    Server,
    assert_everything_issued_is_recorded,
    assert_singletons_moved,
    audit_verify,
    broker_env,
    dev_issuer,
    eval_token,
    holder_pid,
    newest_checkpoint,
    race_one_token,
    running,
)
from tests.servers import Postgres, wait_until

pytestmark = pytest.mark.integration

KILLS = 2
ROTATION_S = 5
"""The contract: a rotation on one replica is honoured by every replica within this long."""


@dataclass
class Cluster:
    database: str
    kek_file: Path
    replicas: list[Server]
    store: Store
    issuer: DevIssuer

    def verify_audit(self, workdir: Path) -> None:
        """``broker audit verify`` with nothing but the database URL and the KEK file."""
        env = {k: v for k, v in self.replicas[0].env.items() if k != "BROKER_DATA_DIR"}
        verified = audit_verify(
            "--database-url", self.database, "--data-dir", str(workdir / "none"), env=env
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.fixture(scope="module")
def cluster(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three replicas started together on one new database, once for this module's tests."""
    tmp = tmp_path_factory.mktemp("replicas")
    kek_file = tmp / "kek"
    kek_file.write_text(generate() + "\n")
    os.chmod(kek_file, 0o600)
    with postgres.database() as database:
        env = broker_env(database, kek_file)
        servers = [Server(name, tmp / name, env) for name in ("a", "b", "c")]
        store = Store(database)
        try:
            with running(servers):
                yield Cluster(database, kek_file, servers, store, dev_issuer(store, kek_file))
        finally:
            store.close()


def admin_headers(issuer: DevIssuer) -> dict[str, str]:
    return {"Authorization": f"Bearer {issuer.mint(sub='alice@example.com', roles=['admin'])}"}


def introspect(server: Server, token: str, headers: dict[str, str]) -> dict[str, object]:
    answer = httpx.post(f"{server.url}/v1/introspect", data={"token": token}, headers=headers)
    assert answer.status_code == 200, answer.text
    body: dict[str, object] = answer.json()
    return body


def exchange(server: Server, issuer: DevIssuer) -> dict[str, str]:
    issued = httpx.post(f"{server.url}/v1/token", data=exchange_form(eval_token(issuer)))
    assert issued.status_code == 200, issued.text
    body: dict[str, str] = issued.json()
    return body


def test_what_one_replica_does_the_others_see(cluster: Cluster, tmp_path: Path) -> None:
    a, b, c = cluster.replicas
    admin = admin_headers(cluster.issuer)
    issued = exchange(a, cluster.issuer)
    token, grant_id = issued["access_token"], issued["grant_id"]

    seen = introspect(b, token, admin)
    assert seen["active"] is True and seen["grant_id"] == grant_id
    revoked = httpx.post(
        f"{c.url}/v1/grants/{grant_id}/revoke", json={"reason": "replicas"}, headers=admin
    )
    assert revoked.status_code == 200, revoked.text
    # NOTE: the very next request to another replica: no cache may still say active.
    assert introspect(a, token, admin) == {"active": False}

    def jwks(server: Server) -> bytes:
        return httpx.get(f"{server.url}/.well-known/jwks.json").content

    assert len({jwks(s) for s in cluster.replicas}) == 1
    rotated = httpx.post(f"{b.url}/v1/keys/rotate", headers=admin)
    assert rotated.status_code == 200, rotated.text
    after = exchange(b, cluster.issuer)["access_token"]
    kid = jwt.get_unverified_header(after)["kid"]

    def a_serves_the_new_key() -> bool:
        return kid in {k["kid"] for k in httpx.get(f"{a.url}/.well-known/jwks.json").json()["keys"]}

    assert wait_until(a_serves_the_new_key, timeout=ROTATION_S)
    keys = jwt.PyJWKSet.from_json(jwks(a).decode())
    jwt.decode(
        after,
        next(k for k in keys.keys if k.key_id == kid),
        algorithms=["ES256"],
        options={"verify_aud": False},
    )  # verifies against A's JWKS (raises otherwise)
    assert wait_until(lambda: introspect(c, after, admin).get("active") is True, timeout=ROTATION_S)
    assert wait_until(lambda: len({jwks(s) for s in cluster.replicas}) == 1, timeout=ROTATION_S)

    cluster.verify_audit(tmp_path)


def test_replicas_killed_under_load_lose_nothing_and_hand_the_singletons_on(
    cluster: Cluster, tmp_path: Path
) -> None:
    replicas, store, issuer = cluster.replicas, cluster.store, cluster.issuer
    by_pid = {s.proc.pid: s for s in replicas if s.proc is not None}
    holders = []
    with Load([s.url for s in replicas], issuer) as load:
        assert wait_until(lambda: holder_pid(store) in by_pid, timeout=TAKEOVER_S)
        for _ in range(KILLS):
            pid = holder_pid(store)
            assert pid is not None
            holders.append(pid)
            victim = by_pid.pop(pid)
            signed_before = newest_checkpoint(store)
            served_before = load.count()
            victim.kill()
            victim.start()  # restarting meanwhile; the next kill is of the new holder
            # The singletons move to another process, which goes on signing checkpoints.
            assert_singletons_moved(store, pid, signed_before)
            assert wait_until(
                lambda n=served_before: load.count() > n + 20,  # type: ignore[misc]
                timeout=TAKEOVER_S,
            )
            victim.wait_ready()
            assert victim.proc is not None
            by_pid[victim.proc.pid] = victim
    assert len(set(holders)) == KILLS
    assert_everything_issued_is_recorded(store, load.issued)

    statuses = race_one_token([s.url for s in replicas], issuer)
    assert sorted(statuses) == [200] + [400] * 49, statuses

    cluster.verify_audit(tmp_path)
