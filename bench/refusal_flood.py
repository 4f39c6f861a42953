"""Benchmark: a flood of garbage tokens from one client address against a dev broker.

It starts its own dev broker (``bench/exchange_load.py``'s ``spawned_broker``) with
``BROKER_TRUSTED_PROXIES=127.0.0.1``, so that ``X-Forwarded-For`` tells the bench's two clients
apart on loopback, and always stops it. Then:

1. baseline: ``--valid`` exchanges of distinct dev tokens from client B alone (exchanges/s);
2. flood: ``--garbage`` requests with a garbage subject token (each carrying a 60 KB ``model``,
   the largest a form allows) from client A, while client B sends ``--valid`` exchanges again;
3. after a maintenance round, reads the audit log through the API and reports what the flood
   added: events (by type), bytes of event bodies, and B's exchanges/s during the flood.

    python bench/refusal_flood.py --garbage 10000 --valid 3000

The goal (docs/security.md): the flood adds at most ``burst + rate x seconds`` denial events and
one ``refusals.summary`` per client per round, and B keeps most of its baseline throughput.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlencode, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exchange_load import (
    GRANT_TYPE,
    SUBJECT_TOKEN_TYPE,
    ServerOptions,
    drive,
    exchange_request,
    mint_requests,
    post,
    spawned_broker,
)

ATTACKER, HEALTHY = "198.51.100.7", "203.0.113.9"


def forwarded(request: bytes, client: str) -> bytes:
    """``request`` with an ``X-Forwarded-For: client`` header."""
    head, _, body = request.partition(b"\r\n\r\n")
    return head + f"\r\nX-Forwarded-For: {client}".encode() + b"\r\n\r\n" + body


def garbage_request(host: str) -> bytes:
    form = {
        "grant_type": GRANT_TYPE,
        "subject_token": "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJ4In0.c2ln",
        "subject_token_type": SUBJECT_TOKEN_TYPE,
        "resource": "model:" + "m" * 60_000,
        "scope": "evaluate",
    }
    body = urlencode(form).encode()
    return forwarded(post(host, "/v1/token", "application/x-www-form-urlencoded", body), ATTACKER)


def tokens(addr: tuple[str, int], host: str, count: int) -> list[str]:
    minted = drive(
        addr,
        mint_requests(host, count),
        8,
        time.monotonic() + 300,
        expect=b"token",
        keep_bodies=True,
    )
    return [json.loads(body)["token"] for body in minted.bodies if body]


def get(addr: tuple[str, int], path: str, token: str) -> bytes:
    conn = http.client.HTTPConnection(*addr, timeout=30)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"GET {path}: {resp.status} {body[:200]!r}")
    return body


def log_entries(addr: tuple[str, int], auditor: str) -> list[bytes]:
    note = get(addr, "/v1/audit/checkpoint", auditor).decode()
    size = int(note.splitlines()[1])
    leaves: list[bytes] = []
    for start in range(0, size, 1000):
        page = json.loads(
            get(addr, f"/v1/audit/entries?start={start}&end={min(size, start + 1000)}", auditor)
        )
        leaves += [base64.b64decode(e["leaf"]) for e in page["entries"]]
    return leaves


def auditor_token(addr: tuple[str, int], host: str) -> str:
    body = json.dumps({"sub": "bench@example.com", "roles": ["auditor"]}).encode()
    [token] = [
        json.loads(b)["token"]
        for b in drive(
            addr,
            [post(host, "/dev/token", "application/json", body)],
            1,
            time.monotonic() + 30,
            expect=b"token",
            keep_bodies=True,
        ).bodies
    ]
    return token


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--garbage", type=int, default=10_000)
    parser.add_argument("--valid", type=int, default=3_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    opts = ServerOptions(
        synchronous="FULL",
        workers=1,
        loop="default",
        http="default",
        env={"BROKER_TRUSTED_PROXIES": "127.0.0.1", "BROKER_CHECKPOINT_INTERVAL": "1"},
    )
    with spawned_broker(opts) as (url, _pid):
        parts = urlsplit(url)
        addr, host = (str(parts.hostname), int(parts.port or 80)), str(parts.netloc)
        auditor = auditor_token(addr, host)
        healthy = [
            forwarded(exchange_request(host, t), HEALTHY)
            for t in tokens(addr, host, 2 * args.valid)
        ]
        baseline = drive(
            addr,
            healthy[: args.valid],
            args.concurrency,
            time.monotonic() + 300,
            expect=b"access_token",
        )
        before = log_entries(addr, auditor)
        flood_result: list[object] = []
        flood = threading.Thread(
            target=lambda: flood_result.append(
                drive(
                    addr,
                    [garbage_request(host)] * args.garbage,
                    args.concurrency,
                    time.monotonic() + 600,
                    expect=b"",
                )
            )
        )
        started = time.perf_counter()
        flood.start()
        during = drive(
            addr,
            healthy[args.valid :],
            args.concurrency,
            time.monotonic() + 300,
            expect=b"access_token",
        )
        flood.join()
        flood_wall = time.perf_counter() - started
        time.sleep(2.5)  # a maintenance round writes the summaries
        after = log_entries(addr, auditor)
    garbage = flood_result[0]
    added = after[len(before) :]
    kinds = Counter(json.loads(leaf)["type"] for leaf in added)
    kinds.pop("exchange.allowed", None)  # client B's own exchanges during the flood
    flood_bytes = sum(len(leaf) for leaf in added if json.loads(leaf)["type"] != "exchange.allowed")
    statuses = Counter(garbage.statuses)  # type: ignore[attr-defined]
    print(f"garbage requests: {args.garbage} in {flood_wall:.1f} s: {dict(statuses)}")
    print(f"events the flood added: {dict(kinds)}, {flood_bytes:,} bytes of event bodies")
    print(f"client B alone:        {len(baseline.ok()) / baseline.wall:,.0f} exchanges/s")
    print(
        f"client B during flood: {len(during.ok()) / during.wall:,.0f} exchanges/s "
        f"({len(during.ok())} of {args.valid} ok)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
