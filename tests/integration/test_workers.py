"""``broker serve --workers 2`` on SQLite: two processes of one broker sharing its data dir and
database. Killed with SIGKILL under load (the worker holding the maintenance lease, twice),
uvicorn's supervisor starts a new worker in its place; nothing a client was given is lost, the
log stays dense and verifies, the singletons move to the other worker, and a single-use token
stays single-use across the two. Each worker runs on a CPU of its own, the replacement on the
dead one's."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.store.db import Store, sqlite_url
from tests.integration.replicas import (
    TAKEOVER_S,
    Load,
    Server,
    assert_everything_issued_is_recorded,
    assert_singletons_moved,
    audit_verify,
    broker_env,
    dev_issuer,
    holder_pid,
    newest_checkpoint,
    race_one_token,
    running,
)
from tests.servers import wait_until

pytestmark = pytest.mark.integration

WORKERS = 2
KILLS = 2


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    server = Server("workers", tmp_path / "data", broker_env(), extra=["--workers", str(WORKERS)])
    with running([server]):
        yield server


def cpus_of(workers: list[int]) -> list[set[int]] | None:
    """The CPUs each worker may run on (every thread of it), or None when one is gone."""
    try:
        return [
            set().union(*(os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{pid}/task")))
            for pid in workers
        ]
    except OSError:
        return None


def pinned_apart(server: Server) -> bool:
    """Each worker (all its threads) on one CPU, no two on the same one; when this machine lets
    the test run on fewer CPUs than workers, each on all of them (the broker pins nobody)."""
    allowed = os.sched_getaffinity(0)
    cpus = cpus_of(server.workers())
    if cpus is None or len(cpus) != WORKERS:
        return False
    if len(allowed) < WORKERS:
        return all(c == allowed for c in cpus)
    return all(len(c) == 1 for c in cpus) and len(set().union(*cpus)) == WORKERS


def test_workers_killed_under_load_lose_nothing_and_are_replaced(server: Server) -> None:
    store = Store(sqlite_url(server.data_dir))
    try:
        assert wait_until(lambda: len(server.workers()) == WORKERS, timeout=TAKEOVER_S)
        assert wait_until(lambda: pinned_apart(server), timeout=TAKEOVER_S)
        assert wait_until(lambda: holder_pid(store) in server.workers(), timeout=TAKEOVER_S)
        issuer = dev_issuer(store, server.data_dir / "kek")  # the embedded default's KEK
        holders = []
        with Load([server.url], issuer) as load:
            for _ in range(KILLS):
                pid = holder_pid(store)
                assert pid is not None and pid in server.workers()
                holders.append(pid)
                signed_before, served_before = newest_checkpoint(store), load.count()
                server.kill(pid)
                # The other worker takes the singletons over and signs on; the supervisor
                # (not the test) puts a new worker in the dead one's place.
                assert_singletons_moved(store, pid, signed_before)
                assert wait_until(
                    lambda dead=pid: (
                        len(server.workers()) == WORKERS  # type: ignore[misc]
                        and dead not in server.workers()
                    ),
                    timeout=TAKEOVER_S * 3,
                )
                assert wait_until(lambda: pinned_apart(server), timeout=TAKEOVER_S)
                assert wait_until(
                    lambda n=served_before: load.count() > n + 20,  # type: ignore[misc]
                    timeout=TAKEOVER_S,
                )
        assert len(set(holders)) == KILLS
        assert_everything_issued_is_recorded(store, load.issued)
        statuses = race_one_token([server.url], issuer)
        assert sorted(statuses) == [200] + [400] * 49, statuses
    finally:
        store.close()
    # A worker whose maintenance round waited for a role's lock the killed holder left ignored
    # SIGTERM until its supervisor was killed (Leases.stop_waiting).
    assert server.stop(), "the workers did not stop on SIGTERM"
    # Every worker froze its start-up heap, the replacements too (broker.api.heap).
    assert server.log.read_text().count("start-up heap frozen") >= WORKERS + KILLS
    verified = audit_verify("--data-dir", str(server.data_dir), env=server.env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
