"""Benchmark: ``POST /v1/token`` exchanges/s, p50 and p99 from C concurrent keep-alive clients.

With ``--spawn`` (the default when no ``--url`` is given) it starts its own dev broker on a free
loopback port with a temporary data dir, once per SQLite ``synchronous`` mode, and always stops
it. Before the clock starts it mints one distinct dev workload token per exchange through
``POST /dev/token`` (the dev issuer is single-use) and encodes every request. The client is one
thread driving C keep-alive HTTP/1.1 connections through ``selectors``: it only sends prepared
bytes and reads a status line and Content-Length, and it reports its own CPU per exchange next to
the broker's, so a reader can see that the client is not the bottleneck.

    python bench/exchange_load.py --requests 5000 --concurrency 32
    python bench/exchange_load.py --url http://127.0.0.1:8080 --pid 1234 --requests 2000

The goal (docs/performance.md): >= 1,000 exchanges/s with the store and events on, RSS < 150 MB.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import re
import resource
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

GOAL_PER_SECOND = 1_000
GOAL_RSS_MB = 150
# The subject and claim that the example policy's dev-nightly-eval rule allows (tests/conftest.py).
EVAL_SUB = "repo:acme/evals:ref:refs/heads/main"
EVAL_WORKFLOW = "acme/workflows/.github/workflows/eval.yml@refs/heads/main"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
SUBJECT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TTL_SECONDS = 3600
STARTUP_SECONDS = 60
STOP_SECONDS = 10

# Outcomes that are not HTTP status codes.
NOT_SENT, TIMEOUT, CLOSED, BAD_BODY = 0, -1, -2, -3
OUTCOME_NAMES = {
    NOT_SENT: "not sent (deadline or no connection)",
    TIMEOUT: "timeout",
    CLOSED: "connection closed",
    BAD_BODY: "200 without the expected body",
}
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)")


# --- the client: prepared requests over keep-alive connections ----------------------------------


@dataclass
class Batch:
    """What one run of ``drive`` measured; ``statuses[i]`` is request i's HTTP status or outcome."""

    statuses: list[int]
    latencies: list[float]
    bodies: list[bytes]
    samples: dict[int, bytes]
    wall: float
    client_cpu: float

    def ok(self) -> list[int]:
        return [i for i, s in enumerate(self.statuses) if s == 200]

    def errors(self) -> Counter[int]:
        return Counter(s for s in self.statuses if s != 200)


@dataclass
class _Conn:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    index: int = -1
    started: float = 0.0


def _connect(addr: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(addr, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _parse(buf: bytearray) -> tuple[int, int, bool] | None:
    """(status, end offset, connection closes) of the complete response at the start of ``buf``,
    or None while it is incomplete. The broker always answers with a Content-Length."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buf[:head_end]).lower()
    match = _CONTENT_LENGTH.search(head)
    end = head_end + 4 + (int(match.group(1)) if match else 0)
    if len(buf) < end:
        return None
    return int(head[9:12]), end, b"\r\nconnection: close" in head


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def drive(
    addr: tuple[str, int],
    requests: list[bytes],
    concurrency: int,
    deadline: float,
    *,
    expect: bytes,
    keep_bodies: bool = False,
) -> Batch:
    """Send every request, at most ``concurrency`` in flight (one per connection), until done or
    ``deadline`` (time.monotonic). A 200 whose body lacks ``expect`` counts as BAD_BODY."""
    count = len(requests)
    statuses, latencies = [NOT_SENT] * count, [0.0] * count
    bodies: list[bytes] = [b""] * count if keep_bodies else []
    samples: dict[int, bytes] = {}
    selector = selectors.DefaultSelector()
    next_index = 0

    def send_next(conn: _Conn) -> None:
        nonlocal next_index
        while next_index < count and time.monotonic() < deadline:
            conn.index, next_index = next_index, next_index + 1
            conn.started = time.perf_counter()
            try:
                conn.sock.sendall(requests[conn.index])
                return
            except OSError:
                statuses[conn.index] = CLOSED
                if not reopen(conn):
                    return
        conn.index = -1
        selector.unregister(conn.sock)
        conn.sock.close()

    def reopen(conn: _Conn) -> bool:
        selector.unregister(conn.sock)
        conn.sock.close()
        conn.buf.clear()
        try:
            conn.sock = _connect(addr)
        except OSError:
            conn.index = -1
            return False
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        return True

    cpu_start, wall_start = cpu_seconds(), time.perf_counter()
    for _ in range(min(concurrency, count)):
        conn = _Conn(_connect(addr))
        selector.register(conn.sock, selectors.EVENT_READ, conn)
        send_next(conn)
    while selector.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            for key in list(selector.get_map().values()):
                statuses[key.data.index] = TIMEOUT
                selector.unregister(key.fileobj)
                key.data.sock.close()
            break
        for key, _ in selector.select(timeout=min(remaining, 1.0)):
            conn = key.data
            try:
                chunk = conn.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                statuses[conn.index] = CLOSED
                if reopen(conn):
                    send_next(conn)
                continue
            conn.buf += chunk
            parsed = _parse(conn.buf)
            if parsed is None:
                continue
            status, end, closes = parsed
            latencies[conn.index] = time.perf_counter() - conn.started
            body = bytes(conn.buf[conn.buf.find(b"\r\n\r\n") + 4 : end])
            if status == 200 and expect not in body:
                status = BAD_BODY
            statuses[conn.index] = status
            if keep_bodies:
                bodies[conn.index] = body
            if status != 200:
                samples.setdefault(status, body[:300])
            del conn.buf[:end]
            if closes and not reopen(conn):
                continue
            send_next(conn)
    selector.close()
    wall = time.perf_counter() - wall_start
    return Batch(statuses, latencies, bodies, samples, wall, cpu_seconds() - cpu_start)


def post(host: str, path: str, content_type: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def mint_requests(host: str, count: int) -> list[bytes]:
    body = json.dumps(
        {"sub": EVAL_SUB, "claims": {"job_workflow_ref": EVAL_WORKFLOW}, "ttl": TOKEN_TTL_SECONDS}
    ).encode()
    return [post(host, "/dev/token", "application/json", body)] * count


TOKEN_TYPES = {
    "jwt": "urn:ietf:params:oauth:token-type:jwt",
    "vault": "urn:broker:token-type:vault-token",
    "aws": "urn:broker:token-type:aws-credentials",
}


def exchange_request(host: str, token: str, token_type: str = "jwt") -> bytes:
    form = {
        "requested_token_type": TOKEN_TYPES[token_type],
        "grant_type": GRANT_TYPE,
        "subject_token": token,
        "subject_token_type": SUBJECT_TOKEN_TYPE,
        "resource": "model:llama-7b",
        "scope": "evaluate",
    }
    return post(host, "/v1/token", "application/x-www-form-urlencoded", urlencode(form).encode())


# --- the broker under test: spawned, watched through /proc, always stopped ----------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (uvicorn --workers runs the app in child processes)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [pid], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        tree += children
        frontier = children
    return tree


def peak_rss_mb(pids: list[int]) -> float:
    """Sum of VmHWM (peak resident set) of ``pids``, in MB."""
    total_kb = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        total_kb += int(match.group(1)) if match else 0
    return total_kb / 1024


def cpu_of(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def main_thread_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid``'s main thread (uvicorn's event loop) so far."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SETTLE_MAX_S = 30.0
"""How long :func:`settle` waits at most."""


def lease_taken(pid: int) -> bool | None:
    """Whether a process of the broker ``pid`` holds the maintenance lease in its SQLite store
    (its ``--data-dir``, read only); None when that cannot be told (no such option, no file)."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"--data-dir" not in args:
        return None
    data_dir = Path(f"/proc/{pid}/cwd") / os.fsdecode(args[args.index(b"--data-dir") + 1])
    database = data_dir / "broker.db"
    if not database.exists():
        return None
    try:
        with closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT holder FROM leases WHERE name = 'maintenance'").fetchone()
    except sqlite3.Error:
        return False
    return row is not None


def settle(pid: int, *, broker: bool) -> float:
    """Before the clock: wait until the broker's first maintenance round has run (``broker``:
    its lease is taken 10 s after start, a third of BROKER_LEASE_TTL, and that round at once)
    and ``pid``'s tree has gone quiet (under a tenth of a core over two 0.3 s spans), at most
    SETTLE_MAX_S; the seconds waited.

    NOTE: why (docs/performance.md): the first round reconciles the backends (it makes the
    first AWS clients) and checks the log: 0.6 s of one worker's CPU, once; the later ones come
    every BROKER_CHECKPOINT_INTERVAL (60 s) at 0.2-0.3 s. A window of a few seconds measured
    whether that first round fell into it."""
    started = time.monotonic()
    deadline = started + SETTLE_MAX_S
    while broker and lease_taken(pid) is False and time.monotonic() < deadline:
        time.sleep(0.2)
    pids, quiet = process_tree(pid), 0
    while quiet < 2 and time.monotonic() < deadline:
        before = cpu_of(pids)
        time.sleep(0.3)
        quiet = quiet + 1 if cpu_of(pids) - before < 0.03 else 0
    return time.monotonic() - started


def machine_busy_seconds() -> float:
    """CPU seconds all processes on this machine have used (busy = total - idle - iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ServerOptions:
    synchronous: str
    workers: int
    loop: str
    http: str
    env: dict[str, str]

    @property
    def plain(self) -> bool:
        """True when ``broker serve --dev [--workers N]`` itself is what runs (no uvicorn
        option overridden)."""
        return self.loop == "default" and self.http == "default"

    def describe(self) -> str:
        if self.plain:
            return "broker serve --dev" + (f" --workers {self.workers}" if self.workers > 1 else "")
        return f"uvicorn --workers {self.workers} --loop {self.loop} --http {self.http}"


def _command(opts: ServerOptions, port: int, data_dir: Path) -> list[str]:
    if opts.plain:
        serve = ["serve", "--dev", "--port", str(port), "--data-dir", str(data_dir)]
        serve += ["--workers", str(opts.workers)]
        return [sys.executable, "-m", "broker.cli.main", *serve]
    # The same app through uvicorn's own CLI, so its worker/loop/http options can be tried.
    loop = "auto" if opts.loop == "default" else opts.loop
    http = "auto" if opts.http == "default" else opts.http
    return [
        *(sys.executable, "-m", "uvicorn", "exchange_load:dev_app", "--factory"),
        *("--app-dir", str(Path(__file__).parent)),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", str(opts.workers)),
        *("--loop", loop, "--http", http, "--log-level", "warning", "--no-access-log"),
        "--no-proxy-headers",  # as `broker serve` runs it
    ]


def dev_app() -> Any:
    """The app in dev mode (for uvicorn's ``--factory``: dev mode never comes from the
    environment, so the other settings do and ``dev`` is passed here)."""
    from broker.api.app import create_app  # noqa: PLC0415 (only in the spawned server)
    from broker.settings import Settings  # noqa: PLC0415

    return create_app(Settings(dev=True))


def _prepare_data_dir(data_dir: Path, port: int) -> None:
    """Create keys and schema once, so that several uvicorn workers do not race to."""
    from broker.runtime import build_broker  # noqa: PLC0415 (only for multi-worker runs)
    from broker.settings import Settings  # noqa: PLC0415

    logging.getLogger("broker").setLevel(logging.ERROR)  # its dev-mode warning is for servers
    build_broker(Settings(dev=True, data_dir=data_dir, port=port)).close()


def _wait_ready(proc: subprocess.Popen[bytes], host: str, port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return
            conn.close()
        except OSError:
            pass
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"the broker did not become ready; its log ends:\n{tail}")


@contextmanager
def spawned_broker(opts: ServerOptions) -> Iterator[tuple[str, int]]:
    """A dev broker on a free loopback port with a temporary data dir; yields (url, pid)."""
    with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
        port, data_dir, log = free_port(), Path(tmp) / "data", Path(tmp) / "broker.log"
        env = {
            **os.environ,
            **opts.env,
            "BROKER_SQLITE_SYNCHRONOUS": opts.synchronous,
            "BROKER_DATA_DIR": str(data_dir),
            "BROKER_HOST": "127.0.0.1",
            "BROKER_PORT": str(port),
        }
        if opts.workers > 1 and not opts.plain:
            _prepare_data_dir(data_dir, port)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                _command(opts, port, data_dir),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_ready(proc, "127.0.0.1", port, log)
            yield f"http://127.0.0.1:{port}", proc.pid
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the broker's process group (ours: started in a new session), then SIGKILL
    whatever of it is left, workers included."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            continue
    proc.wait(timeout=STOP_SECONDS)


# --- one measurement ----------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    requests: int
    concurrency: int
    rate: float
    p50_ms: float
    p99_ms: float
    errors: Counter[int]
    rss_mb: float | None
    server_cpu_ms: float | None
    loop_cpu_ms: float | None
    client_cpu_ms: float
    client_cores: float
    other_cores: float | None


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def describe_errors(errors: Counter[int]) -> str:
    if not errors:
        return "0"
    parts = [f"{OUTCOME_NAMES.get(code, code)}: {n}" for code, n in sorted(errors.items())]
    return f"{sum(errors.values())} ({', '.join(parts)})"


def measure(
    url: str, pid: int | None, label: str, args: argparse.Namespace, deadline: float
) -> Result:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    addr, host_header = (host, port), parts.netloc
    total = args.requests + args.warmup

    started = time.perf_counter()
    minted = drive(
        addr,
        mint_requests(host_header, total),
        args.concurrency,
        deadline,
        expect=b'"token"',
        keep_bodies=True,
    )
    if minted.errors():
        sample = next(iter(minted.samples.values()), b"")
        raise RuntimeError(
            f"minting tokens through /dev/token failed: {describe_errors(minted.errors())}; "
            f"first error body: {sample[:300]!r} (is the broker running with --dev?)"
        )
    tokens = [json.loads(body)["token"] for body in minted.bodies]
    assert len(set(tokens)) == len(tokens), "the dev issuer minted a duplicate token"
    requests = [exchange_request(host_header, token, args.token_type) for token in tokens]
    print(f"  minted {len(tokens)} distinct tokens in {time.perf_counter() - started:.1f} s")

    warm = drive(
        addr, requests[: args.warmup], args.concurrency, deadline, expect=b'"access_token"'
    )
    if warm.errors():
        print(f"  warm-up errors: {describe_errors(warm.errors())}")

    if pid:
        waited = settle(pid, broker=True)
        print(f"  waited {waited:.1f} s for the broker's start-up maintenance round to pass")
    pids = process_tree(pid) if pid else []
    server_cpu_start, busy_start = cpu_of(pids), machine_busy_seconds()
    loop_cpu_start = main_thread_cpu(pid) if pid else 0.0
    batch = drive(
        addr, requests[args.warmup :], args.concurrency, deadline, expect=b'"access_token"'
    )
    server_cpu = cpu_of(pids) - server_cpu_start
    loop_cpu = main_thread_cpu(pid) - loop_cpu_start if pid else 0.0
    # What everything else on this (shared) machine used meanwhile, in cores: a noise gauge.
    others = machine_busy_seconds() - busy_start - server_cpu - batch.client_cpu
    for status, body in sorted(batch.samples.items()):
        print(f"  first {OUTCOME_NAMES.get(status, status)} body: {body!r}")
    done = batch.ok()
    latencies = sorted(batch.latencies[i] for i in done)
    return Result(
        label=label,
        requests=args.requests,
        concurrency=args.concurrency,
        rate=len(done) / batch.wall,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        errors=batch.errors(),
        rss_mb=peak_rss_mb(process_tree(pid)) if pid else None,
        server_cpu_ms=server_cpu / len(batch.statuses) * 1000 if pid else None,
        loop_cpu_ms=loop_cpu / len(batch.statuses) * 1000 if pid else None,
        client_cpu_ms=batch.client_cpu / len(batch.statuses) * 1000,
        client_cores=batch.client_cpu / batch.wall,
        other_cores=max(0.0, others / batch.wall) if pid else None,
    )


def report(result: Result) -> None:
    print(f"  {result.requests} exchanges from {result.concurrency} connections:")
    latency = f"p50 {result.p50_ms:.1f} ms   p99 {result.p99_ms:.1f} ms"
    print(f"    {result.rate:,.0f} exchanges/s   {latency}")
    print(f"    errors: {describe_errors(result.errors)}")
    if result.rss_mb is not None:
        print(f"    broker peak RSS (VmHWM): {result.rss_mb:.1f} MB")
    cpu = f"bench client {result.client_cpu_ms:.3f} ms ({result.client_cores:.2f} cores)"
    if result.server_cpu_ms is not None:
        cpu = f"broker {result.server_cpu_ms:.3f} ms, " + cpu
    print(f"    CPU per exchange: {cpu}")
    if result.loop_cpu_ms is not None and result.server_cpu_ms is not None:
        rest = result.server_cpu_ms - result.loop_cpu_ms
        print(
            f"    broker CPU per exchange by thread: main (event loop) {result.loop_cpu_ms:.3f} "
            f"ms, all others (thread pool, writers) {rest:.3f} ms"
        )
    if result.other_cores is not None:
        print(f"    other processes on this machine meanwhile: {result.other_cores:.2f} cores")


def summary(results: list[Result]) -> None:
    print(
        "\n| run | exchanges/s | p50 ms | p99 ms | errors | peak RSS MB "
        "| broker CPU ms/exchange | other load (cores) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rss = f"{r.rss_mb:.0f}" if r.rss_mb is not None else "-"
        cpu = f"{r.server_cpu_ms:.2f}" if r.server_cpu_ms is not None else "-"
        other = f"{r.other_cores:.2f}" if r.other_cores is not None else "-"
        print(
            f"| {r.label} | {r.rate:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
            f"{sum(r.errors.values())} | {rss} | {cpu} | {other} |"
        )
    print(f"\ngoal: >= {GOAL_PER_SECOND:,} exchanges/s, no errors, peak RSS < {GOAL_RSS_MB} MB")
    for r in results:
        met = r.rate >= GOAL_PER_SECOND and not r.errors and (r.rss_mb or 0) < GOAL_RSS_MB
        print(f"  {r.label}: {'met' if met else 'not met'}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", help="a running dev broker (`broker serve --dev`)")
    target.add_argument(
        "--spawn", action="store_true", help="start a dev broker per run (the default)"
    )
    parser.add_argument("--pid", type=int, help="with --url: the broker's pid, for RSS and CPU")
    parser.add_argument("--requests", type=int, default=5000, help="measured exchanges per run")
    parser.add_argument("--concurrency", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--warmup", type=int, default=200, help="exchanges before the clock")
    parser.add_argument(
        "--synchronous",
        choices=["FULL", "NORMAL", "both"],
        default="both",
        help="with --spawn: BROKER_SQLITE_SYNCHRONOUS of the broker (both: one run each)",
    )
    parser.add_argument("--workers", type=int, default=1, help="with --spawn: uvicorn workers")
    parser.add_argument(
        "--loop", choices=["default", "asyncio", "uvloop"], default="default", help="uvicorn loop"
    )
    parser.add_argument(
        "--http", choices=["default", "h11", "httptools"], default="default", help="uvicorn http"
    )
    parser.add_argument(
        "--token-type",
        choices=["jwt", "vault", "aws"],
        default="jwt",
        help="what to ask for (vault and aws need the broker configured for them)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the spawned broker (e.g. PYTHONPATH with uvloop)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=600, help="stop everything after this long"
    )
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 0:
        parser.error("--requests and --concurrency must be positive, --warmup not negative")
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env: expected KEY=VALUE")
    return args


def _terminate(_signum: int, _frame: object) -> None:
    raise SystemExit(f"stopped by signal {_signum}")  # unwinds through the broker's `finally`


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    deadline = time.monotonic() + args.max_seconds
    results: list[Result] = []
    try:
        run(args, deadline, results)
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary(results)
    return 0 if all(not r.errors for r in results) else 1


def run(args: argparse.Namespace, deadline: float, results: list[Result]) -> None:
    """One measurement against --url, or one spawned broker per synchronous mode."""
    if args.url:
        print(f"broker at {args.url} (pid {args.pid or 'unknown'})")
        try:
            results.append(measure(args.url, args.pid, "external", args, deadline))
        except ConnectionError as exc:
            raise RuntimeError(f"cannot reach {args.url}: {exc.strerror}") from None
        report(results[-1])
    else:
        modes = ["FULL", "NORMAL"] if args.synchronous == "both" else [args.synchronous]
        env = dict(item.split("=", 1) for item in args.server_env)
        for mode in modes:
            opts = ServerOptions(mode, args.workers, args.loop, args.http, env)
            label = f"{opts.describe()}, synchronous={mode}, c={args.concurrency}"
            with spawned_broker(opts) as (url, pid):
                print(f"{label}: {url} (pid {pid})")
                results.append(measure(url, pid, label, args, deadline))
            report(results[-1])


if __name__ == "__main__":
    raise SystemExit(main())
