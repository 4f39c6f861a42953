"""The policy digest changes with meaning, and with nothing else."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from broker.policy import load_policy
from broker.policy.digest import canonical_json, policy_digest, sha256_digest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_digest_is_sha256_of_the_canonical_validated_document(loaded: Any) -> None:
    document = loaded.policy.model_dump(mode="json")
    for issuer in document["issuers"]:
        del issuer["console"]  # the console's client settings decide nothing
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    assert loaded.digest == "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_console_client_settings_leave_the_digest_alone(parse: Any, policy_doc: Any) -> None:
    before = parse(policy_doc).digest
    people = next(i for i in policy_doc["issuers"] if i.get("kind") == "people")
    people["audiences"] = [*people["audiences"], "broker-console"]
    with_audience = parse(policy_doc).digest
    people["console"] = {"client_id": "broker-console", "scopes": ["openid", "groups"]}

    assert parse(policy_doc).digest == with_audience != before


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": [1, {"d": 2, "c": "é"}], "a": None}) == (
        '{"a":null,"b":[1,{"c":"é","d":2}]}'.encode()
    )


def test_layout_comments_and_key_order_do_not_matter(parse: Any, policy_doc: Any) -> None:
    reordered = {key: policy_doc[key] for key in reversed(list(policy_doc))}
    reordered["models"] = dict(reversed(list(policy_doc["models"].items())))
    reordered["rules"] = [dict(reversed(list(rule.items()))) for rule in policy_doc["rules"]]
    flow = "# a comment\n" + yaml.safe_dump(reordered, sort_keys=False, default_flow_style=True)

    assert parse(flow).digest == parse(policy_doc).digest


def test_spelled_out_defaults_and_units_do_not_matter(parse: Any, policy_doc: Any) -> None:
    explicit = copy.deepcopy(policy_doc)
    explicit["actions"]["evaluate"] = {"tier": "low", "max_ttl": 3600, "approvals": 0}
    explicit["issuers"][0]["kind"] = "workload"
    explicit["issuers"][0]["single_use"] = False
    explicit["models"]["mistral-7b"] = {"owners": [], "backends": {"jwt": {"audiences": []}}}

    assert parse(explicit).digest == parse(policy_doc).digest


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["actions"]["evaluate"].update(max_ttl="2h"),
        lambda d: d["actions"]["fine-tune"].update(approvals=2),
        lambda d: d["rules"].reverse(),
        lambda d: d["rules"][0]["claims"].update(repository="acme/evals"),
        lambda d: d["rules"][0].update(claims={"job_workflow_ref": ["a", "b"]}),
        lambda d: d["rules"][0].update(claims={"job_workflow_ref": ["b", "a"]}),
        lambda d: d["rules"][0]["models"].append("llama-7b"),
        lambda d: d["rules"][1].update(subject_pattern="system:serviceaccount:training:**"),
        lambda d: d["rules"][1]["datasets"].append("s3://datasets/new/*"),
        lambda d: d["issuers"][0].update(single_use=True),
        lambda d: d["issuers"][0]["audiences"].append("other"),
        lambda d: d["issuers"][1].update(algorithms=["ES256"]),
        lambda d: d["models"]["mistral-7b"].update(owners=["someone"]),
        lambda d: d["roles"]["admin"].append("more-admins"),
    ],
)
def test_every_semantic_change_changes_the_digest(parse: Any, policy_doc: Any, change: Any) -> None:
    before = parse(policy_doc).digest
    changed = copy.deepcopy(policy_doc)
    change(changed)

    assert parse(changed).digest != before


def test_digest_does_not_depend_on_the_checkout_location(tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "elsewhere")

    here = load_policy(EXAMPLES / "policy.yaml", dev_mode=True)
    there = load_policy(tmp_path / "elsewhere" / "policy.yaml", dev_mode=True)

    assert here.policy.issuers[1].jwks_file != there.policy.issuers[1].jwks_file
    assert here.digest == there.digest


def write_policy_with_keys(directory: Path, jwks_name: str, jwks: Any) -> Path:
    (directory / "keys").mkdir(parents=True, exist_ok=True)
    (directory / "keys" / jwks_name).write_text(json.dumps(jwks))
    text = (EXAMPLES / "policy.yaml").read_text()
    text = text.replace("keys/cluster-jwks.json", f"keys/{jwks_name}")
    (directory / "policy.yaml").write_text(text)
    return directory / "policy.yaml"


def test_key_set_content_enters_the_digest(tmp_path: Path) -> None:
    example_keys = json.loads((EXAMPLES / "keys" / "cluster-jwks.json").read_text())
    other_key = ECAlgorithm.to_jwk(
        ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True
    )

    original = load_policy(EXAMPLES / "policy.yaml", dev_mode=True).digest
    renamed = write_policy_with_keys(tmp_path / "a", "renamed.json", example_keys)
    reformatted = write_policy_with_keys(
        tmp_path / "b",
        "cluster-jwks.json",
        {"keys": [dict(reversed(k.items())) for k in example_keys["keys"]]},
    )
    rotated = write_policy_with_keys(tmp_path / "c", "cluster-jwks.json", {"keys": [other_key]})

    assert load_policy(renamed, dev_mode=True).digest == original
    assert load_policy(reformatted, dev_mode=True).digest == original
    assert load_policy(rotated, dev_mode=True).digest != original


def test_policy_digest_needs_a_fingerprint_for_each_key_file() -> None:
    policy = load_policy(EXAMPLES / "policy.yaml", dev_mode=True).policy

    with pytest.raises(ValueError, match="no key set fingerprint for issuer 'cluster'"):
        policy_digest(policy, jwks_fingerprints={})
    assert re.fullmatch(
        r"sha256:[0-9a-f]{64}",
        policy_digest(policy, jwks_fingerprints={"cluster": sha256_digest({"keys": []})}),
    )
