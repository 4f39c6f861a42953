"""The policy engine: rule matching, check order, outcomes, TTLs and reasons."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from broker.errors import InvalidRequest, InvalidScope, InvalidTarget
from broker.policy import Decision, LoadedPolicy, Outcome, RuleMiss, decide

EVAL_WORKFLOW = "acme/workflows/.github/workflows/eval.yml@refs/heads/main"
EVAL_SUBJECT = "repo:acme/evals:ref:refs/heads/main"
TRAINER = "system:serviceaccount:training:trainer"
TRAINING_NS = {"kubernetes.io/namespace": "training"}


def trainer_identity(make_identity: Any, **overrides: Any) -> Any:
    fields: dict[str, Any] = {"issuer_name": "cluster", "subject": TRAINER, "claims": TRAINING_NS}
    return make_identity(**{**fields, **overrides})


def only_miss(decision: Decision, rule: str) -> RuleMiss:
    return next(miss for miss in decision.misses if miss.rule == rule)


# --- matching and outcomes -----------------------------------------------------------------------


def test_exact_subject_and_claim_allow(loaded: LoadedPolicy, make_identity: Any) -> None:
    decision = decide(loaded, make_identity(), "llama-7b", "evaluate", "jwt")

    assert decision.outcome is Outcome.ALLOW
    assert decision.rule == "nightly-eval"
    assert (decision.model, decision.action, decision.backend) == ("llama-7b", "evaluate", "jwt")
    assert decision.tier == "low"
    assert decision.approvals_required == 0
    assert decision.rollback_required is False
    assert dict(decision.matched_claims) == {"sub": EVAL_SUBJECT, "job_workflow_ref": EVAL_WORKFLOW}
    assert decision.misses == ()
    assert decision.reasons() == [
        "rule nightly-eval matched: evaluate on llama-7b via jwt is allowed for 3600s (tier low)"
    ]


def test_outcome_values_are_the_wire_strings() -> None:
    assert [o.value for o in Outcome] == ["allow", "approval_required", "deny"]


def test_exact_subject_mismatch_denies(loaded: LoadedPolicy, make_identity: Any) -> None:
    identity = make_identity(subject="repo:acme/evals:ref:refs/heads/feature")

    decision = decide(loaded, identity, "llama-7b", "evaluate", "jwt")

    assert decision.outcome is Outcome.DENY
    assert only_miss(decision, "nightly-eval") == RuleMiss(
        "nightly-eval", "subject", repr(EVAL_SUBJECT), "'repo:acme/evals:ref:refs/heads/feature'"
    )


def test_subject_pattern_matches_one_field(loaded: LoadedPolicy, make_identity: Any) -> None:
    decision = decide(loaded, trainer_identity(make_identity), "llama-7b", "fine-tune", "vault")

    assert decision.rule == "trainer"
    assert decision.matched_claims["sub"] == TRAINER
    assert decision.matched_claims["kubernetes.io/namespace"] == "training"


@pytest.mark.parametrize(
    "subject",
    [
        "system:serviceaccount:training:a:b",
        "system:serviceaccount:training-evil:trainer",
        "system:serviceaccount:other:trainer",
    ],
)
def test_subject_pattern_mismatch(loaded: LoadedPolicy, make_identity: Any, subject: str) -> None:
    identity = trainer_identity(make_identity, subject=subject)

    decision = decide(loaded, identity, "llama-7b", "fine-tune", "vault")

    assert decision.outcome is Outcome.DENY
    miss = only_miss(decision, "trainer")
    assert (miss.check, miss.expected, miss.actual) == (
        "subject",
        "pattern 'system:serviceaccount:training:*'",
        repr(subject),
    )


def test_elevated_tier_needs_approval(loaded: LoadedPolicy, make_identity: Any) -> None:
    decision = decide(loaded, trainer_identity(make_identity), "llama-7b", "fine-tune", "vault")

    assert decision.outcome is Outcome.APPROVAL_REQUIRED
    assert decision.tier == "elevated"
    assert decision.approvals_required == 1
    assert decision.rollback_required is False
    assert decision.ttl_seconds == 4 * 3600
    assert decision.reasons()[-1] == (
        "rule trainer matched, but fine-tune is tier elevated: fine-tune on llama-7b via vault "
        "needs 1 approval(s) by people other than the requester"
    )


def test_privileged_weights_need_approvals_and_rollback(
    loaded: LoadedPolicy, make_identity: Any
) -> None:
    identity = trainer_identity(make_identity)

    weights = decide(loaded, identity, "llama-7b", "deploy-weights", "jwt")
    safety = decide(loaded, identity, "llama-7b", "edit-safety-filter", "jwt")

    assert weights.outcome is Outcome.APPROVAL_REQUIRED
    assert (weights.approvals_required, weights.rollback_required) == (2, True)
    assert weights.reasons()[-1].endswith("and a tested rollback point")
    assert safety.outcome is Outcome.APPROVAL_REQUIRED
    assert (safety.approvals_required, safety.rollback_required) == (2, False)


def test_first_matching_rule_wins(parse: Any, policy_doc: Any, make_identity: Any) -> None:
    broad = {
        "name": "any-eval",
        "issuer": "github",
        "subject_pattern": "repo:acme/**",
        "models": ["**"],
        "actions": ["evaluate"],
    }
    policy_doc["rules"].append(broad)
    identity = make_identity()

    assert decide(parse(policy_doc), identity, "llama-7b", "evaluate", "jwt").rule == "nightly-eval"
    policy_doc["rules"].insert(0, policy_doc["rules"].pop())
    assert decide(parse(policy_doc), identity, "llama-7b", "evaluate", "jwt").rule == "any-eval"


def test_allow_lists_the_rules_tried_before(
    parse: Any, policy_doc: Any, make_identity: Any
) -> None:
    policy_doc["rules"].reverse()

    decision = decide(parse(policy_doc), make_identity(), "llama-7b", "evaluate", "jwt")

    assert decision.outcome is Outcome.ALLOW
    assert decision.reasons() == [
        "rule trainer: issuer: expected cluster, got github",
        "rule nightly-eval matched: evaluate on llama-7b via jwt is allowed for 3600s (tier low)",
    ]


def test_empty_rule_set_denies(parse: Any, policy_doc: Any, make_identity: Any) -> None:
    policy_doc["rules"] = []

    decision = decide(parse(policy_doc), make_identity(), "llama-7b", "evaluate", "jwt")

    assert decision.outcome is Outcome.DENY
    assert decision.misses == ()
    assert decision.reasons() == ["the policy has no rules, so nothing is allowed"]


def test_deny_carries_no_grant_details(loaded: LoadedPolicy, make_identity: Any) -> None:
    identity = make_identity(issuer_name="cluster")

    decision = decide(loaded, identity, "llama-7b", "deploy-weights", "jwt")

    assert decision.outcome is Outcome.DENY
    assert decision.rule is None
    assert decision.ttl_seconds == 0
    assert decision.approvals_required == 0
    assert decision.rollback_required is False
    assert dict(decision.matched_claims) == {}
    assert (
        decision.reasons()[-1]
        == "no rule allows deploy-weights on llama-7b via jwt for this identity"
    )


# --- claims --------------------------------------------------------------------------------------


def test_reusable_workflow_from_another_repo_is_denied(
    loaded: LoadedPolicy, make_identity: Any
) -> None:
    forged = "acme/evil/.github/workflows/eval.yml@refs/heads/main"
    identity = make_identity(claims={"job_workflow_ref": forged})

    decision = decide(loaded, identity, "llama-7b", "evaluate", "jwt")

    assert decision.outcome is Outcome.DENY
    assert decision.reasons()[0] == (
        f"rule nightly-eval: claim job_workflow_ref: expected '{EVAL_WORKFLOW}', got '{forged}'"
    )


def test_reusable_workflow_from_another_ref_is_denied(
    loaded: LoadedPolicy, make_identity: Any
) -> None:
    other_ref = "acme/workflows/.github/workflows/eval.yml@refs/heads/feature"
    identity = make_identity(claims={"job_workflow_ref": other_ref})

    decision = decide(loaded, identity, "llama-7b", "evaluate", "jwt")

    assert decision.outcome is Outcome.DENY
    assert only_miss(decision, "nightly-eval") == RuleMiss(
        "nightly-eval", "claims.job_workflow_ref", repr(EVAL_WORKFLOW), repr(other_ref)
    )


def test_missing_claim_denies(loaded: LoadedPolicy, make_identity: Any) -> None:
    decision = decide(loaded, make_identity(claims={}), "llama-7b", "evaluate", "jwt")

    assert decision.outcome is Outcome.DENY
    assert decision.reasons()[0] == (
        f"rule nightly-eval: claim job_workflow_ref: expected '{EVAL_WORKFLOW}', got missing"
    )


def claim_rule_policy(parse: Any, policy_doc: Any, expected: Any) -> LoadedPolicy:
    policy_doc["rules"] = [
        {
            "name": "claimed",
            "issuer": "github",
            "subject": EVAL_SUBJECT,
            "claims": {"value": expected},
            "models": ["llama-7b"],
            "actions": ["evaluate"],
        }
    ]
    policy: LoadedPolicy = parse(policy_doc)
    return policy


@pytest.mark.parametrize(
    ("expected", "value"),
    [
        ("acme", "acme"),
        (["main", "release"], "release"),
        (["main", "release"], "main"),
        ("1", 1),
        ("42", 42),
        ("true", True),
        ("false", False),
        (["0", "1"], 0),
    ],
)
def test_claim_values_that_match(
    parse: Any, policy_doc: Any, make_identity: Any, expected: Any, value: Any
) -> None:
    policy = claim_rule_policy(parse, policy_doc, expected)
    identity = make_identity(claims={"value": value})

    decision = decide(policy, identity, "llama-7b", "evaluate", "jwt")

    assert decision.outcome is Outcome.ALLOW
    assert decision.matched_claims["value"] in (
        [expected] if isinstance(expected, str) else expected
    )


@pytest.mark.parametrize(
    ("expected", "value", "actual"),
    [
        ("acme", "ACME", "'ACME'"),
        (["main", "release"], "dev", "'dev'"),
        ("1", True, "'true'"),  # a boolean is not the integer 1
        ("True", True, "'true'"),
        ("1", 1.0, "a number (only strings, integers and booleans are compared)"),
        ("acme", ["acme"], "a list (only strings, integers and booleans are compared)"),
        ("acme", {"a": "acme"}, "an object (only strings, integers and booleans are compared)"),
        ("null", None, "null (only strings, integers and booleans are compared)"),
        ("", None, "null (only strings, integers and booleans are compared)"),
    ],
)
def test_claim_values_that_do_not_match(
    parse: Any, policy_doc: Any, make_identity: Any, expected: Any, value: Any, actual: str
) -> None:
    policy = claim_rule_policy(parse, policy_doc, expected)
    identity = make_identity(claims={"value": value})

    decision = decide(policy, identity, "llama-7b", "evaluate", "jwt")

    assert decision.outcome is Outcome.DENY
    assert decision.misses[0].check == "claims.value"
    assert decision.misses[0].actual == actual


def test_list_expectation_is_shown_as_one_of(
    parse: Any, policy_doc: Any, make_identity: Any
) -> None:
    policy = claim_rule_policy(parse, policy_doc, ["main", "release"])

    decision = decide(policy, make_identity(claims={"value": "dev"}), "llama-7b", "evaluate", "jwt")

    assert decision.reasons()[0] == (
        "rule claimed: claim value: expected one of 'main', 'release', got 'dev'"
    )


def test_claims_are_checked_in_declared_order(
    parse: Any, policy_doc: Any, make_identity: Any
) -> None:
    rule = policy_doc["rules"][0]
    rule["claims"] = {"repository": "acme/evals", "job_workflow_ref": EVAL_WORKFLOW}
    wrong = {"repository": "acme/evil", "job_workflow_ref": "x"}

    first = decide(parse(policy_doc), make_identity(claims=wrong), "llama-7b", "evaluate", "jwt")
    rule["claims"] = dict(reversed(rule["claims"].items()))
    second = decide(parse(policy_doc), make_identity(claims=wrong), "llama-7b", "evaluate", "jwt")

    assert first.misses[0].check == "claims.repository"
    assert second.misses[0].check == "claims.job_workflow_ref"


# --- check order ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("identity_fields", "model", "action", "backend", "check"),
    [
        # Each row passes every check before `check`, fails `check` and as many later ones as a
        # model/backend pair the engine accepts allows.
        (
            {"issuer_name": "cluster", "subject": "x", "claims": {}},
            "mistral-7b",
            "fine-tune",
            "jwt",
            "issuer",
        ),
        ({"subject": "x", "claims": {}}, "mistral-7b", "fine-tune", "jwt", "subject"),
        ({"claims": {}}, "mistral-7b", "fine-tune", "jwt", "claims.job_workflow_ref"),
        ({}, "mistral-7b", "fine-tune", "jwt", "models"),
        ({}, "llama-7b", "fine-tune", "vault", "actions"),
        ({}, "llama-7b", "evaluate", "vault", "backends"),
    ],
)
def test_first_failing_check_is_reported(
    loaded: LoadedPolicy,
    make_identity: Any,
    identity_fields: dict[str, Any],
    model: str,
    action: str,
    backend: str,
    check: str,
) -> None:
    decision = decide(loaded, make_identity(**identity_fields), model, action, backend)

    assert decision.outcome is Outcome.DENY
    assert only_miss(decision, "nightly-eval").check == check


def test_issuer_reason_names_both_issuers(loaded: LoadedPolicy, make_identity: Any) -> None:
    decision = decide(loaded, make_identity(), "llama-7b", "fine-tune", "vault")

    assert "rule trainer: issuer: expected cluster, got github" in decision.reasons()


@pytest.mark.parametrize(
    ("model", "action", "backend", "sentence"),
    [
        (
            "mistral-7b",
            "evaluate",
            "jwt",
            "rule nightly-eval: model: expected 'llama-*', got 'mistral-7b'",
        ),
        (
            "llama-7b",
            "fine-tune",
            "jwt",
            "rule nightly-eval: action: expected 'evaluate', got 'fine-tune'",
        ),
        (
            "llama-7b",
            "evaluate",
            "vault",
            "rule nightly-eval: backend: expected one of 'jwt', 'aws', got 'vault'",
        ),
    ],
)
def test_model_action_backend_reasons(
    loaded: LoadedPolicy, make_identity: Any, model: str, action: str, backend: str, sentence: str
) -> None:
    decision = decide(loaded, make_identity(), model, action, backend)

    assert decision.outcome is Outcome.DENY
    assert decision.reasons()[0] == sentence


def test_model_glob_matches_other_models(loaded: LoadedPolicy, make_identity: Any) -> None:
    decision = decide(loaded, make_identity(), "llama-13b", "evaluate", "jwt")

    assert decision.outcome is Outcome.ALLOW


def test_reasons_escape_and_cut_token_values(loaded: LoadedPolicy, make_identity: Any) -> None:
    hostile = "repo:acme/evals\nrule nightly-eval matched" + "x" * 500

    decision = decide(loaded, make_identity(subject=hostile), "llama-7b", "evaluate", "jwt")

    sentence = decision.reasons()[0]
    assert "\n" not in sentence
    assert "\\n" in sentence
    assert "x" * 300 not in sentence
    assert f"…[{len(hostile)} characters, sha256:" in sentence


# --- requests the engine refuses -----------------------------------------------------------------


def test_unknown_model_is_invalid_target(loaded: LoadedPolicy, make_identity: Any) -> None:
    with pytest.raises(InvalidTarget) as raised:
        decide(loaded, make_identity(), "gpt-x", "evaluate", "jwt")

    # NOTE: anyone with a token from a trusted issuer may ask; only the detail (the log, admins,
    # dev mode) lists the models the policy guards.
    assert raised.value.description == "unknown model 'gpt-x'"
    assert raised.value.detail == "unknown model 'gpt-x'; known: llama-7b, llama-13b, mistral-7b"


def test_unknown_model_does_not_list_many_models(
    parse: Any, policy_doc: Any, make_identity: Any
) -> None:
    policy_doc["models"].update({f"model-{n}": {} for n in range(25)})

    with pytest.raises(InvalidTarget) as raised:
        decide(parse(policy_doc), make_identity(), "gpt-x", "evaluate", "jwt")

    assert raised.value.detail == "unknown model 'gpt-x'; 28 are defined"


def test_unknown_action_is_invalid_scope(loaded: LoadedPolicy, make_identity: Any) -> None:
    with pytest.raises(InvalidScope) as raised:
        decide(loaded, make_identity(), "llama-7b", "delete", "jwt")

    assert raised.value.description == "unknown action 'delete'"
    assert raised.value.detail == (
        "unknown action 'delete'; known: evaluate, fine-tune, deploy-weights, edit-safety-filter"
    )


@pytest.mark.parametrize("backend", ["vault", "aws", "s3", "model_config", "model_fields"])
def test_backend_the_model_lacks_is_invalid_target(
    loaded: LoadedPolicy, make_identity: Any, backend: str
) -> None:
    with pytest.raises(InvalidTarget) as raised:
        decide(loaded, make_identity(), "mistral-7b", "evaluate", backend)

    assert raised.value.description == f"model 'mistral-7b' has no {backend!r} backend"
    assert raised.value.detail == f"model 'mistral-7b' has no {backend!r} backend; configured: jwt"


# --- TTL -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "granted"), [(None, 3600), (600, 600), (3600, 3600), (3601, 3600), (10**9, 3600)]
)
def test_ttl_is_capped_at_max_ttl(
    loaded: LoadedPolicy, make_identity: Any, requested: int | None, granted: int
) -> None:
    decision = decide(
        loaded, make_identity(), "llama-7b", "evaluate", "jwt", requested_ttl=requested
    )

    assert decision.ttl_seconds == granted


@pytest.mark.parametrize("requested", [0, -1])
def test_non_positive_ttl_is_invalid_request(
    loaded: LoadedPolicy, make_identity: Any, requested: int
) -> None:
    with pytest.raises(InvalidRequest, match="must be positive"):
        decide(loaded, make_identity(), "llama-7b", "evaluate", "jwt", requested_ttl=requested)


# --- purity --------------------------------------------------------------------------------------


class RegexCompiled(AssertionError):
    pass


@contextmanager
def no_regex_compilation(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inside, every way of compiling a regular expression raises RegexCompiled: ``re.compile``
    and the module functions that take a pattern string all go through ``re._compile`` (cache
    hit or not), and a cache miss reaches the compiler itself. (Scoped to the ``with``, since
    pytest's own reporting uses regular expressions.)"""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RegexCompiled(f"a regular expression was compiled: {args[:1]!r}")

    with monkeypatch.context() as patch:
        patch.setattr(re, "_compile", refuse)
        patch.setattr(re._compiler, "compile", refuse)  # type: ignore[attr-defined]
        for name in ("compile", "match", "fullmatch", "search", "sub", "subn", "split"):
            patch.setattr(re, name, refuse)
        for name in ("findall", "finditer"):
            patch.setattr(re, name, refuse)
        yield


COMPILING: list[Callable[[], object]] = [
    lambda: re.compile("a+"),
    lambda: re.match("a+", "aa"),
    lambda: re.fullmatch("a+", "aa"),
    lambda: re.search("a+", "aa"),
    lambda: re.sub("a", "b", "aa"),
    lambda: re.split(",", "a,b"),
    lambda: re.findall("a", "aa"),
    lambda: re._compile("a+", 0),  # type: ignore[attr-defined]
    lambda: re._compiler.compile("a+", 0),  # type: ignore[attr-defined]
]


@pytest.mark.parametrize("compiling", COMPILING)
def test_the_regex_guard_catches_every_way_of_compiling(
    compiling: Callable[[], object], monkeypatch: pytest.MonkeyPatch
) -> None:
    caught = False
    with no_regex_compilation(monkeypatch):
        try:
            compiling()
        except RegexCompiled:
            caught = True
    assert caught
    assert re.fullmatch("a+", "aa")  # restored after the block


def test_decide_compiles_no_regex(
    loaded: LoadedPolicy, make_identity: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every glob (subject pattern, models, datasets) was compiled when the policy loaded."""
    identity = trainer_identity(make_identity)
    approved = ["s3://datasets/approved/set-1"]

    with no_regex_compilation(monkeypatch):
        decision = decide(loaded, identity, "llama-7b", "fine-tune", "vault", datasets=approved)
        miss = decide(loaded, identity, "llama-7b", "fine-tune", "vault", datasets=["s3://x/y"])

    assert decision.outcome is Outcome.APPROVAL_REQUIRED
    assert miss.outcome is Outcome.DENY
