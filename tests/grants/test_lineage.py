"""The ``lineage`` form field: parsed into a canonical dict, shorthand expanded, and refused
with a message naming the bad path."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from broker.errors import InvalidRequest
from broker.grants.lineage import MAX_LINEAGE_BYTES, lineage_datasets, normalise_uri, parse_lineage
from broker.policy.glob import glob_matches
from broker.runtime import Broker
from tests.conftest import exchange_form

SHA = "ab" * 32


@pytest.mark.parametrize("raw", [None, ""])
def test_no_lineage_is_none(raw: str | None) -> None:
    assert parse_lineage(raw) is None
    assert lineage_datasets(None) == []


def test_bare_strings_are_shorthand_for_uris() -> None:
    parsed = parse_lineage(
        json.dumps(
            {
                "datasets": ["s3://datasets/a", {"uri": "s3://datasets/b", "sha256": SHA}],
                "weights": ["hf://acme/llama-7b"],
                "prompts": ["git://acme/prompts@v3"],
                "rollback_point": "s3://weights/v1",
            }
        )
    )
    assert parsed == {
        "datasets": [{"uri": "s3://datasets/a"}, {"uri": "s3://datasets/b", "sha256": SHA}],
        "weights": [{"uri": "hf://acme/llama-7b"}],
        "prompts": [{"uri": "git://acme/prompts@v3"}],
        "rollback_point": {"uri": "s3://weights/v1"},
    }
    assert lineage_datasets(parsed) == ["s3://datasets/a", "s3://datasets/b"]


def test_rollback_evidence_is_kept_with_an_aware_time() -> None:
    test = {"ref": "ci://rb/1", "result": "passed", "tested_at": "2030-01-01T00:00:00Z"}
    parsed = parse_lineage(json.dumps({"rollback_point": {"uri": "s3://w/v1", "test": test}}))
    assert parsed is not None
    assert parsed["rollback_point"]["test"]["result"] == "passed"
    assert parsed["rollback_point"]["test"]["tested_at"].startswith("2030-01-01T00:00:00")
    assert parsed["datasets"] == [] and lineage_datasets(parsed) == []


@pytest.mark.parametrize(
    ("lineage", "path"),
    [
        ({"datasets": ["not a uri"]}, "lineage.datasets.0.uri"),
        ({"datasets": ["s3://a", ""]}, "lineage.datasets.1.uri"),
        ({"weights": [{"uri": "s3://w", "sha256": "ABC"}]}, "lineage.weights.0.sha256"),
        ({"prompts": [{"uri": "s3://p", "md5": "x"}]}, "lineage.prompts.0.md5"),
        ({"models": []}, "lineage.models"),
        (
            {"rollback_point": {"uri": "s3://w", "test": {"ref": "r", "result": "maybe"}}},
            "lineage.rollback_point.test.result",
        ),
        (
            {
                "rollback_point": {
                    "uri": "s3://w",
                    "test": {"ref": "r", "result": "passed", "tested_at": "2030-01-01T00:00:00"},
                }
            },
            "lineage.rollback_point.test.tested_at",
        ),
    ],
)
def test_invalid_lineage_names_the_bad_path(lineage: object, path: str) -> None:
    with pytest.raises(InvalidRequest, match=path.replace(".", r"\.")):
        parse_lineage(json.dumps(lineage))


@pytest.mark.parametrize("raw", ["[1, 2]", '"s3://a"', "3"])
def test_lineage_must_be_an_object(raw: str) -> None:
    with pytest.raises(InvalidRequest, match="lineage"):
        parse_lineage(raw)


def test_malformed_json_says_where() -> None:
    with pytest.raises(InvalidRequest, match=r"not valid JSON: .* at position 13"):
        parse_lineage('{"datasets": ]')


def test_oversized_lineage_is_refused_before_parsing() -> None:
    raw = json.dumps({"datasets": ["s3://a/" + "x" * MAX_LINEAGE_BYTES]})
    with pytest.raises(InvalidRequest, match=f"larger than {MAX_LINEAGE_BYTES} bytes"):
        parse_lineage(raw)
    # The cap is on bytes, not characters.
    wide = '{"datasets": ["s3://a/' + "é" * (MAX_LINEAGE_BYTES // 2) + '"]}'
    assert len(wide) < MAX_LINEAGE_BYTES < len(wide.encode())
    with pytest.raises(InvalidRequest, match="larger than"):
        parse_lineage(wide)


# --- URIs: normalised, and refused where a reader could resolve them elsewhere ----------------


@pytest.mark.parametrize(
    ("uri", "refusal"),
    [
        ("s3://datasets/approved/../secret/pii", "'..' segment"),
        ("s3://datasets/approved/./pii", "'.' segment"),
        ("s3://datasets/approved/..", "'..' segment"),
        ("s3://datasets/approved/%2e%2e/secret/pii", "'..' segment"),
        ("s3://datasets/approved/%2E./secret/pii", "'..' segment"),
        ("s3://datasets/approved/.%2E/secret/pii", "'..' segment"),
        ("s3://datasets/approved/%2e/pii", "'.' segment"),
        ("s3://datasets/approved/%252e%252e/secret", "'..' segment"),  # decoded twice
        ("s3://datasets/approved/..;/secret", "'..' segment"),
        ("https://data.example.com/approved/..?x=1", "'..' segment"),
        ("s3://datasets/approved/\uff0e\uff0e/secret", "'..' segment"),  # fullwidth dots
        ("s3://datasets/approved%2f..%2fsecret/pii", "encoded '/'"),
        ("s3://datasets/approved/%2F/pii", "encoded '/'"),
        ("s3://datasets/approved%5c..%5csecret", "encoded '/' or '\\'"),
        ("s3://datasets/approved/%255c/x", "encoded '/' or '\\'"),
        ("s3://datasets/approved\\..\\secret", "backslash"),
        ("s3://datasets/approved/a\x01b", "U+0001"),
        ("s3://datasets/approved/a\x7fb", "U+007F"),
        ("s3://datasets/approved/a\x85b", "U+0085"),
        ("s3://datasets/approved/\u202egpj.exe", "U+202E"),
        ("s3://datasets/approved/a%0Ab", "U+000A"),
        ("s3://datasets/approved/a%7Fb", "U+007F"),
        ("s3://datasets/approved/100%", "'%' must start a percent-encoding"),
        ("s3://datasets/approved/%zz", "'%' must start a percent-encoding"),
        ("s3://datasets/approved/a b", "no whitespace"),
    ],
)
def test_uris_a_reader_could_resolve_elsewhere_are_refused(uri: str, refusal: str) -> None:
    for lineage in (
        {"datasets": [uri]},
        {"weights": [{"uri": uri}]},
        {"rollback_point": {"uri": uri, "sha256": SHA}},
    ):
        place = next(iter(lineage))
        with pytest.raises(InvalidRequest, match=rf"^lineage\.{place}[.0]*\.uri: ") as refused:
            parse_lineage(json.dumps(lineage))
        assert refusal in refused.value.description
        assert "Value error" not in refused.value.description


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("S3://Datasets/approved/set-1", "s3://datasets/approved/set-1"),
        ("s3://datasets/%61pproved/%7e%2Dx", "s3://datasets/approved/~-x"),
        ("s3://datasets/approved/a%2ab%20c", "s3://datasets/approved/a%2Ab%20c"),
        (
            "https://Bob@Data.Example.COM:8443/Sets/A?Q=1",
            "https://Bob@data.example.com:8443/Sets/A?Q=1",
        ),
        ("s3://datasets/approved/a..b/.hidden/x.", "s3://datasets/approved/a..b/.hidden/x."),
        ("s3://datasets/approved/100%25", "s3://datasets/approved/100%25"),
        ("hf://acme/llama-7b", "hf://acme/llama-7b"),
    ],
)
def test_uris_are_normalised(given: str, normal: str) -> None:
    parsed = parse_lineage(json.dumps({"datasets": [given], "rollback_point": given}))
    assert parsed is not None
    assert lineage_datasets(parsed) == [normal]
    assert parsed["rollback_point"]["uri"] == normal


def test_a_nul_is_refused_by_the_uri_check_too() -> None:
    """The lineage JSON bound refuses NUL before the schema; the URI check stands on its own
    (rollback test reports use it too)."""
    with pytest.raises(ValueError, match="U\\+0000"):
        normalise_uri("s3://datasets/approved/a\x00b")


TRAINER = "system:serviceaccount:training:trainer"
K8S = {
    "kubernetes.io": {"namespace": "training", "serviceaccount": {"name": "trainer", "uid": "u-1"}}
}


@pytest.mark.parametrize(
    "uri",
    [
        "s3://datasets/approved/../secret/pii",
        "s3://datasets/approved/%2e%2e/secret/pii",
        "s3://datasets/approved/%2E./secret/pii",
        "s3://datasets/approved/x%2f..%2f..%2fsecret/pii",
    ],
)
def test_a_rule_limited_to_approved_datasets_refuses_a_path_out_of_them(
    client: TestClient, broker: Broker, uri: str
) -> None:
    """The reproduced case: dev-trainer allows ``s3://datasets/approved/**``, which matches
    these URIs as text although they name data outside approved/."""
    [rule] = [r for r in broker.policy.rules if r.rule.name == "dev-trainer"]
    assert any(glob_matches(pattern, uri) for pattern in rule.datasets)
    assert broker.dev_issuer is not None
    lineage = json.dumps({"datasets": [uri]})

    form = exchange_form(
        broker.dev_issuer.mint(sub=TRAINER, claims=K8S), action="fine-tune", lineage=lineage
    )
    exchanged = client.post("/v1/token", data=form)
    assert exchanged.status_code == 400, exchanged.text
    assert exchanged.json()["error_description"].startswith("lineage.datasets.0.uri: ")
    opened = client.post(
        "/v1/approvals",
        json={"model": "llama-7b", "action": "fine-tune", "lineage": {"datasets": [uri]}},
        headers={"Authorization": f"Bearer {broker.dev_issuer.mint(sub=TRAINER, claims=K8S)}"},
    )
    assert opened.status_code == 400, opened.text
    assert opened.json()["error_description"].startswith("lineage.datasets.0.uri: ")
    assert broker.approvals.find() == [] and broker.grants.find() == []

    # The same request for data inside approved/ opens its approval request.
    form["lineage"] = json.dumps({"datasets": ["s3://datasets/approved/set-1"]})
    form["subject_token"] = broker.dev_issuer.mint(sub=TRAINER, claims=K8S)
    assert client.post("/v1/token", data=form).json()["error"] == "approval_required"
