"""Loading a policy file: every error names the file, the place in the document and what."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from broker.errors import PolicyError
from broker.policy import LoadedPolicy, load_policy, parse_policy
from broker.policy.model import Policy

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_POLICY = EXAMPLES / "policy.yaml"


def public_jwk(**extra: Any) -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return {**ECAlgorithm.to_jwk(key, as_dict=True), "kid": "k1", "alg": "ES256", **extra}


def write_jwks(path: Path, document: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document if isinstance(document, str) else json.dumps(document))


def policy_error(parse: Any, doc: Any, **kwargs: Any) -> PolicyError:
    with pytest.raises(PolicyError) as raised:
        parse(doc, **kwargs)
    return raised.value


# --- the example ---------------------------------------------------------------------------------


def test_example_policy_loads_in_dev_mode() -> None:
    loaded = load_policy(EXAMPLE_POLICY, dev_mode=True)

    policy = loaded.policy
    assert [i.name for i in policy.issuers] == ["github", "cluster", "sso", "dev", "dev-people"]
    assert [r.name for r in policy.rules] == [
        "nightly-eval",
        "trainer",
        "rollback-tester",
        "dev-nightly-eval",
        "dev-trainer",
        "dev-release",
        "dev-rollback-tester",
    ]
    assert set(policy.models) == {"llama-7b", "mistral-7b"}
    assert policy.actions["deploy-weights"].max_ttl == 900
    assert loaded.source == str(EXAMPLE_POLICY)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", loaded.digest)


def test_example_policy_keeps_the_product_example() -> None:
    policy = load_policy(EXAMPLE_POLICY, dev_mode=True).policy

    github, cluster, sso = policy.issuers[:3]
    assert (github.issuer, github.single_use) == (
        "https://token.actions.githubusercontent.com",
        True,
    )
    assert cluster.jwks_file == (EXAMPLES / "keys" / "cluster-jwks.json").resolve()
    assert (sso.kind, sso.roles_claim) == ("people", "groups")
    trainer = policy.rules[1]
    assert trainer.claims == {"kubernetes.io/namespace": "training"}
    assert trainer.datasets == ["s3://datasets/approved/*"]
    assert trainer.backends == ["vault"]
    assert policy.models["llama-7b"].backends.aws is not None
    assert policy.roles == {
        "approver": ["ml-safety-reviewers"],
        "admin": ["ml-platform-admins"],
        "auditor": ["security-audit"],
    }


def test_example_policy_refuses_dev_issuers_without_dev_mode() -> None:
    with pytest.raises(PolicyError) as raised:
        load_policy(EXAMPLE_POLICY)

    assert (raised.value.file, raised.value.path) == (str(EXAMPLE_POLICY), "issuers[3].dev")
    assert str(raised.value) == (
        f"{EXAMPLE_POLICY}: issuers[3].dev: issuer 'dev': dev issuers are only allowed with --dev"
    )


def test_example_jwks_holds_only_a_public_es256_key() -> None:
    loaded = load_policy(EXAMPLE_POLICY, dev_mode=True)

    (key,) = loaded.jwks["cluster"]["keys"]
    assert (key["kty"], key["crv"], key["alg"]) == ("EC", "P-256", "ES256")
    assert key["kid"]
    assert "d" not in key


# --- reading the file ----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"

    with pytest.raises(PolicyError) as raised:
        load_policy(path)

    assert raised.value.file == str(path)
    assert "cannot read the file: No such file or directory" in str(raised.value)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"issuers: \xff\xfe\n")

    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(path)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_document(parse: Any, text: str) -> None:
    error = policy_error(parse, text)

    assert str(error) == "policy.yaml: the policy file is empty"


@pytest.mark.parametrize(
    ("text", "got"),
    [
        ("- issuers\n- rules\n", "a list"),
        ("just text\n", "string 'just text'"),
        ("42\n", "integer 42"),
    ],
)
def test_top_level_must_be_a_mapping(parse: Any, text: str, got: str) -> None:
    error = policy_error(parse, text)

    assert error.path == ""
    assert error.message.startswith("the top level must be a mapping")
    assert error.message.endswith(f"got {got}")


def test_yaml_syntax_error_names_the_line(parse: Any) -> None:
    text = "issuers:\n  - name: github\n    audiences: [model-broker\nactions: {}\n"

    error = policy_error(parse, text)

    assert error.file == "policy.yaml"
    assert re.match(r"invalid YAML at line 4, column \d+: ", error.message)


def test_duplicate_yaml_keys_are_refused(parse: Any) -> None:
    text = "issuers: []\nactions: {}\nissuers: []\n"

    error = policy_error(parse, text)

    assert error.message.startswith(
        "invalid YAML at line 3, column 1: found duplicate key 'issuers'"
    )


def example_text() -> str:
    """The example policy, with its jwks_file made absolute so it parses from any directory."""
    return EXAMPLE_POLICY.read_text().replace(
        "jwks_file: keys/cluster-jwks.json", f"jwks_file: {EXAMPLES}/keys/cluster-jwks.json"
    )


def test_example_text_parses(parse: Any) -> None:
    assert (
        parse(example_text(), dev_mode=True).digest
        == load_policy(EXAMPLE_POLICY, dev_mode=True).digest
    )


def test_duplicate_claim_keys_are_refused(parse: Any) -> None:
    text = example_text().replace(
        "claims: {job_workflow_ref: ", "claims: {job_workflow_ref: x, job_workflow_ref: ", 1
    )

    error = policy_error(parse, text, dev_mode=True)

    assert "found duplicate key 'job_workflow_ref'" in error.message


def test_yaml_merge_keys_may_override(parse: Any) -> None:
    text = example_text().replace(
        "  evaluate:           {tier: low,        max_ttl: 1h}",
        "  base: &base {tier: low, max_ttl: 1h}\n  evaluate: {<<: *base, max_ttl: 30m}",
    )

    loaded = parse(text, dev_mode=True)

    assert loaded.policy.actions["evaluate"].max_ttl == 1800


# --- schema errors -------------------------------------------------------------------------------


def set_in(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for part in path[:-1]:
        doc = doc[part]
    doc[path[-1]] = value


@pytest.mark.parametrize(
    ("where", "value", "path", "message"),
    [
        (
            ("rules", 0, "claims", "job_workflow_ref"),
            True,
            "rules[0].claims.job_workflow_ref",
            "expected a string or a list of strings, got boolean true; quote such values in YAML",
        ),
        (
            ("rules", 1, "claims", "kubernetes.io/namespace"),
            ["training", 7],
            'rules[1].claims["kubernetes.io/namespace"]',
            "expected a string or a list of strings, got integer 7",
        ),
        (
            ("rules", 1, "claims", "kubernetes.io/namespace"),
            [],
            'rules[1].claims["kubernetes.io/namespace"]',
            "an empty list matches nothing",
        ),
        (
            ("actions", "fine-tune", "max_ttl"),
            "1y",
            "actions.fine-tune.max_ttl",
            "expected a duration such as 15m, 1h or 30s, got '1y'",
        ),
        (
            ("actions", "fine-tune", "approvals"),
            "two",
            "actions.fine-tune.approvals",
            "input should be a valid integer, unable to parse string as an integer, "
            "got string 'two'",
        ),
        (
            ("actions", "evaluate", "approvals"),
            1,
            "actions.evaluate",
            "a low-tier action needs no approvals; raise its tier instead",
        ),
        (
            ("actions", "evaluate", "emergency"),
            {"ttl_cap": "5m", "ratify_within": "1h", "max_per_identity": "1 per 1d"},
            "actions.evaluate",
            "emergency applies to actions that need approval; this one is low",
        ),
        (
            ("actions", "fine-tune", "emergency"),
            {"ttl_cap": "5m", "ratify_within": "1h", "max_per_identity": "twice a day"},
            "actions.fine-tune.emergency.max_per_identity",
            "expected '<count> per <duration>' such as '2 per 24h', got 'twice a day'",
        ),
        (
            ("actions", "fine-tune", "emergency"),
            {"ttl_cap": "5m", "ratify_within": "1h", "max_per_identity": "0 per 1d"},
            "actions.fine-tune.emergency.max_per_identity.count",
            "input should be greater than or equal to 1",
        ),
        (
            ("actions", "fine-tune", "emergency"),
            {"ttl_cap": "5m", "max_per_identity": "1 per 1d"},
            "actions.fine-tune.emergency.ratify_within",
            "required field is missing",
        ),
        (
            ("rules", 0, "subjet"),
            "x",
            "rules[0].subjet",
            "unknown field 'subjet'",
        ),
        (
            ("rules", 0, "backends"),
            ["jwt", "ftp"],
            "rules[0].backends[1]",
            "input should be 'jwt', 'vault' or 'aws', got string 'ftp'",
        ),
        (
            ("rules", 0, "subject"),
            "repo:acme/*:ref:refs/heads/main",
            "rules[0].subject",
            "contains a wildcard; use subject_pattern for globs",
        ),
        (
            ("rules", 0, "subject_pattern"),
            "repo:acme/*",
            "rules[0]",
            "give exactly one of subject and subject_pattern",
        ),
        (
            ("roles", "superuser"),
            ["root"],
            "roles.superuser",
            "invalid key: input should be 'admin', 'approver' or 'auditor', got string 'superuser'",
        ),
        (
            ("issuers", 0, "algorithms"),
            ["HS256"],
            "issuers[0].algorithms",
            "algorithms ['HS256'] are not allowed",
        ),
        (
            ("models", "llama-7b", "backends", "aws", "role_arn"),
            "arn:aws:iam::1:role/x",
            "models.llama-7b.backends.aws.role_arn",
            "string should match pattern",
        ),
        (
            ("issuers",),
            [],
            "issuers",
            "list should have at least 1 item after validation, not 0, got a list",
        ),
    ],
)
def test_schema_errors_name_path_and_problem(
    parse: Any,
    policy_doc: Any,
    where: tuple[Any, ...],
    value: Any,
    path: str,
    message: str,
) -> None:
    set_in(policy_doc, where, value)

    error = policy_error(parse, policy_doc)

    assert (error.file, error.path) == ("policy.yaml", path)
    assert message in error.message
    assert str(error).startswith(f"policy.yaml: {path}: ")


def test_missing_field(parse: Any, policy_doc: Any) -> None:
    del policy_doc["rules"][1]["models"]

    error = policy_error(parse, policy_doc)

    assert (error.path, error.message) == ("rules[1].models", "required field is missing")


def test_a_misspelt_key_is_named_before_the_field_it_left_missing(
    parse: Any, policy_doc: Any
) -> None:
    action = policy_doc["actions"]["fine-tune"]
    action["max_tll"] = action.pop("max_ttl")

    error = policy_error(parse, policy_doc)

    assert error.path == "actions.fine-tune.max_tll"
    assert error.message == (
        "unknown field 'max_tll' (did you mean 'max_ttl'?); docs/policy.md lists the fields "
        "allowed here"
    )


def test_an_unknown_key_comes_first_and_other_problems_are_counted(
    parse: Any, policy_doc: Any
) -> None:
    del policy_doc["rules"][0]["models"]
    policy_doc["rules"][1]["colour"] = "blue"

    error = policy_error(parse, policy_doc)

    assert error.path == "rules[1].colour"
    assert error.message.startswith("unknown field 'colour'; ")  # nothing close is missing
    assert error.message.endswith("(and 1 more problem(s) after fixing this one)")


def test_more_problems_are_counted(parse: Any, policy_doc: Any) -> None:
    del policy_doc["rules"][0]["models"]
    del policy_doc["rules"][1]["actions"]

    error = policy_error(parse, policy_doc)

    assert error.path == "rules[0].models"
    assert error.message.endswith("(and 1 more problem(s) after fixing this one)")


# --- cross-references ----------------------------------------------------------------------------


def test_rule_issuer_must_exist(parse: Any, policy_doc: Any) -> None:
    policy_doc["rules"][1]["issuer"] = "gitlab"

    error = policy_error(parse, policy_doc)

    assert error.path == "rules[1].issuer"
    assert error.message == "issuer 'gitlab' is not defined in issuers; known: github, cluster, sso"


def test_rule_issuer_must_be_a_workload_issuer(parse: Any, policy_doc: Any) -> None:
    policy_doc["rules"][1]["issuer"] = "sso"

    error = policy_error(parse, policy_doc)

    assert error.path == "rules[1].issuer"
    assert "'sso' is a people issuer" in error.message


def test_an_identity_belongs_to_one_person_ignoring_case(parse: Any, policy_doc: Any) -> None:
    """Separation of duties matches people entries ignoring case, so two people may not share
    one identity spelt in two cases."""
    policy_doc["people"] = {
        "alice": [{"issuer": "sso", "subject": "alice@example.com"}],
        "mallory": [{"issuer": "sso", "subject": "Alice@Example.com"}],
    }

    error = policy_error(parse, policy_doc)

    assert error.path == "people.mallory[0]"
    assert error.message == "this identity is already mapped to 'alice'"


def test_rule_actions_must_exist(parse: Any, policy_doc: Any) -> None:
    policy_doc["rules"][1]["actions"] = ["fine-tune", "retrain"]

    error = policy_error(parse, policy_doc)

    assert error.path == "rules[1].actions[1]"
    assert error.message == (
        "unknown action 'retrain'; known: evaluate, fine-tune, deploy-weights, edit-safety-filter"
    )


def test_literal_rule_models_must_exist(parse: Any, policy_doc: Any) -> None:
    policy_doc["rules"][1]["models"] = ["llama-7b", "lama-7b"]

    error = policy_error(parse, policy_doc)

    assert error.path == "rules[1].models[1]"
    assert error.message.startswith("unknown model 'lama-7b'; known: llama-7b,")


def test_rule_backends_must_be_configured_for_literal_models(parse: Any, policy_doc: Any) -> None:
    policy_doc["rules"][1]["models"] = ["llama-7b", "mistral-7b"]
    policy_doc["rules"][1]["backends"] = ["jwt", "vault"]

    error = policy_error(parse, policy_doc)

    assert error.path == "rules[1].backends[1]"
    assert error.message.startswith("backend 'vault' is not configured for model 'mistral-7b'")


def test_rule_backends_are_not_checked_against_globs(parse: Any, policy_doc: Any) -> None:
    # llama-13b has no aws backend, yet `llama-*` with aws is fine: the engine refuses per request.
    assert policy_doc["rules"][0]["models"] == ["llama-*"]
    assert "aws" in policy_doc["rules"][0]["backends"]

    assert parse(policy_doc).policy.rules[0].backends == ["jwt", "aws"]


@pytest.mark.parametrize(
    ("section", "attr", "label"),
    [
        ("issuers", "name", "issuer name"),
        ("issuers", "issuer", "issuer URL"),
        ("rules", "name", "rule name"),
    ],
)
def test_duplicates_are_refused(
    parse: Any, policy_doc: Any, section: str, attr: str, label: str
) -> None:
    policy_doc[section][1][attr] = policy_doc[section][0][attr]

    error = policy_error(parse, policy_doc)

    assert error.path == f"{section}[1].{attr}"
    assert (
        error.message == f"duplicate {label} {policy_doc[section][0][attr]!r} (also {section}[0])"
    )


def test_dev_issuer_is_refused_unless_dev_mode(parse: Any, policy_doc: Any) -> None:
    policy_doc["issuers"].append(
        {"name": "dev", "issuer": "https://dev.invalid", "audiences": ["model-broker"], "dev": True}
    )

    error = policy_error(parse, policy_doc)

    assert error.path == "issuers[3].dev"
    assert error.message == "issuer 'dev': dev issuers are only allowed with --dev"
    assert parse(policy_doc, dev_mode=True).policy.issuers[3].dev is True


# --- jwks_file -----------------------------------------------------------------------------------


def with_jwks_file(policy_doc: Any, relative: str = "keys/cluster.json") -> Any:
    policy_doc["issuers"][1]["jwks_file"] = relative
    return policy_doc


def test_jwks_file_is_resolved_relative_to_the_policy_file(
    tmp_path: Path, policy_doc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    jwk = public_jwk()
    write_jwks(tmp_path / "conf" / "keys" / "cluster.json", {"keys": [jwk]})
    policy_path = tmp_path / "conf" / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(with_jwks_file(policy_doc)))
    monkeypatch.chdir(tmp_path)  # not the policy's directory

    loaded = load_policy(Path("conf/policy.yaml"))

    assert loaded.policy.issuers[1].jwks_file == tmp_path / "conf" / "keys" / "cluster.json"
    assert loaded.jwks == {"cluster": {"keys": [jwk]}}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read the key set: No such file or directory"),
        ("{not json", "not valid JSON"),
        ([], 'not a JWKS: expected a JSON object with a "keys" list'),
        ({"keys": {}}, 'not a JWKS: expected a JSON object with a "keys" list'),
        ({"keys": []}, "the key set has no keys"),
        ({"keys": ["x"]}, "keys[0] is not a JSON object"),
        (
            {"keys": [{"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"}]},
            "keys[0] is not a usable public key",
        ),
        ({"keys": [{"kty": "XX"}]}, "keys[0] is not a usable public key: Unsupported kty: XX"),
    ],
)
def test_bad_jwks_file(
    tmp_path: Path, parse: Any, policy_doc: Any, content: Any, problem: str
) -> None:
    jwks_path = tmp_path / "keys" / "cluster.json"
    if content is not None:
        write_jwks(jwks_path, content)

    error = policy_error(parse, with_jwks_file(policy_doc))

    assert error.path == "issuers[1].jwks_file"
    assert error.message.startswith(f"{jwks_path}: {problem}")


def test_jwks_file_with_a_private_key_is_refused(
    tmp_path: Path, parse: Any, policy_doc: Any
) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    write_jwks(
        tmp_path / "keys" / "cluster.json",
        {"keys": [public_jwk(), ECAlgorithm.to_jwk(private, as_dict=True)]},
    )

    error = policy_error(parse, with_jwks_file(policy_doc))

    assert error.path == "issuers[1].jwks_file"
    assert "keys[1] holds private or symmetric key material (d)" in error.message


def test_jwks_file_with_a_symmetric_key_is_refused(
    tmp_path: Path, parse: Any, policy_doc: Any
) -> None:
    write_jwks(tmp_path / "keys" / "cluster.json", {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})

    error = policy_error(parse, with_jwks_file(policy_doc))

    assert "keys[0] holds private or symmetric key material (k)" in error.message


# --- compiled policy -----------------------------------------------------------------------------


def test_rules_are_compiled_in_file_order(loaded: LoadedPolicy) -> None:
    nightly, trainer = loaded.rules

    assert nightly.rule.name == "nightly-eval"
    assert nightly.subject_pattern is None
    assert nightly.claims == (
        ("job_workflow_ref", ("acme/workflows/.github/workflows/eval.yml@refs/heads/main",)),
    )
    assert [bool(p.fullmatch(m)) for p in nightly.models for m in ("llama-7b", "mistral-7b")] == [
        True,
        False,
    ]
    assert trainer.subject_pattern is not None
    assert trainer.subject_pattern.fullmatch("system:serviceaccount:training:trainer")
    assert trainer.actions == {"fine-tune", "deploy-weights", "edit-safety-filter"}
    assert trainer.backends == {"jwt", "vault"}


def test_datasets_are_compiled_as_globs(loaded: LoadedPolicy) -> None:
    (dataset,) = loaded.rules[1].datasets

    assert dataset.fullmatch("s3://datasets/approved/set-1")
    assert not dataset.fullmatch("s3://datasets/approved/a/b")
    assert not dataset.fullmatch("s3://datasets/other/set-1")


def test_roles_for_maps_groups_to_roles(loaded: LoadedPolicy) -> None:
    assert loaded.roles_for(["ml-safety-reviewers"]) == {"approver"}
    assert loaded.roles_for(["ml-platform-admins", "unrelated"]) == {"admin", "auditor"}
    assert loaded.roles_for(["security-audit", "ml-safety-reviewers"]) == {"auditor", "approver"}
    assert loaded.roles_for([]) == frozenset()
    assert loaded.roles_for(["ML-Platform-Admins"]) == frozenset()


def test_roles_for_takes_a_single_string_as_one_group(parse: Any, policy_doc: Any) -> None:
    policy_doc["roles"] = {"admin": ["a"]}
    loaded = parse(policy_doc)

    assert loaded.roles_for("a") == {"admin"}
    assert loaded.roles_for("abc") == frozenset()


def test_bare_model_validate_does_not_replace_the_loader(policy_doc: Any) -> None:
    # The schema alone accepts a dangling reference; only the loader refuses it (see above).
    policy_doc["rules"][0]["issuer"] = "nobody"

    assert Policy.model_validate(policy_doc).rules[0].issuer == "nobody"


def test_parse_policy_source_names_the_document(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as raised:
        parse_policy("", source="inline", base_dir=tmp_path)

    assert str(raised.value) == "inline: the policy file is empty"


def test_loading_elsewhere_gives_the_same_policy(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "examples")

    moved = load_policy(tmp_path / "examples" / "policy.yaml", dev_mode=True)

    assert moved.policy.issuers[1].jwks_file == tmp_path / "examples" / "keys" / "cluster-jwks.json"
    assert moved.digest == load_policy(EXAMPLE_POLICY, dev_mode=True).digest


# --- the console client of a people issuer ---------------------------------------------------


def _people(doc: Any) -> dict[str, Any]:
    people: dict[str, Any] = next(i for i in doc["issuers"] if i.get("kind") == "people")
    people["audiences"] = [*people["audiences"], "broker-console"]
    return people


def test_a_people_issuer_takes_a_console_client(parse: Any, policy_doc: Any) -> None:
    _people(policy_doc)["console"] = {"client_id": "broker-console"}
    issuer = next(i for i in parse(policy_doc).policy.issuers if i.console is not None)
    assert issuer.console is not None
    assert issuer.console.scopes == ["openid"] and issuer.console.redirect_url is None


@pytest.mark.parametrize(
    ("console", "says"),
    [
        ({"client_id": "other-app"}, "must be one of audiences"),
        ({"client_id": "broker-console", "scopes": ["groups"]}, "must include openid"),
        (
            {"client_id": "broker-console", "redirect_url": "https://b.example/elsewhere"},
            "redirect_url",
        ),
    ],
)
def test_a_console_client_that_could_not_work_is_refused(
    parse: Any, policy_doc: Any, console: dict[str, Any], says: str
) -> None:
    _people(policy_doc)["console"] = console
    assert says in str(policy_error(parse, policy_doc))


def test_a_workload_issuer_has_no_console(parse: Any, policy_doc: Any) -> None:
    workload = next(i for i in policy_doc["issuers"] if i.get("kind", "workload") == "workload")
    workload["console"] = {"client_id": workload["audiences"][0]}
    assert "console is only for kind: people" in str(policy_error(parse, policy_doc))


def test_the_console_secret_is_read_and_never_quoted(
    parse: Any, policy_doc: Any, tmp_path: Path
) -> None:
    _people(policy_doc)["console"] = {
        "client_id": "broker-console",
        "client_secret_file": "console-secret",
    }
    missing = policy_error(parse, policy_doc)
    assert "console.client_secret_file" in str(missing) and "cannot read" in str(missing)
    (tmp_path / "console-secret").write_text("\n  \n")
    assert "the file is empty" in str(policy_error(parse, policy_doc))
    (tmp_path / "console-secret").write_text("the-secret\n")
    loaded = parse(policy_doc)
    name = next(i.name for i in loaded.policy.issuers if i.console is not None)
    assert loaded.console_secrets == {name: "the-secret"}
    assert "the-secret" not in repr(loaded)
