"""The CLI under delegated administration (issue 17): the commands call the same routes, so a
vendor-scoped person's CLI lists and revokes only the vendor's models, and `token exchange
--emergency` is the break-glass path, said out loud."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import Settings
from tests.cli.test_main import run
from tests.conftest import LiveServer, eval_token, exchange_form, free_port, person_token
from tests.vendor import SCOPED_ROLES, VENDOR_SUB, vendor_policy


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[LiveServer, Broker]]:
    port = free_port()
    policy = vendor_policy(tmp_path, roles=SCOPED_ROLES)
    broker = build_broker(Settings(dev=True, data_dir=tmp_path / "d", policy=policy, port=port))
    with LiveServer(create_app(broker=broker), port) as server:
        yield server, broker


def test_a_vendor_scoped_cli_sees_and_revokes_the_vendors_models_only(
    live: tuple[LiveServer, Broker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, broker = live
    assert broker.dev_issuer is not None
    url = ("--url", server.url)
    job = tmp_path / "job.jwt"
    job.write_text(broker.dev_issuer.mint(sub=VENDOR_SUB))
    code, out, _ = run(
        capsys,
        "token",
        "exchange",
        "--token",
        str(job),
        "--model",
        "vendor-llm",
        "--action",
        "evaluate",
        "--json",
        *url,
    )
    assert code == 0, out
    vendor_grant = json.loads(out)["grant_id"]
    llama = httpx.post(f"{server.url}/v1/token", data=exchange_form(eval_token(broker))).json()

    vendor = person_token(broker, "vendor-ops", sub="vera@vendor.example")
    monkeypatch.setenv("BROKER_TOKEN", vendor)
    code, out, _ = run(capsys, "grants", "list", "--json", *url)
    assert code == 0 and [g["id"] for g in json.loads(out)] == [vendor_grant]
    code, _, err = run(capsys, "grants", "show", llama["grant_id"], *url)
    assert code == 1 and "not among them" in err
    code, _, err = run(capsys, "revoke", "--model", "llama-7b", "--reason", "x", *url)
    assert code == 1 and "insufficient_role" in err
    code, out, _ = run(capsys, "revoke", "--issuer", "dev", "--reason", "x", *url)
    assert code == 0 and out.strip() == "revoked 1 grant(s)"
    assert str(broker.grants.get(llama["grant_id"]).status) == "active"


def test_token_exchange_emergency_says_it_out_loud(
    live: tuple[LiveServer, Broker], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, broker = live
    assert broker.dev_issuer is not None
    job = tmp_path / "job.jwt"
    job.write_text(broker.dev_issuer.mint(sub=VENDOR_SUB))
    common = ("token", "exchange", "--token", str(job), "--model", "vendor-llm")
    common += ("--action", "hotfix", "--url", server.url)
    code, _, err = run(capsys, *common, "--emergency", "--wait")
    assert code == 2 and "no --wait, no --approval-id" in err
    code, out, err = run(capsys, *common, "--emergency", "--reason", "INC-1")
    assert code == 0 and out.startswith("ey"), err
    assert err.startswith("EMERGENCY use recorded: approval a_") and "must be approved by" in err
