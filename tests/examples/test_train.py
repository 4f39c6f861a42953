"""examples/train.py as a process against a live dev broker with a dev token file: the real
run reads its weights from S3 (moto over HTTP) with the AWS credentials the broker issued, and
the dry run that `make run`'s broker allows gets a broker JWT; neither prints a secret."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

from broker.runtime import Broker
from tests.backends.aws.conftest import REGION, Moto, moto, moto_server  # noqa: F401 (fixtures)
from tests.conftest import LiveServer, eval_token

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "examples" / "train.py"


def run_train(server: LiveServer, token_file: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
    }  # the only AWS credentials the script has are the broker's
    env.update(PYTHONPATH=str(ROOT), BROKER_URL=server.url, BROKER_TOKEN_FILE=str(token_file))
    return subprocess.run(
        [sys.executable, str(TRAIN), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_reads_the_weights_with_the_brokers_aws_credentials(
    moto: Moto,  # noqa: F811 (the fixture; before live_broker, whose aws backend reaches moto)
    live_broker: tuple[LiveServer, Broker],
    tmp_path: Path,
) -> None:
    server, broker = live_broker
    weights = os.urandom(3 * 1024 * 1024 + 17)
    s3 = moto.admin("s3")
    s3.create_bucket(Bucket="models", CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_object(Bucket="models", Key="llama-7b/weights.bin", Body=weights)
    token_file, out = tmp_path / "workload.jwt", tmp_path / "weights.bin"
    token_file.write_text(eval_token(broker))
    done = run_train(server, token_file, "--out", str(out), "--epochs", "1")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == weights
    assert hashlib.sha256(weights).hexdigest() in done.stdout
    assert "epoch 1/1" in done.stdout
    [grant_id] = re.findall(r"AwsCredentials\(grant_id='(g_[0-9a-f]+)'", done.stdout)
    grant = broker.grants.get(grant_id)
    assert (grant.backend, grant.model, grant.action) == ("aws", "llama-7b", "evaluate")


def test_a_dry_run_gets_a_broker_jwt_and_reads_nothing(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live_broker
    token_file = tmp_path / "workload.jwt"
    token = eval_token(broker)
    token_file.write_text(token)
    done = run_train(server, token_file, "--dry-run", "--out", str(tmp_path / "w"))
    assert done.returncode == 0, done.stderr
    assert "dry run: BrokerJWT(grant_id='g_" in done.stdout
    assert token not in done.stdout + done.stderr and not (tmp_path / "w").exists()


def test_without_a_token_source_it_says_so(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, _ = live_broker
    done = run_train(server, tmp_path / "missing.jwt", "--dry-run")
    assert done.returncode == 2 and "missing.jwt: no such file" in done.stderr
