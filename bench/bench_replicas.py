"""Exchanges/s and p99 of three broker replicas on one PostgreSQL database, beside one replica on
the same database (issue 14).

It starts a throwaway PostgreSQL 15 cluster (as the tests do), a KEK file, and ``broker serve
--dev`` replicas with data dirs of their own, all on one new database; mints one dev token per
exchange; then drives ``--concurrency`` keep-alive connections in total, split evenly over the
replicas (one ``exchange_load.drive`` per replica, in threads, all started at once). Everything
it starts is stopped at the end.

    .venv/bin/python bench/bench_replicas.py --requests 4000 --concurrency 32 --replicas 1 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import exchange_load as load  # noqa: E402

from broker.keys.kek import generate  # noqa: E402
from tests.servers import postgres_missing, run_postgres, stop_process  # noqa: E402


@contextmanager
def replica(name: str, database: str, kek: Path, workdir: Path) -> Iterator[tuple[str, int]]:
    port = load.free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BROKER_DATABASE_URL": database,
        "BROKER_KEK_FILE": str(kek),
        "BROKER_ISSUER_URL": "http://broker.bench.invalid",
    }
    command = [sys.executable, "-m", "broker.cli.main", "serve", "--dev", "--port", str(port)]
    command += ["--data-dir", str(workdir / name)]
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        load._wait_ready(proc, "127.0.0.1", port, log)
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        stop_process(proc)


def run(count: int, database: str, kek: Path, args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp, ExitStack() as stack:
        servers = [
            stack.enter_context(replica(f"r{n}", database, kek, Path(tmp))) for n in range(count)
        ]
        deadline = time.monotonic() + args.max_seconds
        per = args.requests // count
        batches: list[list[bytes]] = []
        for netloc, _ in servers:
            host, port = netloc.rsplit(":", 1)
            minted = load.drive(
                (host, int(port)),
                load.mint_requests(netloc, per + args.warmup),
                args.concurrency,
                deadline,
                expect=b'"token"',
                keep_bodies=True,
            )
            tokens = [json.loads(body)["token"] for body in minted.bodies]
            batches.append([load.exchange_request(netloc, t) for t in tokens])
        results: list[load.Batch | None] = [None] * count
        start = threading.Barrier(count)

        def go(i: int) -> None:
            host, port = servers[i][0].rsplit(":", 1)
            addr = (host, int(port))
            load.drive(addr, batches[i][: args.warmup], 4, deadline, expect=b"access_token")
            start.wait()
            results[i] = load.drive(
                addr,
                batches[i][args.warmup :],
                max(1, args.concurrency // count),
                deadline,
                expect=b"access_token",
            )

        pids = [pid for _, pid in servers]
        cpu, busy = load.cpu_of(pids), load.machine_busy_seconds()
        threads = [threading.Thread(target=go, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done = [r for r in results if r is not None]
        cpu = load.cpu_of(pids) - cpu
        wall = max(r.wall for r in done)
        others = load.machine_busy_seconds() - busy - cpu - sum(r.client_cpu for r in done)
        ok = sum(len(r.ok()) for r in done)
        latencies = sorted(r.latencies[i] for r in done for i in r.ok())
        errors = sum(sum(r.errors().values()) for r in done)
        return (
            f"| {count} replica{'s' if count > 1 else ''} | {ok / wall:,.0f} "
            f"| {load.percentile(latencies, 0.5) * 1000:.1f} "
            f"| {load.percentile(latencies, 0.99) * 1000:.1f} | {errors} "
            f"| {cpu / max(ok, 1) * 1000:.2f} | {max(0.0, others / wall):.2f} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--max-seconds", type=float, default=600)
    args = parser.parse_args()
    missing = postgres_missing()
    if missing:
        raise SystemExit(f"cannot start PostgreSQL: {missing}")
    rows = []
    with run_postgres() as postgres, tempfile.TemporaryDirectory() as tmp:
        kek = Path(tmp) / "kek"
        kek.write_text(generate() + "\n")
        kek.chmod(0o600)
        for count in args.replicas:
            with postgres.database() as database:
                rows.append(run(count, database, kek, args))
                print(rows[-1], flush=True)
    print(f"\n{args.requests} exchanges, c={args.concurrency} in total")
    print("| run | exchanges/s | p50 ms | p99 ms | errors | broker CPU ms/exchange | other load |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
