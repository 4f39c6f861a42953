"""docs/jobs.md's CI examples as printed: the GitLab job's script runs against a live broker
whose policy is the doc's GitLab snippet (GitLab's key made here and pinned), with the token
in the variable `id_tokens` names; the GitHub workflow uses only inputs action.yml has."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from broker.api.app import create_app
from broker.runtime import build_broker
from broker.settings import Settings
from tests.conftest import LiveServer, free_port

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "docs" / "jobs.md"
EVAL_PY = """
import os, sys
token = os.environ.get("BROKER_JWT", "")
print("eval.py: a broker JWT" if token.count(".") == 2 else "eval.py: no JWT")
sys.exit(3)
"""


def section(title: str) -> str:
    text = JOBS.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def yaml_blocks(title: str) -> list[Any]:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section(title), re.S)]


@pytest.fixture
def gitlab_broker(tmp_path: Path) -> Iterator[tuple[LiveServer, rsa.RSAPrivateKey]]:
    _, snippet = yaml_blocks("GitLab CI")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": "gl-1", "alg": "RS256"}
    (tmp_path / "gitlab-jwks.json").write_text(json.dumps({"keys": [jwk]}))
    [issuer] = snippet["issuers"]
    policy = {
        "issuers": [{**issuer, "jwks_file": "gitlab-jwks.json"}],
        "actions": {"evaluate": {"tier": "low", "max_ttl": "1h"}},
        "models": {"llama-7b": {}},
        "rules": snippet["rules"],
    }
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    port = free_port()
    broker = build_broker(
        Settings(data_dir=tmp_path / "data", policy=tmp_path / "policy.yaml", port=port)
    )
    try:
        with LiveServer(create_app(broker=broker), port) as server:
            yield server, key
    finally:
        broker.close()


def gitlab_token(key: rsa.RSAPrivateKey, audience: str, **claims: str) -> str:
    now = int(time.time())
    body = {
        "iss": "https://gitlab.com",
        "aud": audience,
        "sub": "project_path:acme/evals:ref_type:branch:ref:main",
        "project_path": "acme/evals",
        "namespace_path": "acme",
        "ref": "main",
        "ref_type": "branch",
        "jti": uuid.uuid4().hex,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        **claims,
    }
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "gl-1"})


def run_script(
    job: dict[str, Any], server: LiveServer, token: str, work: Path
) -> subprocess.CompletedProcess[str]:
    """The job's script lines (but `pip install`) in one bash, as the GitLab runner runs them."""
    (work / "eval.py").write_text(EVAL_PY)
    [name] = job["id_tokens"]
    lines = [line for line in job["script"] if not line.startswith("pip install")]
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(work),
        "PYTHONPATH": str(ROOT),
        **{k: str(v) for k, v in job["variables"].items()},
        "BROKER_URL": server.url,  # the job's https://broker.example.com, here on loopback
        name: token,
    }
    return subprocess.run(
        ["bash", "-eo", "pipefail", "-c", "\n".join(lines)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_gitlab_job_runs_eval_with_a_broker_jwt(
    gitlab_broker: tuple[LiveServer, rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    server, key = gitlab_broker
    [job] = yaml_blocks("GitLab CI")[0].values()
    [(name, spec)] = job["id_tokens"].items()
    done = run_script(job, server, gitlab_token(key, spec["aud"]), tmp_path)
    assert "eval.py: a broker JWT" in done.stdout, done.stderr
    assert done.returncode == 3  # eval.py's exit code is the job's
    assert name == "BROKER_ID_TOKEN"


def test_the_gitlab_rule_refuses_another_branch(
    gitlab_broker: tuple[LiveServer, rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    server, key = gitlab_broker
    [job] = yaml_blocks("GitLab CI")[0].values()
    [spec] = job["id_tokens"].values()
    token = gitlab_token(
        key, spec["aud"], ref="feature", sub="project_path:acme/evals:ref_type:branch:ref:feature"
    )
    done = run_script(job, server, token, tmp_path)
    assert done.returncode != 0 and "access_denied" in done.stderr
    assert "eval.py" not in done.stdout


def test_the_github_workflow_uses_the_actions_inputs() -> None:
    workflow = yaml_blocks("GitHub Actions")[0]
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    steps = [s for job in workflow["jobs"].values() for s in job["steps"]]
    [broker] = [s for s in steps if s.get("id") == "broker"]
    assert set(broker["with"]) <= set(action["inputs"])
    required = {n for n, spec in action["inputs"].items() if spec.get("required")}
    assert required <= set(broker["with"])
    [job] = workflow["jobs"].values()
    assert job["permissions"]["id-token"] == "write"
    for step in steps:
        for used in re.findall(r"steps\.broker\.outputs\.([a-z-]+)", str(step.get("run", ""))):
            assert used in action["outputs"]
