"""Budgets for unverifiable attempts, per client address, and the summary of what they held back.

An attempt whose token does not verify (malformed, untrusted issuer, bad signature, expired) is
attributable to nobody, so it must not let anyone fill the log or the disk. Each client address
has a token bucket (``burst`` attempts, refilled at ``rate`` per second). Every attempt takes a
token before any verification work, and with the bucket empty the API answers 429; an attempt
that turns out to be a success or a refusal of a verified identity gives its token back, so
only refusals of unverifiable attempts keep what they took. (Taking first, not after the
refusal, keeps concurrent attempts from all passing the check at once.)

What is not recorded one by one (the 429s, and refusals the exchange never got to record, such
as a malformed form) is counted by reason and written as one ``refusals.summary`` event per
client address and endpoint per maintenance round, so nothing is lost and the log stays bounded.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker.audit.log import rfc3339

MAX_CLIENTS = 65_536
"""Buckets and tallies kept at once; the least recently seen client is forgotten first (a
forgotten bucket is a full one). Past this many tallies, new clients count as ``other``."""
OTHER_CLIENTS = "other"


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float


@dataclass(slots=True)
class _Tally:
    since: dt.datetime
    until: dt.datetime
    counts: Counter[str] = field(default_factory=Counter)


class RefusalBudget:
    """Token buckets per client address and the tally of unrecorded refusals. Thread-safe."""

    def __init__(
        self,
        *,
        burst: int,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.burst = burst
        self.rate = rate
        self._clock = clock
        self._wall_clock = wall_clock
        self._max = max_clients
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._tallies: dict[tuple[str, str], _Tally] = {}

    def take(self, client: str) -> int | None:
        """Take a token for an attempt of ``client``: None when it had one, else the whole
        seconds until it will (and nothing is taken)."""
        with self._lock:
            bucket = self._bucket(client)
            if bucket.level >= 1:
                bucket.level -= 1
                return None
            return max(1, math.ceil((1 - bucket.level) / self.rate))

    def refund(self, client: str) -> None:
        """Give back the token of an attempt that was no unverifiable refusal."""
        with self._lock:
            bucket = self._bucket(client)
            bucket.level = min(float(self.burst), bucket.level + 1)

    def count(self, client: str, endpoint: str, reason: str) -> None:
        """Remember a refusal no event records one by one, for the next summary."""
        now = self._wall_clock()
        with self._lock:
            key = (client, endpoint)
            if key not in self._tallies and len(self._tallies) >= self._max:
                key = (OTHER_CLIENTS, endpoint)
            tally = self._tallies.get(key)
            if tally is None:
                tally = self._tallies[key] = _Tally(since=now, until=now)
            tally.until = now
            tally.counts[reason] += 1

    def drain(self) -> list[dict[str, Any]]:
        """The summaries counted since the last drain (one per client and endpoint), as event
        data, and forget them."""
        with self._lock:
            tallies, self._tallies = self._tallies, {}
        return [
            {
                "client": client,
                "endpoint": endpoint,
                "since": rfc3339(tally.since),
                "until": rfc3339(tally.until),
                "counts": dict(sorted(tally.counts.items())),
                "total": sum(tally.counts.values()),
            }
            for (client, endpoint), tally in sorted(tallies.items(), key=lambda kv: kv[0])
        ]

    def restore(self, summaries: list[dict[str, Any]]) -> None:
        """Put drained summaries back (their event could not be written): counted again next
        round, merged with what came meanwhile."""
        with self._lock:
            for summary in summaries:
                key = (summary["client"], summary["endpoint"])
                since = dt.datetime.fromisoformat(summary["since"])
                tally = self._tallies.setdefault(key, _Tally(since=since, until=since))
                tally.since = min(tally.since, since)
                tally.until = max(tally.until, dt.datetime.fromisoformat(summary["until"]))
                tally.counts.update(summary["counts"])

    def _bucket(self, client: str) -> _Bucket:
        """``client``'s bucket, refilled up to now (the lock is held)."""
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
            bucket.level = min(float(self.burst), bucket.level + (now - bucket.at) * self.rate)
            bucket.at = now
        return bucket
