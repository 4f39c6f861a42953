"""The ``lineage`` form field: parsed into a canonical dict, shorthand expanded, and refused
with a message naming the bad path."""

from __future__ import annotations

import json

import pytest

from broker.errors import InvalidRequest
from broker.grants.lineage import MAX_LINEAGE_BYTES, lineage_datasets, parse_lineage

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
