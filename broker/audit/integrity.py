"""The broker's verdict on its own log, cached: is the store still the history the broker signed?

The checks that prove a store rewritten are too costly for every exchange (they read the tree,
or replay state), so they run at start-up, at every checkpoint signing and in each maintenance
round, and report here. An exchange reads only the cached verdict: no query, no lock.
"""

from __future__ import annotations

import logging
import threading

from broker.errors import AuditUnavailable

log = logging.getLogger("broker.audit")

ANCHOR = "anchor"
"""The store disagrees with the anchor (or with a checkpoint it signed): history was rewritten."""
STATE = "state"
"""The grants, approvals or revocation tables say something the log does not."""


class Integrity:
    """Problems found by each check (``anchor``, ``state``), or none. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._problems: dict[str, str] = {}
        self._suspects: set[str] = set()

    def report(self, check: str, problem: str | None) -> None:
        """Record the outcome of ``check``: a problem (logged CRITICAL, each time it is found:
        it stands until an operator acts) or None (the check agrees again)."""
        with self._lock:
            before = self._problems.get(check)
            problems = dict(self._problems)
            if problem is None:
                problems.pop(check, None)
            else:
                problems[check] = problem
            # NOTE: replaced, never mutated, so that readers need no lock (see refuse_issuance).
            self._problems = problems
        if problem is not None:
            log.critical("AUDIT INTEGRITY (%s): %s", check, problem)
        elif before is not None:
            log.warning("audit %s check agrees again (it had found: %s)", check, before)

    def suspect(self, grant_id: str, problem: str) -> None:
        """A grant found to disagree with the log outside the state check (introspection): the
        ``state`` check fails now, and its next rounds replay the grant until it agrees."""
        with self._lock:
            self._suspects.add(grant_id)
        self.report(STATE, f"grant {grant_id}: {problem}")

    def suspects(self) -> set[str]:
        with self._lock:
            return set(self._suspects)

    def clear_suspects(self, agreeing: set[str]) -> None:
        """Forget the suspects that were replayed and agree with the log again."""
        with self._lock:
            self._suspects -= agreeing

    def problem(self, check: str) -> str | None:
        return self._problems.get(check)

    def problems(self) -> dict[str, str]:
        return dict(self._problems)

    def refuse_issuance(self) -> None:
        """Raise AuditUnavailable while any check stands failed. NOTE: fail closed: a store
        proven rewritten is an audit log that cannot be trusted to record what is issued. The
        caller learns only that (the details are in the broker's log and ``/readyz``)."""
        if self._problems:
            raise AuditUnavailable(
                "the audit log failed its integrity check; nothing is issued until an operator "
                "resolves it"
            )
