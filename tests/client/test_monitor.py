"""`broker audit monitor` (issue 13): a monitor that saw a checkpoint catches a rewritten or
rolled-back history served later, against a real broker over HTTP restarted on its data dir."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.api.app import create_app
from broker.audit.anchor import ANCHOR_FILE
from broker.audit.checkpoint import NoteSigner
from broker.cli.main import main
from broker.runtime import Broker, build_broker
from tests.audit.conftest import settings
from tests.audit.tamper import event_index, rewrite_history
from tests.conftest import LiveServer, eval_token, exchange_form, free_port, person_token


@contextmanager
def live(data_dir: Path, port: int) -> Iterator[tuple[str, Broker]]:
    """A broker serving ``data_dir`` on ``port`` (the same address across restarts)."""
    broker = build_broker(settings(data_dir, port=port))
    with LiveServer(create_app(broker=broker), port) as server:
        yield server.url, broker


class Scene:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.data_dir = tmp_path / "data"
        self.state = tmp_path / "monitor.json"
        self.port = free_port()
        self._monkeypatch = monkeypatch

    def serve(self) -> Any:
        return live(self.data_dir, self.port)

    def auditor(self, broker: Broker) -> None:
        self._monkeypatch.setenv("BROKER_TOKEN", person_token(broker, "auditor"))

    def exchange(self, url: str, broker: Broker, n: int = 1) -> None:
        for _ in range(n):
            form = exchange_form(eval_token(broker))
            assert httpx.post(f"{url}/v1/token", data=form).status_code == 200


@pytest.fixture
def scene(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Scene:
    return Scene(tmp_path, monkeypatch)


def monitor(
    capsys: pytest.CaptureFixture[str], url: str, state: Path, *extra: str
) -> tuple[int, str, str]:
    code = main(["audit", "monitor", "--url", url, "--state", str(state), "--once", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_each_checkpoint_must_extend_the_last_one_seen(
    scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    with scene.serve() as (url, broker):
        scene.auditor(broker)
        key = broker.audit.verifier_key()
        scene.exchange(url, broker, 2)
        code, out, err = monitor(capsys, url, scene.state, "--key", key)
        assert code == 0, err
        assert out.startswith("ok: checkpoint 3 verified and remembered")
        seen = json.loads(scene.state.read_text())
        assert (seen["size"], seen["key"]) == (3, key)
        scene.exchange(url, broker, 3)
        code, out, err = monitor(capsys, url, scene.state)  # the pinned key from now on
        assert (code, out.strip()) == (0, "ok: checkpoint 6 extends 3"), err
        code, out, _ = monitor(capsys, url, scene.state, "--json")
        assert code == 0 and json.loads(out) == {"ok": True, "previous": 6, "size": 6}


def test_a_rewritten_history_raises_the_alarm(
    scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    with scene.serve() as (url, broker):
        scene.auditor(broker)
        scene.exchange(url, broker, 3)
        assert monitor(capsys, url, scene.state, "--key", broker.audit.verifier_key())[0] == 0
    grant = _first_grant(scene.data_dir)

    def subject(event: dict[str, Any]) -> None:
        event["identity"]["subject"] = "repo:acme/innocent:ref:refs/heads/main"

    rewrite_history(
        scene.data_dir, {event_index(scene.data_dir, "exchange.allowed", grant): subject}
    )
    with scene.serve() as (url, broker):
        scene.auditor(broker)
        # With its anchor, the broker refuses to sign over it: nothing new for the monitor.
        code, _, err = monitor(capsys, url, scene.state)
        assert code == 3 and "audit_integrity" in err
    # Whoever also holds the data dir removes the anchor: the broker now signs the forgery.
    (scene.data_dir / ANCHOR_FILE).unlink()
    with scene.serve() as (url, broker):
        scene.auditor(broker)
        before = scene.state.read_text()
        code, _, err = monitor(capsys, url, scene.state)
        assert code == 1
        assert err.startswith("ALARM: checkpoint 6 is not consistent with checkpoint 4 seen")
        assert scene.state.read_text() == before  # the alarm is not forgotten on the next run
        assert monitor(capsys, url, scene.state)[0] == 1


def _first_grant(data_dir: Path) -> str:
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(data_dir / "broker.db")) as db:
        (grant,) = db.execute("SELECT id FROM grants ORDER BY issued_at, id").fetchone()
    return str(grant)


def test_a_rolled_back_log_raises_the_alarm(
    scene: Scene, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backup = tmp_path / "broker.db.bak"
    with scene.serve() as (url, broker):
        scene.auditor(broker)
        scene.exchange(url, broker)
    shutil.copy(scene.data_dir / "broker.db", backup)
    with scene.serve() as (url, broker):
        scene.auditor(broker)
        scene.exchange(url, broker, 4)
        assert monitor(capsys, url, scene.state, "--key", broker.audit.verifier_key())[0] == 0
    for suffix in ("-wal", "-shm"):
        (scene.data_dir / f"broker.db{suffix}").unlink(missing_ok=True)
    shutil.copy(backup, scene.data_dir / "broker.db")
    (scene.data_dir / ANCHOR_FILE).unlink()
    with scene.serve() as (url, broker):
        scene.auditor(broker)
        code, _, err = monitor(capsys, url, scene.state)
        assert code == 1 and err.startswith("ALARM: the log shrank: checkpoint 3 served after 7")


def test_a_checkpoint_signed_by_another_key_raises_the_alarm(
    scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    with scene.serve() as (url, broker):
        scene.auditor(broker)
        other = NoteSigner(broker.audit.origin, Ed25519PrivateKey.generate()).verifier_key()
        code, _, err = monitor(capsys, url, scene.state, "--key", other, "--json")
        assert code == 1
        assert json.loads(err)["error"] == "audit_inconsistent"
        assert "no signature by key" in json.loads(err)["error_description"]
        assert not scene.state.exists()


def test_a_state_file_pinned_to_another_key_is_a_usage_error(
    scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    with scene.serve() as (url, broker):
        scene.auditor(broker)
        code, _, err = monitor(capsys, url, scene.state)  # first use: the served key, pinned
        assert code == 0 and "trust on first use" in err
        other = NoteSigner(broker.audit.origin, Ed25519PrivateKey.generate()).verifier_key()
        code, _, err = monitor(capsys, url, scene.state, "--key", other)
        assert code == 2 and "pins another verifier key" in err


def test_the_monitor_loads_nothing_of_the_server(
    scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    """It runs on auditors' machines: a whole check, in a fresh interpreter, imports none of
    the server's dependencies."""
    probe = (
        "import sys\n"
        "from broker.cli.main import main\n"
        "code = main(['audit', 'monitor', '--url', sys.argv[1], '--state', sys.argv[2], "
        "'--once', '--json'])\n"
        "heavy = {'fastapi', 'starlette', 'sqlalchemy', 'hvac', 'boto3', 'botocore', 'uvicorn',"
        " 'alembic', 'prometheus_client', 'pydantic', 'orjson'}\n"
        "print(code, sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    with scene.serve() as (url, broker):
        env = {**os.environ, "BROKER_TOKEN": person_token(broker, "auditor")}
        done = subprocess.run(
            [sys.executable, "-c", probe, url, str(scene.state)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env=env,
        )
    assert done.stdout.strip().splitlines()[-1] == "0 []", done.stderr
