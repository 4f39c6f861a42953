"""Broker processes for the replica and worker tests: ``broker serve`` started as a real process
(own data dir, shared store), killed with SIGKILL and restarted; a load of exchanges through
them; and the checks that the store holds everything a client was given.

Every process started here is stopped by the context manager that started it, pass or fail."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from broker.dev.issuer import DevIssuer, dev_issuer_key
from broker.keys.kek import load_kek
from broker.keys.store import KeyStore
from broker.policy import load_policy
from broker.settings import EXAMPLE_POLICY
from broker.store.db import Store
from broker.store.lease import MAINTENANCE, Leases
from broker.store.tables import CheckpointRow, EventRow, GrantRow
from tests.conftest import EVAL_SUB, EVAL_WORKFLOW, exchange_form
from tests.servers import START_TIMEOUT_S, free_port_pair, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[2]
ISSUER_URL = "http://broker.replicas.test"
"""What every replica is told it is (BROKER_ISSUER_URL): one broker, several processes."""
LEASE_TTL_S = 1.5
CHECKPOINT_INTERVAL_S = 0.5
TAKEOVER_S = 20.0
"""How long a test waits for the lease to move (the bound is 2 s here; the machine is shared)."""
STARTUP_S = 60.0


def broker_env(database_url: str | None = None, kek_file: Path | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "BROKER_ISSUER_URL": ISSUER_URL,
        "BROKER_LEASE_TTL": str(LEASE_TTL_S),
        "BROKER_CHECKPOINT_INTERVAL": str(CHECKPOINT_INTERVAL_S),
        "BROKER_RECONCILE_INTERVAL": "3600",
    }
    if database_url is not None:
        env["BROKER_DATABASE_URL"] = database_url
    if kek_file is not None:
        env["BROKER_KEK_FILE"] = str(kek_file)
    return env


@dataclass
class Server:
    """One ``broker serve --dev`` process on a port of its own (``--workers`` in ``extra``)."""

    name: str
    data_dir: Path
    env: dict[str, str]
    extra: Sequence[str] = ()
    port: int = field(default_factory=free_port_pair)
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def start(self) -> None:
        command = [sys.executable, "-m", "broker.cli.main", "serve", "--dev"]
        command += ["--port", str(self.port), "--data-dir", str(self.data_dir), *self.extra]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                command, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )

    def wait_ready(self) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log.read_text()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(up, timeout=max(START_TIMEOUT_S, STARTUP_S)):
            raise AssertionError(f"{self.name} did not start: {self.log.read_text()[-3000:]}")

    def kill(self, pid: int | None = None) -> None:
        """SIGKILL this server (or one of its workers, ``pid``): no shutdown of any kind."""
        assert self.proc is not None
        os.kill(pid or self.proc.pid, signal.SIGKILL)
        if pid is None or pid == self.proc.pid:
            self.proc.wait()

    def workers(self) -> list[int]:
        """The pids of the server's worker processes (``--workers``: its children spawned by
        multiprocessing, not its resource tracker)."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            pids = [int(p) for p in children.read_text().split()]
        except OSError:
            return []
        workers = []
        for pid in pids:
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    workers.append(pid)
            except OSError:
                continue  # it just ended
        return workers

    def stop(self) -> bool:
        """Stop the server; workers its supervisor left behind (it was killed after the stop
        timeout) are killed too, so that no process outlives the test. True when it stopped
        on SIGTERM, within the stop timeout."""
        if self.proc is None:
            return True
        workers = self.workers()
        graceful = stop_process(self.proc)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):  # it ended with its supervisor
                os.kill(pid, signal.SIGKILL)
        return graceful


@contextmanager
def running(servers: Sequence[Server]) -> Iterator[None]:
    """Start every server (in parallel) and stop them all on exit, whatever happened."""
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        yield
    finally:
        for server in servers:
            server.stop()


def dev_issuer(store: Store, kek_file: Path) -> DevIssuer:
    """The servers' dev issuer (its key from their store), in the test process: it mints
    what they accept, without a request."""
    key = dev_issuer_key(KeyStore(store, load_kek(kek_file)), create=False)
    assert key is not None, "no dev issuer key in the store yet"
    return DevIssuer(key, load_policy(EXAMPLE_POLICY, dev_mode=True))


def eval_token(issuer: DevIssuer) -> str:
    return issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})


def holder_pid(store: Store) -> int | None:
    """The pid of the process holding the maintenance lease (holder ids are host:pid:random)."""
    held = Leases(store, "observer").holder_of(MAINTENANCE)
    return int(held[0].split(":")[1]) if held else None


def newest_checkpoint(store: Store) -> int:
    with store.read() as session:
        sizes = list(session.scalars(select(CheckpointRow.size)))
    return max(sizes, default=0)


def assert_singletons_moved(store: Store, dead: int, signed_before: int) -> None:
    """After the lease holder ``dead`` was killed: another process holds the lease and goes on
    signing checkpoints, within the takeover bound."""
    assert wait_until(lambda: holder_pid(store) not in (None, dead), timeout=TAKEOVER_S)
    assert wait_until(lambda: newest_checkpoint(store) > signed_before, timeout=TAKEOVER_S)


@dataclass
class Load:
    """Exchanges sent through ``urls`` at random from a few threads until stopped; each 200's
    grant id is kept (what a client was given). Refused connections (a killed replica) and
    errors are counted, not kept."""

    urls: Sequence[str]
    issuer: DevIssuer
    threads: int = 4
    issued: list[str] = field(default_factory=list)
    failures: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self, seed: int) -> None:
        pick = random.Random(seed)
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                url = pick.choice(self.urls)
                try:
                    answer = client.post(
                        f"{url}/v1/token", data=exchange_form(eval_token(self.issuer))
                    )
                except httpx.HTTPError:
                    with self._lock:
                        self.failures += 1
                    time.sleep(0.05)
                    continue
                with self._lock:
                    if answer.status_code == 200:
                        self.issued.append(str(answer.json()["grant_id"]))
                    else:
                        self.failures += 1

    def __enter__(self) -> Load:
        for n in range(self.threads):
            thread = threading.Thread(target=self._run, args=(n,), daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(timeout=30)

    def count(self) -> int:
        with self._lock:
            return len(self.issued)


def assert_everything_issued_is_recorded(store: Store, issued: Sequence[str]) -> None:
    """Every grant a client was given has its row and its ``exchange.allowed`` leaf, and the
    log's indexes are dense (no gap, no duplicate)."""
    with store.read() as session:
        grants = set(session.scalars(select(GrantRow.id).where(GrantRow.id.in_(issued))))
        allowed = set(
            session.scalars(
                select(EventRow.grant_id).where(
                    EventRow.type == "exchange.allowed", EventRow.grant_id.in_(issued)
                )
            )
        )
        indexes = list(session.scalars(select(EventRow.idx).order_by(EventRow.idx)))
    assert set(issued) == grants == allowed
    assert indexes == list(range(len(indexes)))


def race_one_token(urls: Sequence[str], issuer: DevIssuer, attempts: int = 50) -> list[int]:
    """``attempts`` concurrent exchanges of one single-use token, spread over ``urls``."""
    token = eval_token(issuer)
    start = threading.Barrier(attempts)
    statuses = [0] * attempts

    def go(i: int) -> None:
        with httpx.Client(timeout=30) as client:
            start.wait()
            statuses[i] = client.post(
                f"{urls[i % len(urls)]}/v1/token", data=exchange_form(token)
            ).status_code

    threads = [threading.Thread(target=go, args=(i,)) for i in range(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def audit_verify(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli.main", "audit", "verify", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
