"""The tamper-evident log on the store: append, checkpoints, proofs.

Each event is appended in its caller's transaction: its dense index from ``log_head``, its exact
canonical bytes in ``events``, and the Merkle nodes it completes in ``tree_nodes`` (O(log n)).
So an event, its grant and its leaf commit together or not at all.

NOTE: events never hold a token or a credential. Where correlation is needed (the same bad token
presented twice) they hold ``token_hmac``: HMAC-SHA256 with a per-log secret, as Vault's audit
devices do, so the log cannot be used to test guesses of a token.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Table, bindparam, insert, select, tuple_, update
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from broker.audit.anchor import ANCHOR_FILE, AnchorError, AnchorFile
from broker.audit.checkpoint import Checkpoint, CheckpointError, NoteSigner, NoteVerifier
from broker.audit.integrity import ANCHOR, Integrity
from broker.audit.keys import load_or_create, open_signer
from broker.audit.merkle import (
    Frontier,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    verify_consistency,
)
from broker.errors import BrokerError, ConfigError, InvalidRequest
from broker.jsonbytes import Encoder
from broker.keys.store import AUDIT_HMAC, AUDIT_SIGNING, KeyStore
from broker.store.bulk import execute, insert_tuples, process, raw_rows, select_in
from broker.store.tables import CheckpointRow, EventRow, LogHeadRow, TreeNodeRow

log = logging.getLogger("broker.audit")
EVENT_VERSION = 1
MAX_EVENT_BYTES = 64 * 1024
_PENDING = "audit_pending_frontier"


def _table(row: type[Any]) -> Table:
    table = row.__table__
    assert isinstance(table, Table)
    return table


# NOTE: the append path is SQLAlchemy Core with statements built once: no unit of work, no
# autoflush, no ORM evaluator, and the compiled form is cached (see docs/performance.md).
_EVENTS, _TREE_NODES, _LOG_HEAD = _table(EventRow), _table(TreeNodeRow), _table(LogHeadRow)
_NEXT_INDEX = (
    update(_LOG_HEAD)
    .where(_LOG_HEAD.c.id == 1)
    .values(size=_LOG_HEAD.c.size + 1)
    .returning(_LOG_HEAD.c.size)
)
_INSERT_EVENT = insert(_EVENTS)
_INSERT_NODES = insert(_TREE_NODES)
_FRONTIER_NODES = select(_TREE_NODES.c.level, _TREE_NODES.c.idx, _TREE_NODES.c.hash).where(
    tuple_(_TREE_NODES.c.level, _TREE_NODES.c.idx).in_(bindparam("nodes", expanding=True))
)
_LOCK_HEAD = select(_LOG_HEAD.c.size).where(_LOG_HEAD.c.id == 1).with_for_update()
_SET_HEAD = update(_LOG_HEAD).where(_LOG_HEAD.c.id == 1).values(size=bindparam("new_size"))
_EVENT_KEYS = ("idx", "type", "at", "grant_id", "body")
_NODE_KEYS = ("level", "idx", "hash")


class AuditIntegrityError(BrokerError):
    """The stored log disagrees with a signed checkpoint: the broker refuses to sign over it."""

    code = "audit_integrity"
    status = 500


_CANONICAL = Encoder(sort_keys=True, ensure_ascii=False, allow_nan=False)
"""One encoder for every event and digest."""


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: sorted keys, no spaces, UTF-8, no NaN: the bytes of
    ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    allow_nan=False)`` (broker.jsonbytes)."""
    return _CANONICAL.encode(value)


def rfc3339(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append (see :meth:`AuditLog.append_batch`)."""

    type: str
    at: dt.datetime
    data: dict[str, Any]
    grant_id: str | None = None


def encode_event(idx: int, event: NewEvent) -> bytes:
    """The event's leaf bytes at ``idx``. Raises ValueError when they exceed MAX_EVENT_BYTES."""
    body = canonical_json(
        {
            "v": EVENT_VERSION,
            "idx": idx,
            "type": event.type,
            "at": rfc3339(event.at),
            "grant_id": event.grant_id,
            **event.data,
        }
    )
    return _checked(event, body)


def _checked(event: NewEvent, body: bytes) -> bytes:
    if len(body) > MAX_EVENT_BYTES:
        raise ValueError(f"event {event.type} is {len(body)} bytes; the limit is {MAX_EVENT_BYTES}")
    return body


@dataclass(frozen=True, slots=True)
class PreparedEvent:
    """An event encoded but for its index, before the store's write lock: its leaf bytes at
    ``idx`` are ``head + str(idx) + tail`` (see :func:`prepare_event`)."""

    event: NewEvent
    head: bytes
    tail: bytes
    at: Any
    """``event.at`` as the driver of ``dialect`` takes it (broker.store.bulk), or ``event.at``."""
    dialect: str | None = None

    def encode(self, idx: int) -> bytes:
        """:func:`encode_event` of the event at ``idx``, without encoding it again."""
        return _checked(self.event, b"%s%d%s" % (self.head, idx, self.tail))


def prepare_event(event: NewEvent, dialect: Dialect | None = None) -> NewEvent | PreparedEvent:
    """``event`` encoded but for its index, to be appended with :meth:`AuditLog.append_batch`
    (its time processed for ``dialect``'s driver where that takes rows processed ahead,
    broker.store.bulk). The event itself when it cannot be split (its data names ``idx``, or
    does not encode: the append says why).

    NOTE: why (docs/performance.md): under the write lock only the index is spliced in. The
    canonical form sorts the top-level names, so the bytes before ``"idx":`` are those of the
    names that sort before it, and the bytes after, those that sort after (a nested ``idx`` is
    a member of another object and sorts with it)."""
    fields = {"v": EVENT_VERSION, "type": event.type, "at": rfc3339(event.at)}
    fields |= {"grant_id": event.grant_id, **event.data}
    if "idx" in fields:
        return event
    try:
        before = canonical_json({k: v for k, v in fields.items() if k < "idx"})
        after = canonical_json({k: v for k, v in fields.items() if k > "idx"})
    except (ValueError, TypeError, RecursionError):
        return event
    # Names sort on both sides of "idx" always: "at" and "grant_id" before, "type" and "v" after.
    head = before[:-1] + b',"idx":'
    tail = b"," + after[1:]
    if dialect is None or not raw_rows(dialect):
        return PreparedEvent(event, head, tail, event.at)
    return PreparedEvent(event, head, tail, _driver_at(dialect, event.at), dialect.name)


def _driver_at(dialect: Dialect, at: dt.datetime) -> Any:
    return process(dialect, _EVENTS, {"at": at}).values[0]


def frontier_nodes(size: int) -> list[tuple[int, int]]:
    """(level, index) of the perfect subtrees that make up a tree of ``size``, largest first."""
    nodes = []
    offset = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            nodes.append((level, offset >> level))
            offset += 1 << level
    return nodes


class StoreHashReader:
    """A :class:`broker.audit.merkle.HashReader` over the ``tree_nodes`` table."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def get_node(self, level: int, index: int) -> bytes:
        row = self._session.get(TreeNodeRow, (level, index))
        if row is None:
            raise LookupError(f"tree node ({level}, {index}) is missing")
        return row.hash


@dataclass(frozen=True)
class SignedCheckpoint:
    size: int
    root: bytes
    note: str
    signed_at: dt.datetime


SignedHook = Callable[[Session, "SignedCheckpoint"], None]
"""Called in the transaction that stored a newly signed checkpoint (publication queues it)."""


class AuditLog:
    """Appends events as Merkle leaves and signs checkpoints over them."""

    def __init__(
        self, signer: NoteSigner, hmac_key: bytes, *, anchor: AnchorFile | None = None
    ) -> None:
        self.signer = signer
        self.anchor = anchor
        """Where the newest signed checkpoint is remembered outside the store (None: nowhere)."""
        self.integrity = Integrity()
        self.on_signed: list[SignedHook] = []
        self._hmac_key = hmac_key
        self._lock = threading.Lock()
        self._committed: Frontier | None = None  # the frontier of a committed state

    @classmethod
    def from_store(
        cls, keys: KeyStore, *, data_dir: Path | None, default_origin: str | None = None
    ) -> AuditLog:
        """The log whose Ed25519 key, origin and HMAC secret are sealed in the store (see
        :mod:`broker.audit.keys`), with the anchor ``audit-anchor`` in ``data_dir`` (None: no
        anchor; see :mod:`broker.audit.anchor`).

        The origin is fixed when the log's key is created: it names the log in every
        checkpoint and in the verifier key, so it must not change with the broker's address.
        Without ``default_origin`` nothing is created, and a store without a log key is a
        ConfigError. Raises ConfigError."""
        if default_origin is None:
            signer = open_signer(keys)
            if signer is None:
                raise ConfigError("the store has no audit log key (no broker has run on it)")
            found = keys.find(AUDIT_HMAC)
            hmac_key = found[0].secret if found else b""
        else:
            if not keys.find(AUDIT_SIGNING):
                with keys.store.read() as session:
                    size = cls.size(session)
                if size:
                    # NOTE: fail closed: a new key would sign on as if the log were its own.
                    raise ConfigError(
                        f"the store's audit log has {size} entries but no log key: it was "
                        "deleted from the keys table (restore it from a backup), or the data "
                        "dir that held it is not this broker's --data-dir"
                    )
            signer, hmac_key = load_or_create(keys, default_origin)
        anchor = None
        if data_dir is not None:
            verifier = NoteVerifier.from_vkey(signer.verifier_key())
            anchor = AnchorFile(data_dir / ANCHOR_FILE, verifier)
        return cls(signer, hmac_key, anchor=anchor)

    @property
    def origin(self) -> str:
        return self.signer.name

    def verifier_key(self) -> str:
        return self.signer.verifier_key()

    def token_hmac(self, token: str) -> str:
        """A keyed hash of a token, for correlating events without storing the token."""
        digest = hmac.new(self._hmac_key, token.encode(), hashlib.sha256).hexdigest()
        return f"hmac-sha256:{digest}"

    # --- appending -----------------------------------------------------------------------------

    def append(
        self,
        session: Session,
        type_: str,
        at: dt.datetime,
        data: dict[str, Any],
        *,
        grant_id: str | None = None,
    ) -> int:
        """Append one event in ``session``'s transaction and return its index.

        The index comes from incrementing the single ``log_head`` row, which serialises
        appenders and keeps indexes dense even when a transaction rolls back (a sequence would
        leave gaps). Raises ValueError when the encoded event exceeds MAX_EVENT_BYTES.
        """
        # Core on the session's connection: no flush of the caller's pending ORM objects.
        conn = session.connection()
        idx = int(conn.execute(_NEXT_INDEX).scalar_one()) - 1
        body = encode_event(idx, NewEvent(type_, at, data, grant_id))
        pending: Frontier | None = session.info.get(_PENDING)
        frontier = self._frontier_for(conn, idx, pending)
        nodes = frontier.append(leaf_hash(body))
        conn.execute(
            _INSERT_EVENT, {"idx": idx, "type": type_, "at": at, "grant_id": grant_id, "body": body}
        )
        conn.execute(_INSERT_NODES, [{"level": lv, "idx": i, "hash": h} for lv, i, h in nodes])
        if pending is None:
            sa_event.listen(session, "after_commit", self._after_commit, once=True)
        session.info[_PENDING] = frontier
        return idx

    def append_batch(
        self, conn: Connection, events: Sequence[NewEvent | PreparedEvent]
    ) -> tuple[list[int | ValueError], Frontier | None]:
        """Append ``events`` in order in ``conn``'s transaction, with one read and one update of
        ``log_head`` and one multi-row insert per table. Returns, per event, its index or the
        ValueError that kept it out (larger than MAX_EVENT_BYTES: it takes no index), and the
        frontier after the batch for :meth:`committed` (None when nothing was appended).

        NOTE: on SQLite every statement goes through the driver (broker.store.bulk), and
        events made by :func:`prepare_event` (with their time processed) are only completed
        with their index here, under the write lock."""
        if not events:
            return [], None
        raw = raw_rows(conn.dialect)
        [(size,)] = execute(conn, _LOCK_HEAD)  # PostgreSQL: locks the row
        start = int(size)
        frontier = self._frontier_for(conn, start, None)
        results: list[int | ValueError] = []
        rows: list[tuple[Any, ...]] = []
        nodes: list[tuple[int, int, bytes]] = []
        for item in events:
            idx = start + len(rows)
            try:
                if isinstance(item, PreparedEvent):
                    event, body, at = item.event, item.encode(idx), item.at
                    if item.dialect != (conn.dialect.name if raw else None):
                        at = _driver_at(conn.dialect, event.at) if raw else event.at
                else:
                    event, body = item, encode_event(idx, item)
                    at = _driver_at(conn.dialect, event.at) if raw else event.at
            except ValueError as exc:
                results.append(exc)
                continue
            nodes.extend(frontier.append(leaf_hash(body)))
            rows.append((idx, event.type, at, event.grant_id, body))
            results.append(idx)
        if not rows:
            return results, None
        execute(conn, _SET_HEAD, {"new_size": start + len(rows)})
        if raw:
            insert_tuples(conn, _EVENTS, _EVENT_KEYS, rows)
            insert_tuples(conn, _TREE_NODES, _NODE_KEYS, nodes)
        else:
            conn.execute(_INSERT_EVENT, [dict(zip(_EVENT_KEYS, r, strict=True)) for r in rows])
            conn.execute(_INSERT_NODES, [dict(zip(_NODE_KEYS, n, strict=True)) for n in nodes])
        return results, frontier

    def committed(self, frontier: Frontier) -> None:
        """Remember ``frontier`` as the tree of a committed state (call it after the commit)."""
        with self._lock:
            if self._committed is None or frontier.size > self._committed.size:
                self._committed = frontier

    def _frontier_for(self, conn: Connection, size: int, pending: Frontier | None) -> Frontier:
        """A new frontier of the tree of ``size`` leaves: from this transaction's earlier appends,
        from the last committed state this process saw, or from the stored nodes. A copy, so
        that ``pending`` stays as it was."""
        if pending is not None and pending.size == size:
            return Frontier.from_hashes(size, pending.hashes)
        with self._lock:
            committed = self._committed
        if committed is not None and committed.size == size:
            # NOTE: only committed states are cached; equal size means equal tree, because
            # committed history is append-only.
            return Frontier.from_hashes(size, committed.hashes)
        return self._load_frontier(conn, size)

    @staticmethod
    def _load_frontier(session: Session | Connection, size: int) -> Frontier:
        wanted = frontier_nodes(size)
        if not wanted:
            return Frontier()
        # NOTE: prebuilt, or through the driver on SQLite: with several workers nearly every
        # batch reloads the frontier another process moved, under the write lock (741 µs a
        # statement built per call, 459 prebuilt).
        rows: Sequence[Any]
        if isinstance(session, Connection) and raw_rows(session.dialect):
            rows = select_in(session, _TREE_NODES, _NODE_KEYS, ("level", "idx"), wanted)
        else:
            rows = session.execute(_FRONTIER_NODES, {"nodes": wanted}).all()
        found = {(level, idx): hash_ for level, idx, hash_ in rows}
        missing = [n for n in wanted if n not in found]
        if missing:
            raise AuditIntegrityError(f"the log's tree nodes {missing} are missing")
        return Frontier.from_hashes(size, [found[n] for n in wanted])

    def _after_commit(self, session: Session) -> None:
        frontier: Frontier | None = session.info.pop(_PENDING, None)
        if frontier is not None:
            self.committed(frontier)

    # --- reading -------------------------------------------------------------------------------

    @staticmethod
    def size(session: Session) -> int:
        return int(session.execute(select(LogHeadRow.size).where(LogHeadRow.id == 1)).scalar_one())

    def root(self, session: Session, size: int) -> bytes:
        return self._load_frontier(session, size).root()

    @staticmethod
    def latest_checkpoint(session: Session) -> SignedCheckpoint | None:
        row = session.scalars(select(CheckpointRow).order_by(CheckpointRow.size.desc())).first()
        return _signed(row) if row else None

    @staticmethod
    def checkpoints(session: Session) -> list[SignedCheckpoint]:
        return [
            _signed(r) for r in session.scalars(select(CheckpointRow).order_by(CheckpointRow.size))
        ]

    @staticmethod
    def entries(session: Session, start: int, end: int) -> Sequence[EventRow]:
        query = select(EventRow).where(EventRow.idx >= start, EventRow.idx < end)
        return session.scalars(query.order_by(EventRow.idx)).all()

    def inclusion_proof(self, session: Session, index: int, size: int) -> list[bytes]:
        self._check_size(session, size)
        if not 0 <= index < size:
            raise InvalidRequest(f"index: expected 0..{size - 1} for size {size}, got {index}")
        return inclusion_proof(index, size, StoreHashReader(session))

    def consistency_proof(self, session: Session, old: int, new: int) -> list[bytes]:
        self._check_size(session, new)
        if not 0 < old <= new:
            raise InvalidRequest(f"from/to: expected 0 < from <= to, got {old} and {new}")
        return consistency_proof(old, new, StoreHashReader(session))

    def _check_size(self, session: Session, size: int) -> None:
        current = self.size(session)
        if not 0 < size <= current:
            raise InvalidRequest(f"size: expected 1..{current} (the log's size), got {size}")

    # --- checkpoints ---------------------------------------------------------------------------

    def check(self, session: Session) -> str | None:
        """Whether the store is still the history this broker signed: a consistent extension of
        the anchor and of the newest stored checkpoint. Reports the verdict to
        :attr:`integrity` and returns the problem, or None. Reads O(log n) tree nodes."""
        size = self.size(session)
        problem = self._anchor_problem(session, size) or self._stored_problem(session, size)
        if problem is None:
            self._follow(session)
        self.integrity.report(ANCHOR, problem)
        return problem

    def _follow(self, session: Session) -> None:
        """Advance the anchor to the newest stored checkpoint when it is larger: another
        replica signed it with the log's key, and the store (just found to extend both the
        anchor and it) proves it consistent with the anchor. So a replica that does not sign
        checkpoints itself still remembers how far the history it vouches for reached.

        NOTE: the note must verify with the log's key (sealed with the KEK, which a database
        writer does not hold) and name exactly the stored size and root that were checked."""
        anchor, latest = self.anchor, self.latest_checkpoint(session)
        if anchor is None or latest is None:
            return
        try:
            anchored = anchor.load()
            if anchored is not None and anchored.size >= latest.size:
                return
            signed = NoteVerifier.from_vkey(self.verifier_key()).verify(latest.note.encode())
        except (AnchorError, CheckpointError):
            return
        if (signed.size, signed.root) != (latest.size, latest.root):
            return
        try:
            anchor.advance(latest.note.encode())
        except (AnchorError, OSError) as exc:
            log.error("the audit anchor was not advanced to checkpoint %d: %s", latest.size, exc)

    def sign_checkpoint(self, session: Session, now: dt.datetime) -> SignedCheckpoint:
        """Sign a checkpoint of the whole log, unless the newest one already covers it.

        Runs in a write transaction (which holds the log's write lock). NOTE: it refuses to
        sign unless the stored tree is a consistent extension of the anchor and of the newest
        stored checkpoint (RFC 6962 consistency proofs from the store, checked by the pure
        Merkle code), so the broker never signs over a rewritten history nor signs two
        inconsistent checkpoints. Raises AuditIntegrityError then, and the verdict stands in
        :attr:`integrity` until a check agrees again. Once the transaction commits, the
        checkpoint becomes the anchor.
        """
        size = int(
            session.execute(
                select(LogHeadRow.size).where(LogHeadRow.id == 1).with_for_update()
            ).scalar_one()
        )
        problem = self._anchor_problem(session, size) or self._stored_problem(session, size)
        self.integrity.report(ANCHOR, problem)
        if problem is not None:
            raise AuditIntegrityError(f"{problem}: refusing to sign")
        latest = self.latest_checkpoint(session)
        if latest is not None and latest.size == size:
            signed = latest
        else:
            root = self._load_frontier(session, size).root()
            note = self.signer.sign(Checkpoint(self.origin, size, root)).decode()
            session.add(CheckpointRow(size=size, root=root, note=note, signed_at=now))
            signed = SignedCheckpoint(size=size, root=root, note=note, signed_at=now)
            for hook in self.on_signed:
                hook(session, signed)
        self._anchor_after_commit(session, signed)
        return signed

    def _anchor_problem(self, session: Session, size: int) -> str | None:
        """Why the store of ``size`` entries is not a consistent extension of the anchor."""
        if self.anchor is None:
            return None
        try:
            anchor = self.anchor.load()
        except AnchorError as exc:
            return str(exc)
        if anchor is None or anchor.size == 0:
            return None
        held = f"the anchor ({self.anchor.path.name}) holds checkpoint {anchor.size}"
        if size < anchor.size:
            return f"{held} but the store has {size} entries: the log was truncated or rolled back"
        try:
            root_then = self._load_frontier(session, anchor.size).root()
            root_now = self._load_frontier(session, size).root()
            proof = consistency_proof(anchor.size, size, StoreHashReader(session))
        except (AuditIntegrityError, LookupError) as exc:
            return f"{held} but the store's tree cannot prove it: {exc}"
        if root_then != anchor.root:
            return (
                f"{held} but the store's first {anchor.size} entries hash to another root: "
                "history was rewritten"
            )
        if not verify_consistency(anchor.size, size, anchor.root, root_now, proof):
            return f"{held} but the store's tree of {size} entries is not consistent with it"
        return None

    def _stored_problem(self, session: Session, size: int) -> str | None:
        """Why the store of ``size`` entries is not a consistent extension of the newest
        checkpoint stored with it."""
        latest = self.latest_checkpoint(session)
        if latest is None or latest.size == 0:
            return None
        if latest.size > size:
            return f"the log has {size} entries but checkpoint {latest.size} was signed: truncated"
        try:
            root = self._load_frontier(session, size).root()
            proof = consistency_proof(latest.size, size, StoreHashReader(session))
        except (AuditIntegrityError, LookupError) as exc:
            return f"cannot prove consistency: {exc}"
        if not verify_consistency(latest.size, size, latest.root, root, proof):
            return (
                f"the stored tree of size {size} is not consistent with the signed "
                f"checkpoint of size {latest.size}"
            )
        return None

    def _anchor_after_commit(self, session: Session, signed: SignedCheckpoint) -> None:
        """Make ``signed`` the anchor once ``session`` commits (never before: an anchor ahead of
        a store whose commit failed would read as a rollback). A failure to write it is
        logged; the anchor stays at the older checkpoint, which the store still extends."""
        anchor = self.anchor
        if anchor is None:
            return
        note = signed.note.encode()

        def advance(_session: Session) -> None:
            try:
                anchor.advance(note)
            except (AnchorError, OSError) as exc:
                log.error(
                    "the audit anchor was not advanced to checkpoint %d: %s", signed.size, exc
                )

        sa_event.listen(session, "after_commit", advance, once=True)


def _signed(row: CheckpointRow) -> SignedCheckpoint:
    return SignedCheckpoint(size=row.size, root=row.root, note=row.note, signed_at=row.signed_at)
