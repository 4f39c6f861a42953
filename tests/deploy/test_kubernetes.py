"""deploy/kubernetes/: every manifest validates offline against Kubernetes 1.33's schemas
(strict: an unknown field is an error), and the properties that matter hold: locked-down
containers, 3 replicas behind probes, a PDB and a NetworkPolicy that select the broker's pods,
and a training Job whose projected token, agent arguments and sink fit together and fit the
policy shipped beside it, which lets exactly that Job's identity through a real broker."""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from jwt import encode
from jwt.algorithms import RSAAlgorithm

from broker.api.app import create_app
from broker.client.credentials import TOKEN_TYPES
from broker.errors import PolicyError
from broker.policy import load_policy
from broker.runtime import build_broker
from broker.settings import Settings
from tests.backends.aws.conftest import moto, moto_server  # noqa: F401 (fixtures)
from tests.conftest import exchange_form

ROOT = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUBERNETES = "1.33"
"""A recent release kubernetes-validate ships schemas for; native sidecars need >= 1.29."""
Manifest = dict[str, Any]


def load(directory: str) -> list[Manifest]:
    docs: list[Manifest] = []
    for path in sorted((ROOT / directory).glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def one(docs: list[Manifest], kind: str) -> Manifest:
    [found] = [d for d in docs if d["kind"] == kind]
    return found


def pod_spec(workload: Manifest) -> Manifest:
    return dict(workload["spec"]["template"]["spec"])


def containers(spec: Manifest) -> list[Manifest]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def locked_down_problems(spec: Manifest) -> list[str]:
    """What is wrong with a pod spec's containers: each must run as non-root on a read-only
    root filesystem, without privilege escalation, with no capabilities, under the runtime's
    seccomp profile, with resource requests and limits."""
    pod = spec.get("securityContext", {})
    problems = []
    for c in containers(spec):
        sc = {**pod, **c.get("securityContext", {})}
        name = c["name"]
        if sc.get("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot")
        if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem")
        if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if c.get("securityContext", {}).get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities.drop ALL")
        if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: seccompProfile RuntimeDefault")
        resources = c.get("resources", {})
        if not resources.get("requests") or not resources.get("limits", {}).get("memory"):
            problems.append(f"{name}: resources")
    if pod.get("runAsUser") == 0:
        problems.append("pod: runAsUser 0")
    return problems


@pytest.mark.parametrize("directory", ["broker", "training-job"])
def test_every_manifest_validates_strictly(directory: str) -> None:
    docs = load(directory)
    kustomization = one(docs, "Kustomization")
    files = sorted(p.name for p in (ROOT / directory).glob("*.yaml"))
    assert sorted([*kustomization["resources"], "kustomization.yaml"]) == files
    for doc in docs:
        if doc["kind"] != "Kustomization":
            assert kubernetes_validate.validate(doc, KUBERNETES, strict=True) == KUBERNETES


def test_strict_validation_refuses_an_unknown_field() -> None:
    deployment = copy.deepcopy(one(load("broker"), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


@pytest.mark.parametrize(("directory", "kind"), [("broker", "Deployment"), ("training-job", "Job")])
def test_every_container_is_locked_down(directory: str, kind: str) -> None:
    assert locked_down_problems(pod_spec(one(load(directory), kind))) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda c: c["securityContext"].pop("readOnlyRootFilesystem"), "readOnlyRootFilesystem"),
        (lambda c: c["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilege"),
        (lambda c: c["securityContext"]["capabilities"].update(drop=[]), "capabilities"),
        (lambda c: c["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
        (lambda c: c.pop("resources"), "resources"),
    ],
)
def test_the_lockdown_check_sees_a_loosened_container(change: Any, problem: str) -> None:
    # Through JSON: the YAML's anchors would otherwise share one securityContext among all.
    spec = json.loads(json.dumps(pod_spec(one(load("training-job"), "Job"))))
    change(spec["initContainers"][1])  # the sidecar
    [found] = locked_down_problems(spec)
    assert found.startswith("broker-agent: ") and problem in found


def test_the_broker_runs_three_probed_replicas_behind_a_service_pdb_and_network_policy() -> None:
    docs = load("broker")
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [broker] = deployment["spec"]["template"]["spec"]["containers"]
    [port] = broker["ports"]
    assert broker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert broker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    env = {e["name"]: e for e in broker["env"]}
    assert env["BROKER_PORT"]["value"] == str(port["containerPort"])
    assert env["BROKER_HOST"]["value"] == "0.0.0.0"

    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 0 < pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]

    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    [ingress] = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": port["containerPort"]}]
    egress = {
        (p["protocol"], p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]
    }
    # DNS, PostgreSQL, OpenBao, HTTPS (the IdPs' JWKS, AWS): nothing else.
    assert egress == {("UDP", 53), ("TCP", 53), ("TCP", 5432), ("TCP", 8200), ("TCP", 443)}


def test_the_broker_reads_its_shared_settings_from_secrets_and_the_config_map() -> None:
    docs = load("broker")
    spec = pod_spec(one(docs, "Deployment"))
    [broker] = spec["containers"]
    env = {e["name"]: e for e in broker["env"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in broker["volumeMounts"]}

    def volume_of(path: str) -> Manifest:
        [mount] = [m for p, m in mounts.items() if path.startswith(p.rstrip("/") + "/")]
        return volumes[mount["name"]]

    assert env["BROKER_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "broker-database",
        "key": "url",
    }
    kek = volume_of(env["BROKER_KEK_FILE"]["value"])
    assert kek["secret"]["secretName"] == "broker-kek"
    assert (
        env["BROKER_KEK_FILE"]["value"].endswith("/kek") and kek["secret"]["defaultMode"] == 0o400
    )
    policy = volume_of(env["BROKER_POLICY"]["value"])
    config_map = one(docs, "ConfigMap")
    assert policy["configMap"]["name"] == config_map["metadata"]["name"]
    assert Path(env["BROKER_POLICY"]["value"]).name in config_map["data"]
    assert env["BROKER_ISSUER_URL"]["value"].startswith("https://")
    # The root filesystem is read-only: the data dir and /tmp are emptyDirs.
    data_dir = env["BROKER_DATA_DIR"]["value"]
    assert "emptyDir" in volume_of(data_dir)
    # Below the mount, not the mount itself: the broker makes its data dir 0700, which only its
    # owner can, and an emptyDir's root is the kubelet's (0777).
    assert data_dir.rstrip("/") not in {m.rstrip("/") for m in mounts}
    assert "emptyDir" in volume_of("/tmp/x")


def agent_flags(container: Manifest) -> dict[str, str | bool]:
    args = container["args"]
    assert args[0] == "agent"
    flags: dict[str, str | bool] = {}
    for arg in args[1:]:
        name, _, value = arg.partition("=")
        flags[name] = value or True
    return flags


def test_the_training_job_agent_fits_its_volumes() -> None:
    job = one(load("training-job"), "Job")
    spec = pod_spec(job)
    volumes = {v["name"]: v for v in spec["volumes"]}
    [source] = volumes["broker-token"]["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["expirationSeconds"] >= 600  # the API server's minimum
    first, sidecar = spec["initContainers"]
    assert first.get("restartPolicy") is None and agent_flags(first)["--exit-after-auth"] is True
    assert sidecar["restartPolicy"] == "Always" and "--exit-after-auth" not in agent_flags(sidecar)
    [trainer] = spec["containers"]
    for agent in (first, sidecar):
        flags = agent_flags(agent)
        mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
        assert flags["--token-file"] == f"{mounts['broker-token']}/{token['path']}"
        assert str(flags["--sink"]).startswith(mounts["credentials"] + "/")
        assert {k: v for k, v in flags.items() if k != "--exit-after-auth"} == {
            k: v for k, v in agent_flags(sidecar).items()
        }
    assert "emptyDir" in volumes["credentials"]
    trainer_mounts = {m["name"]: m for m in trainer["volumeMounts"]}
    assert trainer_mounts["credentials"]["readOnly"] is True
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == agent_flags(sidecar)["--sink"]
    assert agent_flags(sidecar)["--format"] == "aws-credentials"
    assert "broker-token" not in trainer_mounts  # the trainer never holds the identity token
    # The sink is 0600: the trainer can read it only as the agent's user.
    users = {c.get("securityContext", {}).get("runAsUser") for c in containers(spec)}
    assert users == {None} and spec["securityContext"]["runAsUser"] > 0


@pytest.fixture
def shipped_policy(tmp_path: Path) -> Iterator[tuple[Path, rsa.RSAPrivateKey]]:
    """The ConfigMap's files in a directory, with a cluster key made here in the JWK set."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    config_map = one(load("broker"), "ConfigMap")
    for name, text in config_map["data"].items():
        (tmp_path / name).write_text(text)
    jwk = {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": "c1", "alg": "RS256"}
    (tmp_path / "cluster-jwks.json").write_text(json.dumps({"keys": [jwk]}))
    yield tmp_path / "policy.yaml", key


def test_the_shipped_key_set_placeholder_fails_closed(tmp_path: Path) -> None:
    for name, text in one(load("broker"), "ConfigMap")["data"].items():
        (tmp_path / name).write_text(text)
    with pytest.raises(PolicyError, match="the key set has no keys"):
        load_policy(tmp_path / "policy.yaml", dev_mode=False)


@pytest.mark.usefixtures("moto")
def test_the_jobs_projected_token_gets_its_credential_from_the_shipped_policy(
    shipped_policy: tuple[Path, rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    """The kubelet's token for the Job's pod (issuer, audience, service account, lifetime
    as the manifests say) exchanged as the Job's agent asks: AWS credentials."""
    path, key = shipped_policy
    policy = load_policy(path, dev_mode=False)
    [cluster] = [i for i in policy.policy.issuers if i.name == "cluster"]
    spec = pod_spec(one(load("training-job"), "Job"))
    job_metadata = one(load("training-job"), "Job")["metadata"]
    [source] = next(v for v in spec["volumes"] if v["name"] == "broker-token")["projected"][
        "sources"
    ]
    token_spec = source["serviceAccountToken"]
    assert token_spec["audience"] in cluster.audiences
    now = int(time.time())
    namespace, account = job_metadata["namespace"], spec["serviceAccountName"]
    claims = {
        "iss": cluster.issuer,
        "aud": [token_spec["audience"]],
        "sub": f"system:serviceaccount:{namespace}:{account}",
        "iat": now,
        "nbf": now,
        "exp": now + token_spec["expirationSeconds"],
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": account, "uid": str(uuid.uuid4())},
            "pod": {"name": "llama-train-abcde", "uid": str(uuid.uuid4())},
        },
    }
    token = encode(claims, key, algorithm="RS256", headers={"kid": "c1"})
    flags = agent_flags(spec["initContainers"][0])
    backend = str(flags["--backend"])
    broker = build_broker(Settings(data_dir=tmp_path / "data", policy=path))
    try:
        with TestClient(create_app(broker=broker)) as client:
            resp = client.post(
                "/v1/token",
                data=exchange_form(
                    token,
                    model=str(flags["--model"]),
                    action=str(flags["--action"]),
                    requested_token_type=TOKEN_TYPES[backend],
                ),
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["aws_credentials"]["access_key_id"]
            other = {**claims, "sub": f"system:serviceaccount:{namespace}:someone-else"}
            other["kubernetes.io"]["serviceaccount"]["name"] = "someone-else"
            refused = client.post(
                "/v1/token",
                data=exchange_form(
                    encode(other, key, algorithm="RS256", headers={"kid": "c1"}),
                    model=str(flags["--model"]),
                    action=str(flags["--action"]),
                    requested_token_type=TOKEN_TYPES[backend],
                ),
            )
            assert refused.status_code == 403, refused.text
    finally:
        broker.close()
