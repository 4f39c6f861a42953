"""What the metrics, the request id and the access log add to one exchange (in process).

Measures, per call, in microseconds (best of ``--repeat`` rounds of ``--number`` calls):

- counting an exchange: ``Metrics.exchanged(...)`` and the latency observation, against the
  single-label counter and unlabelled histogram it replaced;
- the request middleware (``RequestContext``) around a do-nothing ASGI app, against the bare
  app: with and without an incoming ``X-Request-ID``, with the access log off and on (JSON
  lines written to /dev/null);
- copying the context into the exchange's worker thread (``contextvars.copy_context``).

Goal: well under 1 % of an exchange (~1 ms of broker CPU, docs/performance.md).

    .venv/bin/python bench/bench_observability.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import logging
import os
import timeit
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from broker.api.clients import ClientAddresses
from broker.api.requests import RequestContext
from broker.logs import JsonFormatter
from broker.metrics import EXCHANGE_BUCKETS, Metrics

MODELS = [f"model-{i}" for i in range(20)]
ACTIONS = ["evaluate", "fine-tune", "deploy-weights"]
JWT = "urn:ietf:params:oauth:token-type:jwt"


def best(call: Callable[[], Any], number: int, repeat: int) -> float:
    """Microseconds per call, the best of ``repeat`` rounds."""
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def counting(number: int, repeat: int) -> dict[str, float]:
    registry = CollectorRegistry()
    old_counter = Counter("old_exchanges", "x", ["outcome"], registry=registry)
    old_latency = Histogram("old_seconds", "x", buckets=EXCHANGE_BUCKETS, registry=registry)
    metrics = Metrics(MODELS, ACTIONS, "sha256:bench")

    def before() -> None:
        old_counter.labels("issued").inc()
        old_latency.observe(0.001)

    def after() -> None:
        metrics.exchanged("model-7", "evaluate", JWT, "issued")(0.001)

    def after_unknown() -> None:
        metrics.exchanged("someone-else's-model", "nope", "urn:x", "invalid_target")(0.001)

    return {
        "before: counter(outcome) + histogram": best(before, number, repeat),
        "after: exchanged(model, action, backend, outcome)": best(after, number, repeat),
        "after: the same for a model the policy lacks": best(after_unknown, number, repeat),
    }


async def _app(_scope: Any, _receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def middleware(number: int, repeat: int) -> dict[str, float]:
    loop = asyncio.new_event_loop()
    clients = ClientAddresses()
    quiet = RequestContext(_app, clients, access_log=False)
    logged = RequestContext(_app, clients, access_log=True)
    sink = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    handler = logging.StreamHandler(sink)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("broker.access")
    access.addHandler(handler)
    access.propagate = False
    access.setLevel(logging.INFO)

    def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
        return {
            "type": "http",
            "method": "POST",
            "path": "/v1/token",
            "headers": list(headers),
            "client": ("10.0.0.7", 50000),
        }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(_message: Any) -> None:
        return None

    bare, given = scope(), scope((b"x-request-id", b"4f0c2d7e-1b5a-4d3e-9a1f-0c9d8e7f6a5b"))

    async def run(app: Any, request: dict[str, Any]) -> None:
        for _ in range(number):
            await app(request, receive, send)

    def timed(app: Any, request: dict[str, Any]) -> float:
        rounds = [
            timeit.timeit(lambda: loop.run_until_complete(run(app, request)), number=1)
            for _ in range(repeat)
        ]
        return min(rounds) / number * 1e6

    try:
        base = timed(_app, bare)
        return {
            "bare app": base,
            "RequestContext, new id": timed(quiet, bare) - base,
            "RequestContext, caller's id": timed(quiet, given) - base,
            "RequestContext, new id, access log on": timed(logged, bare) - base,
        }
    finally:
        loop.close()
        access.removeHandler(handler)
        sink.close()


def _nothing() -> None:
    return None


def context_copy(number: int, repeat: int) -> dict[str, float]:
    def copied() -> None:
        contextvars.copy_context().run(_nothing)

    extra = best(copied, number, repeat) - best(_nothing, number, repeat)
    return {"copy_context().run(f) over f()": extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = {
        **counting(args.number, args.repeat),
        **middleware(args.number, args.repeat),
        **context_copy(args.number, args.repeat),
    }
    print("| what | µs per exchange |\n|---|---|")
    for what, micros in results.items():
        print(f"| {what} | {micros:.2f} |")


if __name__ == "__main__":
    main()
