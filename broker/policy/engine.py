"""The policy engine: may this workload identity do this action on this model, and how?

Pure: no I/O, no clock, no regex compilation (globs are compiled by the loader). The answer is
a :class:`Decision` that carries its own explanation, so the token endpoint, ``broker policy
explain`` and the audit log all say the same thing about why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from broker.bounds import shown
from broker.errors import InvalidRequest, InvalidScope, InvalidTarget
from broker.identity.types import ClaimValue, WorkloadIdentity
from broker.policy.glob import glob_matches
from broker.policy.loader import CompiledRule, LoadedPolicy, list_known
from broker.policy.model import ActionConfig, ModelConfig, Tier

MISSING = "missing"
"""``RuleMiss.actual`` when the token has no such claim (values themselves are quoted)."""

_SUBJECT_CLAIM = "sub"


class Outcome(StrEnum):
    ALLOW = "allow"
    APPROVAL_REQUIRED = "approval_required"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class RuleMiss:
    """Why one rule did not match: the first of its checks that failed.

    ``check`` is ``issuer``, ``subject``, ``claims.<name>``, ``models``, ``actions`` or
    ``backends``. ``expected`` and ``actual`` are display text: values are quoted
    (``'acme/evals'``, ``one of 'a', 'b'``); issuer names and :data:`MISSING` are not.
    """

    rule: str
    check: str
    expected: str
    actual: str

    @property
    def label(self) -> str:
        """The check in words: ``issuer``, ``subject``, ``claim <name>``, ``model``..."""
        return _check_label(self.check)

    def sentence(self) -> str:
        """E.g. ``rule trainer: issuer: expected cluster, got github``."""
        return f"rule {self.rule}: {self.label}: expected {self.expected}, got {self.actual}"


@dataclass(frozen=True, slots=True)
class Decision:
    """The engine's answer for one (identity, model, action, backend).

    ``rule`` is the matching rule's name (``None`` on deny). ``ttl_seconds`` is the credential
    lifetime to issue (0 on deny). ``matched_claims`` holds the subject (as ``sub``) and the
    claims the matching rule checked, as compared: what a grant records as the claims that
    mattered. ``misses`` explains every rule before the match (or every rule, on deny).
    """

    outcome: Outcome
    model: str
    action: str
    backend: str
    tier: Tier
    rule: str | None
    ttl_seconds: int
    approvals_required: int
    rollback_required: bool
    matched_claims: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    misses: tuple[RuleMiss, ...] = ()

    def reasons(self) -> list[str]:
        """Human sentences: one per rule that did not match, then the conclusion."""
        sentences = [miss.sentence() for miss in self.misses]
        target = f"{self.action} on {self.model} via {self.backend}"
        if self.outcome is Outcome.ALLOW:
            sentences.append(
                f"rule {self.rule} matched: {target} is allowed for {self.ttl_seconds}s "
                f"(tier {self.tier})"
            )
        elif self.outcome is Outcome.APPROVAL_REQUIRED:
            needs = f"{self.approvals_required} approval(s) by people other than the requester"
            if self.rollback_required:
                needs += " and a tested rollback point"
            sentences.append(
                f"rule {self.rule} matched, but {self.action} is tier {self.tier}: {target} "
                f"needs {needs}"
            )
        elif not self.misses:
            sentences.append("the policy has no rules, so nothing is allowed")
        else:
            sentences.append(f"no rule allows {target} for this identity")
        return sentences


def decide(
    policy: LoadedPolicy,
    identity: WorkloadIdentity,
    model: str,
    action: str,
    backend: str,
    *,
    requested_ttl: int | None = None,
    datasets: Sequence[str] = (),
) -> Decision:
    """Decide whether ``identity`` may do ``action`` on ``model`` through ``backend``.

    Rules are tried in file order and the first one whose every check passes decides. No match
    (or no rules at all) is a deny. A match for a ``low`` action allows it; for an
    ``elevated`` or ``privileged`` action it requires approval. The TTL is the requested one
    capped at the action's ``max_ttl`` and its tier's ``max_ttl`` (the smaller of those when none
    is requested). ``datasets`` are the URIs the request would introduce; a rule that lists
    ``datasets`` matches only when each of them matches one of its patterns.

    Raises:
        InvalidTarget: the model is unknown, or does not configure ``backend``.
        InvalidScope: the action is unknown.
        InvalidRequest: ``requested_ttl`` is zero or negative.
    """
    model_config = _model(policy, model)
    action_config = _action(policy, action)
    if not model_config.has_backend(backend):
        raise InvalidTarget(
            f"model {shown(model)} has no {shown(backend)} backend",
            detail=f"model {shown(model)} has no {shown(backend)} backend; "
            f"configured: {', '.join(model_config.backend_names())}",
        )
    tier = policy.policy.tiers.get(action_config.tier)
    ttl = _ttl(action_config, requested_ttl, tier.max_ttl if tier else None)
    misses: list[RuleMiss] = []
    for compiled in policy.rules:
        miss = _first_miss(compiled, identity, model, action, backend) or _dataset_miss(
            compiled, datasets
        )
        if miss is None:
            return _matched(
                compiled,
                identity,
                model=model,
                action=action,
                backend=backend,
                action_config=action_config,
                ttl=ttl,
                misses=misses,
            )
        misses.append(miss)
    # NOTE: fail closed: no rules, or no rule matching in full, is a deny.
    return Decision(
        outcome=Outcome.DENY,
        model=model,
        action=action,
        backend=backend,
        tier=action_config.tier,
        rule=None,
        ttl_seconds=0,
        approvals_required=0,
        rollback_required=False,
        misses=tuple(misses),
    )


def _model(policy: LoadedPolicy, model: str) -> ModelConfig:
    config = policy.policy.models.get(model)
    if config is None:
        raise InvalidTarget(
            f"unknown model {shown(model)}",
            detail=f"unknown model {shown(model)}; {list_known(policy.policy.models)}",
        )
    return config


def _action(policy: LoadedPolicy, action: str) -> ActionConfig:
    config = policy.policy.actions.get(action)
    if config is None:
        raise InvalidScope(
            f"unknown action {shown(action)}",
            detail=f"unknown action {shown(action)}; {list_known(policy.policy.actions)}",
        )
    return config


def _ttl(action: ActionConfig, requested: int | None, tier_cap: int | None) -> int:
    cap = action.max_ttl if tier_cap is None else min(action.max_ttl, tier_cap)
    if requested is None:
        return cap
    if requested <= 0:
        raise InvalidRequest(f"the requested TTL must be positive, got {requested} seconds")
    return min(requested, cap)


def _dataset_miss(compiled: CompiledRule, datasets: Sequence[str]) -> RuleMiss | None:
    """The first dataset the rule does not allow (rules without ``datasets`` allow any)."""
    if not compiled.datasets:
        return None
    for uri in datasets:
        if not any(glob_matches(pattern, uri) for pattern in compiled.datasets):
            return RuleMiss(
                compiled.rule.name, "datasets", _one_of(compiled.rule.datasets), shown(uri)
            )
    return None


def _first_miss(
    compiled: CompiledRule, identity: WorkloadIdentity, model: str, action: str, backend: str
) -> RuleMiss | None:
    """The first failing check of ``compiled`` for this request, or ``None`` if all pass."""
    rule = compiled.rule
    if identity.issuer_name != rule.issuer:
        return RuleMiss(rule.name, "issuer", rule.issuer, identity.issuer_name)
    subject_miss = _subject_miss(compiled, identity.subject)
    if subject_miss is not None:
        return subject_miss
    for name, accepted in compiled.claims:
        if name not in identity.claims:
            return RuleMiss(rule.name, f"claims.{name}", _one_of(accepted), MISSING)
        value = identity.claims[name]
        text = claim_text(value)
        if text is None:
            actual = f"{_json_kind(value)} (only strings, integers and booleans are compared)"
            return RuleMiss(rule.name, f"claims.{name}", _one_of(accepted), actual)
        if text not in accepted:
            return RuleMiss(rule.name, f"claims.{name}", _one_of(accepted), shown(text))
    if not any(glob_matches(pattern, model) for pattern in compiled.models):
        return RuleMiss(rule.name, "models", _one_of(rule.models), shown(model))
    if action not in compiled.actions:
        return RuleMiss(rule.name, "actions", _one_of(rule.actions), shown(action))
    if backend not in compiled.backends:
        return RuleMiss(rule.name, "backends", _one_of(rule.backends), shown(backend))
    return None


def _subject_miss(compiled: CompiledRule, subject: str) -> RuleMiss | None:
    rule = compiled.rule
    if compiled.subject_pattern is None:
        if subject == rule.subject:
            return None
        expected = shown(rule.subject or "")
    else:
        if glob_matches(compiled.subject_pattern, subject):
            return None
        expected = f"pattern {shown(rule.subject_pattern or '')}"
    return RuleMiss(rule.name, "subject", expected, shown(subject))


def claim_text(value: ClaimValue) -> str | None:
    """A token claim as the text a rule compares, or ``None`` if it can never match.

    Strings compare as they are, integers in decimal, booleans as ``true``/``false``.
    """
    # NOTE: bool is checked before int because bool is a subclass of int (True would be "1").
    # Floats, lists, objects and null never match: their text form is ambiguous, and a list
    # claim "matching" because one member equals the expectation would widen a rule silently.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return None


def _matched(
    compiled: CompiledRule,
    identity: WorkloadIdentity,
    *,
    model: str,
    action: str,
    backend: str,
    action_config: ActionConfig,
    ttl: int,
    misses: list[RuleMiss],
) -> Decision:
    matched = {_SUBJECT_CLAIM: identity.subject}
    # Every checked claim has passed, so each one has a text form.
    matched.update(
        (name, text)
        for name, _ in compiled.claims
        if (text := claim_text(identity.claims[name])) is not None
    )
    needs_approval = action_config.tier != "low"
    return Decision(
        outcome=Outcome.APPROVAL_REQUIRED if needs_approval else Outcome.ALLOW,
        model=model,
        action=action,
        backend=backend,
        tier=action_config.tier,
        rule=compiled.rule.name,
        ttl_seconds=ttl,
        approvals_required=action_config.approvals if needs_approval else 0,
        rollback_required=needs_approval and action_config.rollback_tested == "required",
        matched_claims=MappingProxyType(matched),
        misses=tuple(misses),
    )


def _check_label(check: str) -> str:
    if check.startswith("claims."):
        return f"claim {check.removeprefix('claims.')}"
    labels = {"models": "model", "actions": "action", "backends": "backend", "datasets": "dataset"}
    return labels.get(check, check)


def _one_of(values: Sequence[str]) -> str:
    if len(values) == 1:
        return shown(values[0])
    return "one of " + ", ".join(shown(v) for v in values)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "a number" if isinstance(value, float) else f"a {type(value).__name__}"
