"""Two brokers on one PostgreSQL database, each with its own data dir and the same KEK: one
set of keys, the same JWKS bytes, rotations on either honoured by both, one audit log key, and
anchors that follow each other's checkpoints."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from broker.api.app import create_app
from broker.cli.main import main
from broker.errors import ConfigError
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from broker.store.tables import EventRow
from tests.conftest import eval_token, exchange_form, person_token
from tests.keys.support import kek_file

pytestmark = pytest.mark.integration

Replica = tuple[TestClient, Broker]


def settings(data_dir: Path, url: str, kek: Path) -> Settings:
    return Settings(
        dev=True, data_dir=data_dir, policy=EXAMPLE_POLICY, database_url=url, kek_file=kek
    )


@contextmanager
def replicas(tmp_path: Path, url: str, n: int = 2) -> Iterator[list[Replica]]:
    kek = kek_file(tmp_path / "kek")
    with ExitStack() as stack:
        started = []
        for i in range(n):
            broker = build_broker(settings(tmp_path / f"replica-{i}", url, kek))
            client = stack.enter_context(TestClient(create_app(broker=broker)))
            started.append((client, broker))
        yield started


def admin(broker: Broker) -> dict[str, str]:
    return {"Authorization": f"Bearer {person_token(broker, 'admin')}"}


def exchange(replica: Replica) -> dict[str, str]:
    client, broker = replica
    resp = client.post("/v1/token", data=exchange_form(eval_token(broker)))
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def active_at(replica: Replica, token: str) -> bool:
    caller = {"Authorization": f"Bearer {person_token(replica[1], 'auditor')}"}
    resp = replica[0].post("/v1/introspect", data={"token": token}, headers=caller)
    assert resp.status_code == 200, resp.text
    return bool(resp.json()["active"])


def test_replicas_serve_one_jwks_and_honour_each_others_tokens(tmp_path: Path, pg_url: str) -> None:
    with replicas(tmp_path, pg_url) as (a, b):
        jwks = a[0].get("/.well-known/jwks.json")
        assert jwks.content == b[0].get("/.well-known/jwks.json").content
        assert jwks.headers["content-type"] == "application/json"
        token = exchange(a)["access_token"]
        assert active_at(b, token)
        # A person token minted by A's dev issuer is B's too: one dev issuer key.
        resp = b[0].post(
            f"/v1/grants/{exchange(a)['grant_id']}/revoke",
            json={"reason": "x"},
            headers=admin(a[1]),
        )
        assert resp.status_code == 200, resp.text
        assert a[1].audit.verifier_key() == b[1].audit.verifier_key()


def test_a_rotation_on_one_replica_is_served_and_honoured_by_the_other(
    tmp_path: Path, pg_url: str
) -> None:
    with replicas(tmp_path, pg_url) as (a, b):
        rotated = a[0].post("/v1/keys/rotate", headers=admin(a[1]))
        assert rotated.status_code == 200, rotated.text
        after = exchange(a)["access_token"]  # signed with the key that just took over
        # Introspection at B meets a kid it has not loaded yet: it looks at the store at once.
        assert active_at(b, after)
        assert b[1].keys.current.kid == rotated.json()["kid"]
        b[1].keys.refresh()  # what B's next use does at most REFRESH_S later
        assert (
            b[0].get("/.well-known/jwks.json").content == a[0].get("/.well-known/jwks.json").content
        )
        kids = [k["kid"] for k in b[0].get("/.well-known/jwks.json").json()["keys"]]
        assert kids[:2] == [rotated.json()["kid"], rotated.json()["next_kid"]]


def test_concurrent_rotations_on_two_replicas_leave_one_ring(tmp_path: Path, pg_url: str) -> None:
    with replicas(tmp_path, pg_url) as (a, b):
        first_next = a[1].keys.next.kid
        answers: list[dict[str, str]] = []
        barrier = threading.Barrier(2)

        def rotate(replica: Replica) -> None:
            headers = admin(replica[1])
            barrier.wait()
            resp = replica[0].post("/v1/keys/rotate", headers=headers)
            assert resp.status_code == 200, resp.text
            answers.append(resp.json())

        threads = [threading.Thread(target=rotate, args=(r,)) for r in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(answers) == 2
        one, two = sorted(answers, key=lambda r: r["kid"] != first_next)
        assert one["kid"] == first_next and two["kid"] == one["next_kid"]
        for _, broker in (a, b):
            broker.keys.refresh()
        assert a[1].keys.jwks_json() == b[1].keys.jwks_json()
        assert a[1].keys.current.kid == two["kid"] and a[1].keys.next.kid == two["next_kid"]
        with a[1].store.read() as s:
            logged = s.scalars(
                select(EventRow.body).where(EventRow.type == "signing_key.rotated")
            ).all()
        assert len(logged) == 2


def test_audit_verify_needs_only_the_database_and_the_kek(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with replicas(tmp_path, pg_url) as (a, b):
        exchange(a)
        exchange(b)
        a[1].maintain()
    elsewhere = tmp_path / "auditor"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no data dir here at all
    monkeypatch.setenv("BROKER_KEK_FILE", str(tmp_path / "kek"))
    assert main(["audit", "verify", "--database-url", pg_url, "--json"]) == 0, capsys.readouterr()
    assert '"ok": true' in capsys.readouterr().out
    assert sorted(p.name for p in elsewhere.iterdir()) == []
    monkeypatch.setenv("BROKER_KEK_FILE", str(kek_file(tmp_path / "other-kek")))
    assert main(["audit", "verify", "--database-url", pg_url]) == 2
    assert f"does not open with the KEK {tmp_path / 'other-kek'}" in capsys.readouterr().err


def test_a_checkpoint_signed_on_one_replica_advances_the_others_anchor(
    tmp_path: Path, pg_url: str
) -> None:
    with replicas(tmp_path, pg_url) as (a, b):
        exchange(a)
        a[1].maintain()  # A signs
        with a[1].store.read() as s:
            signed = a[1].audit.latest_checkpoint(s)
        assert signed is not None and a[1].audit.anchor is not None
        assert b[1].audit.anchor is not None and b[1].audit.anchor.load() is None
        exchange(b)
        with b[1].store.read() as s:
            assert b[1].audit.check(s) is None
        anchored = b[1].audit.anchor.load()
        assert anchored is not None and anchored.size == signed.size
        a[1].maintenance.close()  # A hands the maintenance lease over (as when it stops)
        b[1].maintain()  # B signs on from there; A's anchor accepts B's checkpoint too
        with a[1].store.read() as s:
            assert a[1].audit.check(s) is None
        assert a[1].audit.anchor.load().size > signed.size  # type: ignore[union-attr]
        for _, broker in (a, b):
            assert broker.audit.integrity.problems() == {}


def test_a_replica_with_another_kek_refuses_to_start(tmp_path: Path, pg_url: str) -> None:
    with replicas(tmp_path, pg_url, n=1):
        other = kek_file(tmp_path / "other-kek")
        with pytest.raises(ConfigError, match=f"does not open with the KEK {other}"):
            build_broker(settings(tmp_path / "stranger", pg_url, other))
