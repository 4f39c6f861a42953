"""terraform/aws: the offline checks (terraform/check.sh), and an apply to moto after which
the broker issues and revokes credentials in the role Terraform created.

Skipped, with the reason, when terraform or the provider mirror is not on this machine. Loading
the aws provider takes seconds, so check.sh runs in the background from the start of the
session (``terraform_check`` in conftest.py) while the other tests run.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.backends.aws import AwsBackend, RevocationPolicy, session_tags, source_identity
from broker.runtime import build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.backends.aws.conftest import (
    CHECK,
    MODULE,
    POLICY_YAML,
    REGION,
    ROLE_ARN,
    ROLE_NAME,
    S3_PREFIX,
    TERRAFORM,
    CheckRun,
    Moto,
    capturing_session,
    load,
    make_grant,
)
from tests.conftest import EVAL_SUB, EVAL_WORKFLOW, exchange_form
from tests.servers import TERRAFORM_MISSING, Part, unavailable

pytestmark = pytest.mark.integration


def terraform_env(tmp: Path) -> dict[str, str]:
    (tmp / "terraformrc").write_text("")
    return {
        **os.environ,
        "CHECKPOINT_DISABLE": "1",
        "TF_IN_AUTOMATION": "1",
        "TF_INPUT": "0",
        "TF_CLI_CONFIG_FILE": str(tmp / "terraformrc"),
        "TF_DATA_DIR": str(tmp / ".terraform"),
    }


@pytest.fixture
def mirror() -> str:
    if TERRAFORM is None:
        unavailable(Part.TERRAFORM, TERRAFORM_MISSING)
    found = subprocess.run([str(CHECK), "--mirror"], capture_output=True, text=True, check=False)
    if found.returncode != 0:
        unavailable(Part.TERRAFORM, f"no hashicorp/aws provider mirror: {found.stderr.strip()}")
    return found.stdout.strip()


class Root:
    """A root configuration that applies terraform/aws to moto."""

    def __init__(self, path: Path, mirror: str, env: dict[str, str]) -> None:
        self.path, self.mirror, self.env = path, mirror, env

    def run(self, *args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
        assert TERRAFORM is not None
        done = subprocess.run(
            [TERRAFORM, f"-chdir={self.path}", *args, "-no-color"],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=240,
            check=False,
        )
        assert done.returncode in ok, done.stdout + done.stderr
        return done

    def outputs(self) -> dict[str, Any]:
        raw = json.loads(self.run("output", "-json").stdout)
        return {name: value["value"] for name, value in raw.items()}


@pytest.fixture
def applied(moto: Moto, mirror: str, tmp_path: Path) -> Iterator[tuple[Root, str]]:
    iam = moto.admin("iam")
    iam.delete_role(RoleName=ROLE_NAME)  # Terraform creates it this time
    broker_arn = boto3.Session(region_name=REGION).client("sts").get_caller_identity()["Arn"]
    root = Root(tmp_path / "root", mirror, terraform_env(tmp_path))
    root.path.mkdir()
    (root.path / "main.tf").write_text(
        f"""
provider "aws" {{
  region                      = "{REGION}"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
  endpoints {{
    iam = "{moto.url}"
    sts = "{moto.url}"
  }}
}}

module "broker_aws" {{
  source               = "{MODULE}"
  broker_principal_arn = "{broker_arn}"
  models               = {{ "llama-7b" = {{ s3_prefix = "{S3_PREFIX}" }} }}
}}

output "role_arns" {{ value = module.broker_aws.role_arns }}
output "broker_policy_models" {{ value = module.broker_aws.broker_policy_models }}
output "broker_principal_policy_json" {{ value = module.broker_aws.broker_principal_policy_json }}
"""
    )
    root.run("init", f"-plugin-dir={mirror}")
    root.run("apply", "-auto-approve")
    yield root, broker_arn


def test_apply_to_moto_then_issue_and_revoke_in_the_created_role(
    applied: tuple[Root, str], moto: Moto, tmp_path: Path
) -> None:
    root, broker_arn = applied
    outputs = root.outputs()
    assert outputs["role_arns"] == {"llama-7b": ROLE_ARN}
    settings = outputs["broker_policy_models"]["llama-7b"]
    assert settings == {"role_arn": ROLE_ARN, "s3_prefix": S3_PREFIX}

    aws = AwsBackend(load(POLICY_YAML), session=capturing_session(moto))
    grant = make_grant(action="fine-tune", tier="elevated")
    cred = aws.issue(grant)
    creds = cred.extra["aws_credentials"]
    as_workload = boto3.Session(
        aws_access_key_id=creds["access_key_id"],
        aws_secret_access_key=creds["secret_access_key"],
        aws_session_token=creds["session_token"],
        region_name=REGION,
    )
    who = as_workload.client("sts").get_caller_identity()
    assert who["Arn"].endswith(f":assumed-role/{ROLE_NAME}/{grant.id}")

    # What Terraform created agrees with what the broker sends.
    iam = moto.admin("iam")
    role = iam.get_role(RoleName=ROLE_NAME)["Role"]
    trust = role["AssumeRolePolicyDocument"]
    assume, tag, source = trust["Statement"]
    (call,) = moto.assume_role_calls
    sent_keys = [t["Key"] for t in call["Tags"]]
    assert assume["Principal"]["AWS"] == broker_arn
    assert set(assume["Condition"]["Null"]) == {f"aws:RequestTag/{k}" for k in sent_keys} | {
        "sts:SourceIdentity"
    }
    assert assume["Condition"]["StringEquals"] == {"aws:RequestTag/model": grant.model}
    assert grant.id.startswith(assume["Condition"]["StringLike"]["aws:RequestTag/grant_id"][:-1])
    assert tag["Action"] == "sts:TagSession"
    assert tag["Condition"]["ForAllValues:StringEquals"] == {
        "aws:TagKeys": sent_keys,
        "sts:TransitiveTagKeys": call["TransitiveTagKeys"],
    }
    assert grant.tier in tag["Condition"]["StringEquals"]["aws:RequestTag/tier"]
    assert call["Tags"] == session_tags(grant)
    assert source["Action"] == "sts:SetSourceIdentity"
    assert call["SourceIdentity"] == source_identity(grant.subject)

    boundary_arn = role["PermissionsBoundary"]["PermissionsBoundaryArn"]
    (attached,) = iam.list_attached_role_policies(RoleName=ROLE_NAME)["AttachedPolicies"]
    role_s3 = policy_document(iam, attached["PolicyArn"])
    assert policy_document(iam, boundary_arn) == role_s3
    # fine-tune is the widest default action: its session policy is the role's whole S3 access.
    assert json.loads(call["Policy"]) == role_s3

    revocations = moto.revocation_policy()
    assert revocations == RevocationPolicy.empty().to_document()

    assert aws.revoke(grant, cred.credential_ref)
    assert grant.id in json.dumps(moto.revocation_policy())
    # The broker owns broker-revocations: a later plan must not want to reset it.
    plan = root.run("plan", "-detailed-exitcode")
    assert "No changes." in plan.stdout

    # And the whole broker: a workload exchanges its token over HTTP for credentials in the role
    # Terraform created (the example policy names that role for llama-7b).
    broker = build_broker(Settings(dev=True, data_dir=tmp_path / "data", policy=EXAMPLE_POLICY))
    with TestClient(create_app(broker=broker)) as client:
        assert broker.dev_issuer is not None
        token = broker.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})
        aws_type = "urn:broker:token-type:aws-credentials"
        resp = client.post("/v1/token", data=exchange_form(token, requested_token_type=aws_type))
        assert resp.status_code == 200, resp.text
        exchanged = resp.json()["aws_credentials"]
        arn = (
            boto3.Session(
                aws_access_key_id=exchanged["access_key_id"],
                aws_secret_access_key=exchanged["secret_access_key"],
                aws_session_token=exchanged["session_token"],
                region_name=REGION,
            )
            .client("sts")
            .get_caller_identity()["Arn"]
        )
        assert arn.endswith(f":assumed-role/{ROLE_NAME}/{resp.json()['grant_id']}")


def policy_document(iam: Any, arn: str) -> dict[str, Any]:
    version = iam.get_policy(PolicyArn=arn)["Policy"]["DefaultVersionId"]
    document = iam.get_policy_version(PolicyArn=arn, VersionId=version)["PolicyVersion"]["Document"]
    return json.loads(document) if isinstance(document, str) else dict(document)


def test_check_script_passes_and_leaves_no_state_in_the_repo(
    terraform_check: CheckRun | None,
) -> None:
    if terraform_check is None:
        unavailable(Part.TERRAFORM, TERRAFORM_MISSING)
    code, output = terraform_check.result()
    assert code == 0, output
    assert "Success!" in output and output.rstrip().endswith("== ok")
    leftovers = [
        p.name for p in MODULE.rglob("*") if p.name.startswith((".terraform", "terraform.tfstate"))
    ]
    assert leftovers == []
