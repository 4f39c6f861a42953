"""The store: migrations match the tables, UTC round trips, write failures fail closed, writers
take turns, and group commits answer only after their commit."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, delete, event, insert, select, text
from sqlalchemy.exc import OperationalError

from broker.audit.log import AuditLog
from broker.errors import AuditUnavailable, InvalidRequest
from broker.store import db
from broker.store.db import (
    HEAD_REVISION,
    MIGRATIONS,
    WAL_SIZE_LIMIT,
    GroupCommit,
    Steps,
    Store,
    sqlite_url,
)
from broker.store.tables import Base, EventRow, UsedTokenRow
from tests.keys.support import key_store

NOW = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(sqlite_url(tmp_path))
    s.migrate()
    return s


@pytest.fixture
def audit(store: Store, tmp_path: Path) -> AuditLog:
    return AuditLog.from_store(key_store(store), data_dir=tmp_path, default_origin="test/audit")


def test_migrations_create_exactly_the_tables(store: Store) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_migrate_is_idempotent(store: Store) -> None:
    store.migrate()
    with store.read() as s:
        assert s.execute(text("SELECT size FROM log_head")).scalar_one() == 0


def test_datetimes_come_back_aware_utc(store: Store) -> None:
    at = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with store.write() as s:
        s.add(UsedTokenRow(issuer="i", jti="j", expires_at=at))
    with store.read() as s:
        row = s.scalars(select(UsedTokenRow)).one()
    assert row.expires_at == at and row.expires_at.tzinfo == dt.UTC


def test_a_rolled_back_append_leaves_no_gap(store: Store, audit: AuditLog) -> None:
    now = dt.datetime.now(dt.UTC)
    with store.write() as s:
        audit.append(s, "a", now, {})
    with pytest.raises(RuntimeError), store.write() as s:
        audit.append(s, "b", now, {})
        raise RuntimeError("boom")
    with store.write() as s:
        assert audit.append(s, "c", now, {}) == 1
    with store.read() as s:
        assert [r.type for r in s.scalars(select(EventRow).order_by(EventRow.idx))] == ["a", "c"]


def test_oversized_events_are_refused(store: Store, audit: AuditLog) -> None:
    with pytest.raises(ValueError, match="limit"), store.write() as s:
        audit.append(s, "big", dt.datetime.now(dt.UTC), {"x": "y" * 70000})


def test_database_failure_becomes_audit_unavailable(store: Store, audit: AuditLog) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE log_head")
    with pytest.raises(AuditUnavailable, match="nothing was issued"), store.write() as s:
        audit.append(s, "x", dt.datetime.now(dt.UTC), {})


def test_head_revision_is_alembics_head(store: Store) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD_REVISION
    assert store.revision() == HEAD_REVISION


def test_sqlite_writers_of_one_process_take_turns(store: Store) -> None:
    inside, most, guard = 0, 0, threading.Lock()

    def write(n: int) -> None:
        nonlocal inside, most
        with store.write() as s:
            with guard:
                inside += 1
                most = max(most, inside)
            s.add(UsedTokenRow(issuer="i", jti=f"j{n}", expires_at=NOW))
            time.sleep(0.005)
            with guard:
                inside -= 1

    threads = [threading.Thread(target=write, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1
    assert len(_jtis(store)) == 12


# --- group commit ---------------------------------------------------------------------------------

_SPEND = insert(UsedTokenRow.__table__)


def _jtis(store: Store) -> list[str]:
    with store.read() as s:
        return sorted(s.scalars(select(UsedTokenRow.jti)))


def _spend_all(
    gate: Callable[[Sequence[str]], None] = lambda _items: None,
    committed: list[Sequence[str]] | None = None,
) -> Any:
    """A batch writer: one used_tokens row per item, all in one multi-row insert ("bad" is
    refused on its own); ``gate`` runs first, ``committed`` collects committed batches."""

    def write(
        conn: Connection, items: Sequence[str]
    ) -> tuple[list[Exception | None], Callable[[], None] | None]:
        gate(items)
        outcomes: list[Exception | None] = [
            InvalidRequest("bad item") if i == "bad" else None for i in items
        ]
        rows = [{"issuer": "i", "jti": i, "expires_at": NOW} for i in items if i != "bad"]
        if rows:
            conn.execute(_SPEND, rows)
        after = None if committed is None else lambda: committed.append(items)
        return outcomes, after

    return write


def _run_all(group: GroupCommit[str], items: list[str]) -> dict[str, list[BaseException | None]]:
    """Run each item from its own thread; what each got, by item."""
    got: dict[str, list[BaseException | None]] = {i: [] for i in items}

    def go(item: str) -> None:
        try:
            group.run(item)
            got[item].append(None)
        except Exception as exc:
            got[item].append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def _held_batch(
    store: Store, items: list[str], committed: list[Sequence[str]]
) -> dict[str, list[BaseException | None]]:
    """Run "first" alone, then ``items`` together in the next batch: the first batch waits in
    the writer until every item has queued behind it."""
    entered, release = threading.Event(), threading.Event()

    def gate(batch: Sequence[str]) -> None:
        if "first" in batch:
            entered.set()
            assert release.wait(10)

    group = GroupCommit(store, _spend_all(gate, committed))
    first = threading.Thread(target=group.run, args=("first",))
    first.start()
    assert entered.wait(10)
    results: dict[str, list[BaseException | None]] = {}
    runner = threading.Thread(target=lambda: results.update(_run_all(group, items)))
    runner.start()
    deadline = time.monotonic() + 10
    while len(group._queue) < len(items):  # the items queue behind the first batch
        assert time.monotonic() < deadline
        time.sleep(0.01)
    release.set()
    runner.join()
    first.join()
    group.close()
    return results


def test_group_commit_answers_after_its_commit(store: Store) -> None:
    committed: list[Sequence[str]] = []
    group = GroupCommit(store, _spend_all(committed=committed))
    group.run("a")
    assert _jtis(store) == ["a"] and committed == [["a"]]
    with pytest.raises(InvalidRequest, match="bad item"):
        group.run("bad")
    got = _run_all(group, [f"c{n}" for n in range(20)])
    assert all(v == [None] for v in got.values())
    assert _jtis(store) == sorted(["a", *got])
    group.close()
    with pytest.raises(AuditUnavailable, match="shutting down"):
        group.run("late")


def test_group_commit_batches_waiting_callers(store: Store) -> None:
    committed: list[Sequence[str]] = []
    got = _held_batch(store, ["x", "bad", "y"], committed)
    # The three callers' threads queue in any order, but in one batch after the first.
    assert [sorted(b) for b in committed] == [["first"], ["bad", "x", "y"]]
    assert got["x"] == [None] and got["y"] == [None]
    [bad] = got["bad"]
    assert isinstance(bad, InvalidRequest)  # refused alone; the batch committed
    assert _jtis(store) == ["first", "x", "y"]


def test_a_batch_that_fails_fails_every_caller_in_it(store: Store) -> None:
    # "x" twice: the multi-row insert hits the primary key and the whole batch fails.
    committed: list[Sequence[str]] = []
    got = _held_batch(store, ["w", "x", "x", "bad"], committed)
    assert [list(b) for b in committed] == [["first"]]
    for outcome in got.values():
        assert all(isinstance(e, AuditUnavailable) for e in outcome), got
    assert _jtis(store) == ["first"]


def test_a_batch_whose_commit_fails_fails_every_caller(store: Store) -> None:
    committed: list[Sequence[str]] = []
    group = GroupCommit(store, _spend_all(committed=committed))

    def fail(_conn: Any) -> None:
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    event.listen(store.engine, "commit", fail)
    try:
        got = _run_all(group, ["a", "b", "c"])
    finally:
        event.remove(store.engine, "commit", fail)
    assert all(isinstance(e, AuditUnavailable) for v in got.values() for e in v), got
    assert committed == [] and _jtis(store) == []
    group.run("d")  # the writer survives and commits again
    assert _jtis(store) == ["d"]
    group.close()


def test_steps_are_resumed_with_each_outcome(store: Store) -> None:
    """GroupCommit.drive: the steps see None for a committed item and the item's own error
    thrown in for a refused one, and may go on writing; their result is drive's."""
    group = GroupCommit(store, _spend_all())
    seen: list[str] = []

    def steps() -> Steps[str, list[str]]:
        yield "one"
        seen.append("one committed")
        try:
            yield "bad"
        except InvalidRequest as exc:
            seen.append(f"bad refused: {exc.description}")
            yield "after-bad"
        return seen

    assert group.drive(steps()) == ["one committed", "bad refused: bad item"]
    assert _jtis(store) == ["after-bad", "one"]
    group.close()
    with pytest.raises(AuditUnavailable, match="shutting down"):
        group.drive(steps())


def test_submit_reports_after_the_commit_from_the_writer(store: Store) -> None:
    """GroupCommit.submit: ``done`` runs once the item's batch committed (its row is visible to
    another connection by then), and a caller whose ``done`` fails does not hold up others."""
    group = GroupCommit(store, _spend_all())
    reported: dict[str, tuple[Exception | None, list[str]]] = {}
    all_done = threading.Event()

    def done_for(item: str) -> Callable[[Exception | None], None]:
        def done(error: Exception | None) -> None:
            if item == "broken":
                raise RuntimeError("a caller's bug")
            reported[item] = (error, _jtis(store))
            if len(reported) == 2:
                all_done.set()

        return done

    with store.write():  # holds the writer: the three items meet in one batch
        for item in ("broken", "a", "bad"):
            group.submit(item, done_for(item))
    assert all_done.wait(10)
    error, visible = reported["a"]
    assert error is None and visible == ["a", "broken"]
    assert isinstance(reported["bad"][0], InvalidRequest)
    group.close()
    with pytest.raises(AuditUnavailable, match="shutting down"):
        group.submit("late", done_for("late"))


@pytest.fixture(params=[0o022, 0o000], ids=["umask-022", "umask-000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_database_files_are_owner_only_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    store = Store(sqlite_url(tmp_path))
    try:
        store.migrate()
        with store.write() as s:
            s.add(UsedTokenRow(issuer="i", jti="j", expires_at=NOW))
        files = [tmp_path / f"broker.db{suffix}" for suffix in ("", "-wal", "-shm")]
        assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        store.close()


def test_database_files_left_readable_are_tightened(tmp_path: Path, umask: int) -> None:
    first = Store(sqlite_url(tmp_path))
    first.migrate()
    first.close()
    (tmp_path / "broker.db").chmod(0o644)  # as versions before 0600 left it
    (tmp_path / "broker.db-wal").touch(mode=0o644)
    second = Store(sqlite_url(tmp_path))
    try:
        assert _mode(tmp_path / "broker.db") == 0o600
        assert _mode(tmp_path / "broker.db-wal") == 0o600
    finally:
        second.close()


def _fill(store: Store, rows: int) -> None:
    """Write ``rows`` rows of ~1 KB in one transaction (a few MB of WAL)."""
    with store.write() as s:
        s.execute(
            insert(UsedTokenRow),
            [
                {"issuer": "i", "jti": f"{n:06d}" + "x" * 999, "expires_at": NOW}
                for n in range(rows)
            ],
        )


def _wal_bytes(tmp_path: Path) -> int:
    wal = tmp_path / "broker.db-wal"
    return wal.stat().st_size if wal.exists() else 0


def test_the_wal_is_truncated_once_no_reader_holds_it(tmp_path: Path) -> None:
    store = Store(sqlite_url(tmp_path))
    store.migrate()
    reader = sqlite3.connect(tmp_path / "broker.db")
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM used_tokens").fetchone()  # holds its snapshot
        for _ in range(3):
            _fill(store, 2000)
            with store.write() as s:
                s.execute(delete(UsedTokenRow))
        assert _wal_bytes(tmp_path) > 3 * WAL_SIZE_LIMIT // 2  # the reader kept it growing
        assert store.truncate_wal() is False  # it cannot while the reader is there
        reader.execute("ROLLBACK")
        assert store.truncate_wal() is True
        assert _wal_bytes(tmp_path) == 0
        with store.read() as s:  # nothing was lost on the way
            assert s.execute(text("SELECT count(*) FROM used_tokens")).scalar_one() == 0
    finally:
        reader.close()
        store.close()


def test_the_wal_stays_within_its_limit_between_truncations(tmp_path: Path) -> None:
    store = Store(sqlite_url(tmp_path))
    store.migrate()
    try:
        _fill(store, 6000)  # one transaction much larger than the limit
        assert _wal_bytes(tmp_path) > 2 * WAL_SIZE_LIMIT
        with store.write() as s:
            s.add(UsedTokenRow(issuer="i", jti="small", expires_at=NOW))
        # SQLite checkpointed after the large commit; the next one restarted the log and cut
        # the file back to the limit instead of keeping its largest size.
        assert _wal_bytes(tmp_path) <= WAL_SIZE_LIMIT
    finally:
        store.close()


def test_processes_sharing_a_sqlite_file_queue_on_its_writer_lock(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's engine (its own lock file descriptor) waits for this one's write to
    end rather than polling in SQLite's busy handler; past the wait it fails closed."""
    other = Store(store.url)
    try:
        committed = threading.Event()

        def write_from_the_other_process() -> None:
            with other.write() as s:
                s.add(UsedTokenRow(issuer="i", jti="theirs", expires_at=NOW))
            committed.set()

        with store.write() as s:
            s.add(UsedTokenRow(issuer="i", jti="mine", expires_at=NOW))
            thread = threading.Thread(target=write_from_the_other_process)
            thread.start()
            assert not committed.wait(0.3)  # it waits while this write is open
        thread.join(timeout=10)
        assert committed.is_set()
        monkeypatch.setattr("broker.store.db.BUSY_TIMEOUT_S", 0.2)
        busy = pytest.raises(AuditUnavailable, match="another process held")
        with store.write(), busy, other.write():
            pass
    finally:
        other.close()


def test_a_waiting_writer_tries_often_at_first_then_backs_off_until_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's group commit holds the lock for milliseconds: the waiter tries every
    LOCK_POLL_S for LOCK_POLL_FOR_S (so it wakes soon after), then backs off to LOCK_POLL_MAX_S,
    and fails closed at its deadline."""
    path = tmp_path / "db-writer.lock"
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    waiter = os.open(path, os.O_RDWR)
    clock = [100.0]
    pauses: list[float] = []

    class FakeTime:
        @staticmethod
        def monotonic() -> float:
            return clock[0]

        @staticmethod
        def sleep(seconds: float) -> None:
            pauses.append(seconds)
            clock[0] += seconds

    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        monkeypatch.setattr(db, "time", FakeTime)
        with pytest.raises(AuditUnavailable, match="another process held"):
            db._lock_file(waiter, deadline=clock[0] + 0.5)
        early = [p for p in pauses if p == db.LOCK_POLL_S]
        assert len(early) >= db.LOCK_POLL_FOR_S / db.LOCK_POLL_S - 1
        assert pauses[: len(early)] == early  # the short pauses come first
        assert max(pauses) == db.LOCK_POLL_MAX_S
        assert pauses == sorted(pauses)
        assert 0.5 <= clock[0] - 100.0 < 0.5 + db.LOCK_POLL_MAX_S * 2
        fcntl.flock(holder, fcntl.LOCK_UN)
        db._lock_file(waiter, deadline=clock[0] + 0.5)  # free now: taken at once
    finally:
        os.close(waiter)
        os.close(holder)
