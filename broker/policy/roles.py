"""Which models a person's role covers: the one decision behind delegated administration.

Pure. A role held through a plain group (``admin: [ml-platform-admins]``) covers every model;
one held only through scoped groups (``{group: vendor-ops, models: ["vendor-*"]}``) covers the
models those globs match. Holding a role through several groups covers the union. Every admin,
approver and auditor route asks :func:`access_for` (through ``broker.api.deps``), so that
listing, showing, revoking, reviewing and reading the audit log all refuse or filter alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from broker.bounds import shown
from broker.identity.types import Person
from broker.policy.glob import compile_glob, glob_matches
from broker.policy.model import ActionConfig, Policy


@dataclass(frozen=True)
class ModelAccess:
    """The models some roles of a person cover: all (``patterns`` None) or those matching
    ``patterns``; no role at all is an empty tuple."""

    roles: tuple[str, ...]
    patterns: tuple[str, ...] | None

    @property
    def unscoped(self) -> bool:
        """Whether the role covers every model (a plain group)."""
        return self.patterns is None

    def allows(self, model: str) -> bool:
        if self.patterns is None:
            return True
        return any(glob_matches(compile_glob(p), model) for p in self.patterns)

    def models_in(self, names: Iterable[str]) -> list[str] | None:
        """Of ``names`` (the policy's models), those covered; None when every model is."""
        if self.patterns is None:
            return None
        return sorted(name for name in names if self.allows(name))

    def covers_glob(self, pattern: str) -> bool:
        """Whether everything ``pattern`` can match is covered: it is one of the scope's own
        globs, or a literal model name (no wildcard) that the scope allows. NOTE: deciding
        that one glob contains another in general is not attempted; a scoped caller names its
        own globs or single models."""
        if self.patterns is None:
            return True
        if pattern in self.patterns:
            return True
        return "*" not in pattern and "?" not in pattern and self.allows(pattern)

    def refuses(self, model: str) -> str | None:
        """Why this access does not cover ``model``, or None."""
        if self.allows(model):
            return None
        return f"holds {self.describe()}; {shown(model)} is not among them"

    def describe(self) -> str:
        roles = " or ".join(self.roles)
        if self.patterns is None:
            return f"{roles} for every model"
        return f"{roles} for models {list(self.patterns)} only"


def access_for(policy: Policy, person: Person, *roles: str) -> ModelAccess:
    """The models that ``person``'s groups give any of ``roles`` for (``roles`` of the
    result: those of them the person holds)."""
    patterns: list[str] = []
    held: list[str] = []
    for role in roles:
        for group in policy.roles.get(role, []):  # type: ignore[call-overload]
            if isinstance(group, str):
                if group in person.groups:
                    return ModelAccess((role,), None)
            elif group.group in person.groups:
                held += [role] if role not in held else []
                patterns += [m for m in group.models if m not in patterns]
    return ModelAccess(tuple(held), tuple(patterns))


def may_interfere(access: ModelAccess, action: ActionConfig | None) -> bool:
    """Whether a holder of ``access`` may revoke, bulk-revoke or review what concerns
    ``action``. NOTE: an action marked ``rollback: true`` is the owners' way back: only a role
    that covers every model (the customer's own) may stop it; a role scoped to models (a
    vendor's) never can (docs/approvals.md "Delegated administration")."""
    return access.unscoped or action is None or not action.rollback
