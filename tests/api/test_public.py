"""Health: /healthz is liveness only; /readyz probes each part an exchange needs and names the
ones that fail. The store's probe meets a really full disk."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.backends.base import READY_CACHE_S
from broker.runtime import build_broker
from broker.settings import Settings
from tests.conftest import fill_disk

# No dev issuer and no aws models: nothing but the store and the signing key to be ready.
POLICY = """
issuers:
  - {name: ci, issuer: 'https://ci.example.com', audiences: [model-broker],
     jwks_uri: 'https://ci.example.com/jwks'}
actions:
  evaluate: {tier: low, max_ttl: 1h}
models:
  m: {}
"""


def test_readyz_names_the_store_while_the_disk_is_full(tmp_path: Path, small_fs: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    broker = build_broker(Settings(policy=policy, data_dir=small_fs / "data"))
    now = [0.0]
    broker.store_ready.clock = lambda: now[0]
    with TestClient(create_app(broker=broker)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"store": "ok", "signing_key": "ok", "audit": "ok"}

        assert broker.store.truncate_wal()  # so that the next commit needs new space
        filler = small_fs / "filler"
        fill_disk(filler)
        # Within the cache interval the last outcome stands: polling costs no write.
        assert client.get("/readyz").status_code == 200
        now[0] += READY_CACHE_S
        full = client.get("/readyz")
        assert full.status_code == 503
        body = full.json()
        assert body["error"] == "temporarily_unavailable" and body["status"] == "unavailable"
        assert body["checks"]["store"].startswith("the store cannot write")
        assert "full" in body["checks"]["store"]
        assert body["checks"]["signing_key"] == "ok"
        assert body["error_description"].startswith("not ready: store: the store cannot write")
        assert client.get("/healthz").json() == {"status": "ok"}  # alive all the same

        filler.unlink()
        now[0] += READY_CACHE_S
        assert client.get("/readyz").status_code == 200  # recovered, no restart
