"""GroupCommit attached to an event loop (SQLite): batches written on the loop, committed in a
thread. Callers learn of success only after the commit, a failing commit fails every caller in
its batch, the loop keeps running while another process holds the writer lock (and fails
closed past the wait), and detaching hands what is queued to the writer thread."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from broker.errors import AuditUnavailable, InvalidRequest
from broker.store import db, loop_commit
from broker.store.db import GroupCommit, Store, sqlite_url
from broker.store.tables import UsedTokenRow
from tests.store.test_db import NOW, _jtis, _spend_all


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(sqlite_url(tmp_path))
    s.migrate()
    return s


Outcome = Exception | None


async def submit_all(group: GroupCommit[str], items: list[str]) -> dict[str, Outcome]:
    """Submit every item from the loop at once; each one's outcome once its batch ended."""
    loop = asyncio.get_running_loop()
    futures: dict[str, asyncio.Future[Outcome]] = {}
    for item in items:
        future: asyncio.Future[Outcome] = loop.create_future()
        futures[item] = future
        group.submit(item, future.set_result)
    # A bounded wait: a loop commit that lost its callers fails the test instead of hanging it.
    return {item: await asyncio.wait_for(future, 15) for item, future in futures.items()}


def failed_then_next(
    group: GroupCommit[str],
    fault: contextlib.AbstractContextManager[Any],
    failing: list[str],
    item: str,
) -> tuple[dict[str, Outcome], dict[str, Outcome]]:
    """On a loop: submit ``failing`` within ``fault``, then ``item`` alone; both outcomes."""

    async def main() -> tuple[dict[str, Outcome], dict[str, Outcome]]:
        group.attach(asyncio.get_running_loop())
        with fault:
            failed = await submit_all(group, failing)
        again = await submit_all(group, [item])
        await group.detach()
        return failed, again

    return asyncio.run(main())


def test_the_loop_writes_a_batch_and_answers_after_its_commit(store: Store) -> None:
    committed: list[Sequence[str]] = []
    seen_when_answered: list[list[str]] = []
    group = GroupCommit(store, _spend_all(committed=committed))

    async def main() -> dict[str, Outcome]:
        assert group.attach(asyncio.get_running_loop())
        loop_thread = threading.get_ident()
        loop = asyncio.get_running_loop()
        futures = []
        for item in ["a", "bad", "b", "c"]:
            future: asyncio.Future[Outcome] = loop.create_future()

            def done(error: Outcome, f: asyncio.Future[Outcome] = future) -> None:
                assert threading.get_ident() == loop_thread  # answered on the loop
                seen_when_answered.append(_jtis(Store(store.url)))  # another connection
                f.set_result(error)

            group.submit(item, done)
            futures.append(future)
        outcomes = [await f for f in futures]
        await group.detach()
        return dict(zip(["a", "bad", "b", "c"], outcomes, strict=True))

    got = asyncio.run(main())
    assert got["a"] is None and got["b"] is None and got["c"] is None
    assert isinstance(got["bad"], InvalidRequest)  # refused alone; the batch committed
    assert [sorted(b) for b in committed] == [["a", "b", "bad", "c"]]  # one batch
    assert all(seen == ["a", "b", "c"] for seen in seen_when_answered)  # after the commit
    assert group._thread is None  # no writer thread was needed
    group.close()


def test_a_commit_that_fails_on_the_loop_fails_every_caller_and_the_next_commits(
    store: Store,
) -> None:
    committed: list[Sequence[str]] = []
    group = GroupCommit(store, _spend_all(committed=committed))

    def fail(_conn: Any) -> None:
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    @contextlib.contextmanager
    def failing_commits() -> Iterator[None]:
        event.listen(store.engine, "commit", fail)
        try:
            yield
        finally:
            event.remove(store.engine, "commit", fail)

    failed, again = failed_then_next(group, failing_commits(), ["a", "b", "c"], "d")
    assert all(isinstance(e, AuditUnavailable) for e in failed.values()), failed
    assert again == {"d": None}
    assert committed == [["d"]] and _jtis(store) == ["d"]
    group.close()


def test_a_batch_whose_statements_fail_fails_every_caller(store: Store) -> None:
    """The key "x" twice: the multi-row insert hits the primary key; nothing of it is kept."""
    group = GroupCommit(store, _spend_all())

    async def main() -> dict[str, Outcome]:
        group.attach(asyncio.get_running_loop())
        got = await submit_all(group, ["w", "x", "x"])
        await group.detach()
        return got

    loop_got = asyncio.run(main())
    assert all(isinstance(e, AuditUnavailable) for e in loop_got.values()), loop_got
    assert _jtis(store) == []
    group.close()


def test_the_loop_keeps_running_while_another_process_holds_the_writer_lock(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's engine (its own lock file descriptor) holds the write lock: the loop
    serves other work meanwhile, the batch commits once the lock is free, and past the busy
    timeout a batch fails closed."""
    other = Store(store.url)
    holding, release = threading.Event(), threading.Event()

    def hold(jti: str) -> None:
        with other.write() as s:
            s.add(UsedTokenRow(issuer="i", jti=jti, expires_at=NOW))
            holding.set()
            assert release.wait(10)

    group = GroupCommit(store, _spend_all())

    async def main() -> tuple[Outcome, int]:
        group.attach(asyncio.get_running_loop())
        holder = threading.Thread(target=hold, args=("theirs",))
        holder.start()
        assert await asyncio.to_thread(holding.wait, 10)
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[Outcome] = loop.create_future()
        group.submit("mine", outcome.set_result)
        ticks = 0
        for _ in range(20):  # the loop is free while the batch waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert not outcome.done()
        release.set()
        result = await outcome
        holder.join()
        await group.detach()
        return result, ticks

    result, ticks = asyncio.run(main())
    assert result is None and ticks == 20
    assert _jtis(store) == ["mine", "theirs"]

    monkeypatch.setattr(db, "BUSY_TIMEOUT_S", 0.2)
    holding.clear()
    release.clear()
    late = GroupCommit(store, _spend_all())

    async def busy() -> Outcome:
        late.attach(asyncio.get_running_loop())
        holder = threading.Thread(target=hold, args=("theirs-too",))
        holder.start()
        assert await asyncio.to_thread(holding.wait, 10)
        got = await submit_all(late, ["too-late"])
        release.set()
        holder.join()
        await late.detach()
        return got["too-late"]

    refused = asyncio.run(busy())
    assert isinstance(refused, AuditUnavailable) and "another process held" in str(refused)
    assert _jtis(store) == ["mine", "theirs", "theirs-too"]  # not "too-late"
    other.close()
    group.close()
    late.close()


def test_detaching_hands_the_queue_to_the_writer_thread_and_loses_nothing(store: Store) -> None:
    """Items queued on the loop behind a batch that waits for the lock, and items submitted
    from another thread meanwhile, all commit across the detach; after it, run() (which a
    thread blocked on the loop would need) works from the loop's thread too."""
    other = Store(store.url)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with other.write():
            holding.set()
            assert release.wait(10)

    group = GroupCommit(store, _spend_all())

    async def main() -> dict[str, Outcome]:
        loop = asyncio.get_running_loop()
        group.attach(loop)
        holder = threading.Thread(target=hold)
        holder.start()
        assert await asyncio.to_thread(holding.wait, 10)
        waiting = asyncio.ensure_future(submit_all(group, ["q1", "q2"]))
        from_thread = asyncio.ensure_future(asyncio.to_thread(group.run, "t1"))
        await asyncio.sleep(0.05)
        with pytest.raises(RuntimeError, match="on the loop"):
            group.run("on-loop")  # would wait for itself
        detached = asyncio.ensure_future(group.detach())
        await asyncio.sleep(0.05)
        release.set()
        await detached
        await from_thread
        got = await waiting
        holder.join()
        return got

    got = asyncio.run(main())
    assert got == {"q1": None, "q2": None}
    group.run("after")  # the writer thread again
    assert _jtis(store) == ["after", "q1", "q2", "t1"]
    other.close()
    group.close()


def test_the_switch_interval_is_short_while_a_loop_writes_and_restored_after(
    store: Store,
) -> None:
    """After its fsync the committer needs the GIL back to give up the write lock; a busy loop
    lets go only when the switch interval is up, so the interval is short while attached."""
    before = sys.getswitchinterval()
    group, other = GroupCommit(store, _spend_all()), GroupCommit(store, _spend_all())

    async def main() -> tuple[float, float]:
        group.attach(asyncio.get_running_loop())
        other.attach(asyncio.get_running_loop())  # two brokers in one process (tests)
        during = sys.getswitchinterval()
        await group.detach()
        still = sys.getswitchinterval()
        await other.detach()
        return during, still

    during, still = asyncio.run(main())
    assert during == still <= loop_commit.SWITCH_S < before
    assert sys.getswitchinterval() == before
    group.close()
    other.close()


def test_a_failure_on_the_loop_answers_the_batch_and_the_next_one_commits(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What raises in the loop's part (the lock file failing, a bug after a commit) answers the
    batch's callers and leaves the writer locks free and the loop writing the next batch."""
    committed: list[Sequence[str]] = []
    group = GroupCommit(store, _spend_all(committed=committed))
    real_flock = db.fcntl.flock
    calls = {"n": 0}

    def flaky_flock(fd: int, operation: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(37, "No locks available")  # ENOLCK, once
        real_flock(fd, operation)

    with monkeypatch.context() as patched:
        patched.setattr(db.fcntl, "flock", flaky_flock)
        fault = contextlib.nullcontext()  # the first flock fails, whenever it is called
        failed, again = failed_then_next(group, fault, ["a", "b"], "c")
    assert all(isinstance(e, AuditUnavailable) for e in failed.values()), failed
    assert again == {"c": None} and _jtis(store) == ["c"]
    group.run("d")  # the in-process lock was given back: the writer thread gets it
    assert _jtis(store) == ["c", "d"]
    group.close()


def test_a_failing_after_commit_hook_still_answers_every_caller(store: Store) -> None:
    def write(conn: Any, items: Sequence[str]) -> tuple[list[Exception | None], Any]:
        outcomes, _ = _spend_all()(conn, items)

        def broken() -> None:
            raise RuntimeError("a bug after the commit")

        return outcomes, broken

    group = GroupCommit(store, write)

    async def main() -> tuple[dict[str, Outcome], dict[str, Outcome]]:
        group.attach(asyncio.get_running_loop())
        first = await submit_all(group, ["a", "b"])
        second = await submit_all(group, ["c"])
        await group.detach()
        return first, second

    first, second = asyncio.run(main())
    assert first == {"a": None, "b": None} and second == {"c": None}  # committed, answered
    assert _jtis(store) == ["a", "b", "c"]
    group.close()
