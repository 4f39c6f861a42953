"""Which log entries concern which models: the rule a scoped export is built and checked by.

Pure: the exporter (over the whole log, in the store) and the offline verifier (over the
export's entries alone) run the same :class:`ScopeTracker`, so what one includes the other
accepts, and an entry of another model is named.

An event belongs to the model it names (``model``, or ``request.model`` for
``approval.requested``); an event that names none belongs to the model of the grant
(``grant_id``) or approval request (``approval_id``) it follows, as named by the first event
of that grant or request seen. Events tied to no model (``policy.loaded``,
``signing_key.rotated``, ``refusals.summary``) are in no model's scope.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from broker.policy.glob import compile_glob, glob_matches


class ModelScope:
    """A set of model globs (``broker.policy.glob`` syntax: ``vendor-*``)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        """Raises ValueError when ``patterns`` is empty (a scope of nothing is a mistake)."""
        if not patterns:
            raise ValueError("a model scope needs at least one glob")
        self.patterns = tuple(patterns)
        self._compiled = [compile_glob(p) for p in patterns]

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and any(glob_matches(p, model) for p in self._compiled)


class ScopeTracker:
    """Reads events in index order and says which belong to a model in ``scope``."""

    def __init__(self, scope: ModelScope) -> None:
        self.scope = scope
        self._grants: dict[str, str] = {}
        self._approvals: dict[str, str] = {}

    def model_of(self, event: Mapping[str, Any]) -> str | None:
        """The model ``event`` concerns (remembering its grant and approval ties), or None."""
        model = event.get("model")
        request = event.get("request")
        if not isinstance(model, str) and isinstance(request, Mapping):
            model = request.get("model")
        grant_id, approval_id = event.get("grant_id"), event.get("approval_id")
        if isinstance(model, str):
            if isinstance(grant_id, str):
                self._grants.setdefault(grant_id, model)
            if isinstance(approval_id, str):
                self._approvals.setdefault(approval_id, model)
            return model
        if isinstance(grant_id, str) and grant_id in self._grants:
            return self._grants[grant_id]
        if isinstance(approval_id, str):
            return self._approvals.get(approval_id)
        return None

    def admits(self, event: Mapping[str, Any]) -> bool:
        """Whether ``event`` belongs to a model in the scope. Call it for every event in order."""
        return self.model_of(event) in self.scope
