"""Shared fixtures: a dev-mode broker in a temporary data dir, and a live HTTP server for it."""

from __future__ import annotations

import functools
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import botocore.loaders
import botocore.session
import pytest
import uvicorn
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.servers import (
    OpenBao,
    Part,
    Postgres,
    postgres_missing,
    require,
    require_bao,
    run_openbao,
    run_postgres,
    unavailable,
)

EVAL_SUB = "repo:acme/evals:ref:refs/heads/main"
EVAL_WORKFLOW = "acme/workflows/.github/workflows/eval.yml@refs/heads/main"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def _no_instance_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests stay on loopback: a broker whose policy has aws models but that has no AWS
    credentials must not ask the instance-metadata address (169.254.169.254) for them."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session", autouse=True)
def _one_botocore_data_loader() -> Iterator[None]:
    """Every boto3/botocore session of the test process reads botocore's bundled JSON (service
    models, endpoints.json) through one shared loader instead of parsing it again.

    NOTE: only a cache of read-only files keyed by the data path (AWS_DATA_PATH): sessions,
    credentials, clients and their config stay per session, in the tests and in the broker. A
    fresh session cost about 0.16 s of JSON parsing on this machine, and the AWS tests make
    several per test (the broker's, the test's admin clients, each credential they check).
    """
    with pytest.MonkeyPatch.context() as patch:
        shared = functools.lru_cache(maxsize=None)(botocore.loaders.create_loader)
        patch.setattr(botocore.session, "create_loader", shared)
        yield


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def broker(data_dir: Path) -> Iterator[Broker]:
    b = build_broker(Settings(dev=True, data_dir=data_dir, policy=EXAMPLE_POLICY, port=8080))
    yield b
    b.close()


@pytest.fixture
def client(broker: Broker) -> Iterator[TestClient]:
    with TestClient(create_app(broker=broker)) as c:
        yield c


def eval_token(broker: Broker, **overrides: object) -> str:
    """A dev workload token that the example policy's dev-nightly-eval rule allows."""
    assert broker.dev_issuer is not None
    claims = {"job_workflow_ref": EVAL_WORKFLOW}
    claims.update(overrides.pop("claims", {}))  # type: ignore[arg-type]
    return broker.dev_issuer.mint(
        sub=str(overrides.pop("sub", EVAL_SUB)), claims=claims, **overrides
    )  # type: ignore[arg-type]


def person_token(broker: Broker, *roles: str, sub: str = "alice@example.com") -> str:
    assert broker.dev_issuer is not None
    return broker.dev_issuer.mint(sub=sub, roles=list(roles))


def exchange_form(
    token: str, *, model: str = "llama-7b", action: str = "evaluate", **extra: str
) -> dict[str, str]:
    return {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": token,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "resource": f"model:{model}",
        "scope": action,
        **extra,
    }


def post_concurrently(client: TestClient, forms: list[dict[str, str]]) -> list[tuple[int, str]]:
    """POST every form to /v1/token from its own thread; (status, body) in the order of forms."""
    results: list[tuple[int, str]] = [(0, "")] * len(forms)

    def go(i: int) -> None:
        resp = client.post("/v1/token", data=forms[i])
        results[i] = (resp.status_code, resp.text)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(forms))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


class LiveServer:
    """uvicorn serving an app on a free loopback port in a thread; stopped by the fixture."""

    def __init__(self, app: object, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        # proxy_headers off, as `broker serve` runs it: the broker reads X-Forwarded-For itself.
        config = uvicorn.Config(
            app,  # type: ignore[arg-type]
            host="127.0.0.1",
            port=port,
            log_level="warning",
            proxy_headers=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("broker did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (needs root and ``mount``; skips otherwise), unmounted at the end."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here ({done.stderr.strip()}); see the page-limit test"
        unavailable(Part.TMPFS, reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(filler: Path) -> None:
    """Write zeros to ``filler`` until its filesystem is full (ENOSPC)."""
    # Unbuffered: a buffered file would raise ENOSPC again when it is closed.
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass  # ENOSPC: the disk is full


@pytest.fixture(scope="session")
def openbao_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """One OpenBao dev server for the whole session (stopped at its end, pass or fail)."""
    with run_openbao(require_bao(), tmp_path_factory.mktemp("openbao")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One throwaway PostgreSQL 15 cluster for the session (stopped at its end)."""
    require(Part.POSTGRESQL, postgres_missing())
    with run_postgres() as server:
        yield server


@pytest.fixture
def live_broker(data_dir: Path) -> Iterator[tuple[LiveServer, Broker]]:
    port = free_port()
    b = build_broker(Settings(dev=True, data_dir=data_dir, policy=EXAMPLE_POLICY, port=port))
    with LiveServer(create_app(broker=b), port) as server:
        yield server, b
