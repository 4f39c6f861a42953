"""Profiles: which claims identify a workload per kind of issuer, through real tokens."""

from __future__ import annotations

from typing import Any

import pytest

from broker.errors import IdentityRejected
from broker.identity.profiles import flatten_claims, parse_spiffe_id

from .support import CLUSTER, DROP, GITHUB, GITLAB, MESH, Env

GITHUB_CLAIMS: dict[str, Any] = {
    "sub": "repo:acme/evals:ref:refs/heads/main",
    "repository": "acme/evals",
    "repository_owner_id": "1001",
    "job_workflow_ref": "acme/workflows/.github/workflows/eval.yml@refs/heads/main",
    "ref": "refs/heads/main",
    "environment": "prod",
    "run_id": "77",
}
GITLAB_CLAIMS: dict[str, Any] = {
    "sub": "project_path:acme/models:ref_type:branch:ref:main",
    "project_path": "acme/models",
    "namespace_path": "acme",
    "ref": "main",
    "ref_type": "branch",
    "pipeline_source": "push",
    "ci_config_ref_uri": "gitlab.com/acme/models//.gitlab-ci.yml@refs/heads/main",
}


def k8s_claims(**k8s: Any) -> dict[str, Any]:
    claim: dict[str, Any] = {
        "namespace": "training",
        "serviceaccount": {"name": "trainer", "uid": "9d4e-sa"},
        "pod": {"name": "trainer-abc", "uid": "77aa-pod"},
    }
    claim.update(k8s)
    return {"sub": "system:serviceaccount:training:trainer", "kubernetes.io": claim}


def test_github_attributes(env: Env) -> None:
    identity = env.verifier.verify_workload(env.token(GITHUB, **GITHUB_CLAIMS))
    assert identity.profile == "github"
    assert identity.attributes == {
        "repository": "acme/evals",
        "repository_owner_id": "1001",
        "job_workflow_ref": "acme/workflows/.github/workflows/eval.yml@refs/heads/main",
        "ref": "refs/heads/main",
        "environment": "prod",
    }
    assert identity.claims["run_id"] == "77"


def test_github_attributes_come_from_claims_never_from_sub(env: Env) -> None:
    token = env.token(GITHUB, **{**GITHUB_CLAIMS, "sub": "repo:acme/prod-weights:ref:main"})
    identity = env.verifier.verify_workload(token)
    assert identity.attributes["repository"] == "acme/evals"
    assert identity.subject == "repo:acme/prod-weights:ref:main"


@pytest.mark.parametrize("claim", ["repository", "repository_owner_id"])
def test_github_requires_repository_claims(env: Env, claim: str) -> None:
    token = env.token(GITHUB, **{**GITHUB_CLAIMS, claim: DROP})
    with pytest.raises(IdentityRejected, match=f"claim {claim} is required by the github profile"):
        env.verifier.verify_workload(token)


def test_github_attribute_must_be_a_string(env: Env) -> None:
    token = env.token(GITHUB, **{**GITHUB_CLAIMS, "environment": ["prod"]})
    with pytest.raises(IdentityRejected, match="claim environment: expected a non-empty string"):
        env.verifier.verify_workload(token)


def test_gitlab_attributes(env: Env) -> None:
    identity = env.verifier.verify_workload(env.token(GITLAB, **GITLAB_CLAIMS))
    assert identity.profile == "gitlab"
    assert identity.attributes == {k: v for k, v in GITLAB_CLAIMS.items() if k != "sub"}


@pytest.mark.parametrize("claim", ["project_path", "namespace_path"])
def test_gitlab_requires_project_and_namespace(env: Env, claim: str) -> None:
    token = env.token(GITLAB, **{**GITLAB_CLAIMS, claim: DROP})
    with pytest.raises(IdentityRejected, match=f"claim {claim} is required by the gitlab profile"):
        env.verifier.verify_workload(token)


def test_kubernetes_attributes(env: Env) -> None:
    identity = env.verifier.verify_workload(env.ec.sign(env.claims(CLUSTER, **k8s_claims())))
    assert identity.profile == "kubernetes"
    assert identity.attributes == {
        "kubernetes.io/namespace": "training",
        "kubernetes.io/serviceaccount/name": "trainer",
        "kubernetes.io/serviceaccount/uid": "9d4e-sa",
        "kubernetes.io/pod/name": "trainer-abc",
        "kubernetes.io/pod/uid": "77aa-pod",
    }
    assert identity.claims["kubernetes.io/serviceaccount/uid"] == "9d4e-sa"


def test_kubernetes_without_pod_is_accepted(env: Env) -> None:
    claims = k8s_claims()
    del claims["kubernetes.io"]["pod"]
    identity = env.verifier.verify_workload(env.token(CLUSTER, **claims))
    assert "kubernetes.io/pod/name" not in identity.attributes


@pytest.mark.parametrize(
    ("k8s", "match"),
    [
        ({"serviceaccount": {"name": "trainer"}}, "kubernetes.io/serviceaccount/uid is required"),
        ({"serviceaccount": {"uid": "x"}}, "kubernetes.io/serviceaccount/name is required"),
        ({"namespace": None}, "kubernetes.io/namespace is required"),
        ({"serviceaccount": "trainer"}, "kubernetes.io/serviceaccount is required"),
        ({"pod": "trainer-abc"}, "kubernetes.io/pod: expected an object"),
    ],
)
def test_kubernetes_requires_service_account(env: Env, k8s: dict[str, Any], match: str) -> None:
    with pytest.raises(IdentityRejected, match=match):
        env.verifier.verify_workload(env.token(CLUSTER, **k8s_claims(**k8s)))


def test_kubernetes_requires_the_claim_object(env: Env) -> None:
    token = env.token(CLUSTER, sub="system:serviceaccount:training:trainer")
    with pytest.raises(IdentityRejected, match=r"claim kubernetes.io is required"):
        env.verifier.verify_workload(token)


def test_kubernetes_sub_must_match_service_account(env: Env) -> None:
    claims = {**k8s_claims(), "sub": "system:serviceaccount:kube-system:admin"}
    expected = (
        "claim sub: expected 'system:serviceaccount:training:trainer', "
        "got 'system:serviceaccount:kube-system:admin'"
    )
    with pytest.raises(IdentityRejected, match=expected):
        env.verifier.verify_workload(env.token(CLUSTER, **claims))


def test_spiffe_attributes(env: Env) -> None:
    token = env.rsa.sign(env.claims(MESH, sub="spiffe://example.org/ns/ml/sa/trainer"), typ="JWT")
    identity = env.verifier.verify_workload(token)
    assert identity.profile == "spiffe"
    assert identity.attributes == {
        "spiffe_id": "spiffe://example.org/ns/ml/sa/trainer",
        "trust_domain": "example.org",
    }


@pytest.mark.parametrize(
    "spiffe_id",
    [
        "spiffe://Example.org/w",  # uppercase trust domain
        "spiffe://example.org",  # no path: the trust domain itself, not a workload
        "spiffe://example.org/",  # empty path segment
        "spiffe://example.org/a//b",
        "spiffe://example.org/a/./b",
        "spiffe://example.org/a/../admin",
        "spiffe://example.org:8443/w",  # port
        "spiffe://user@example.org/w",  # userinfo
        "spiffe://example.org/w?x=1",  # query
        "spiffe://example.org/w#frag",  # fragment
        "SPIFFE://example.org/w",
        "https://example.org/w",
        "spiffe://example.org/w/" + "a" * 2048,
    ],
)
def test_invalid_spiffe_ids_are_rejected(env: Env, spiffe_id: str) -> None:
    with pytest.raises(IdentityRejected, match="claim sub: "):
        env.verifier.verify_workload(env.token(MESH, sub=spiffe_id))


def test_spiffe_id_parser_returns_trust_domain() -> None:
    assert parse_spiffe_id("spiffe://td.example_1-x/a.b/c_d-e") == "td.example_1-x"


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        ({"typ": "at+jwt"}, "header typ: expected 'JWT' or 'JOSE'"),
        ({"typ": ["JWT"]}, "header typ: expected 'JWT' or 'JOSE'"),
        ({"cty": "JWT"}, r"a JWT-SVID carries only alg, kid and typ; got also \['cty'\]"),
    ],
)
def test_spiffe_header_rules(env: Env, headers: dict[str, str], match: str) -> None:
    token = env.rsa.sign(env.claims(MESH, sub="spiffe://example.org/w"), **headers)
    with pytest.raises(IdentityRejected, match=match):
        env.verifier.verify_workload(token)


def test_other_profiles_allow_other_headers(env: Env) -> None:
    assert env.verifier.verify_workload(env.rsa.sign(env.claims(), typ="at+jwt", cty="x"))


def test_flatten_claims() -> None:
    flat = flatten_claims({"a": {"b": {"c": 1}, "d": [{"e": 2}]}, "f": None})
    assert flat == {"a/b/c": 1, "a/d": [{"e": 2}], "f": None}
