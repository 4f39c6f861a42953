"""An example training job that reads a model's weights from S3 with credentials from the broker.

    BROKER_TOKEN_FILE=/var/run/secrets/broker/token python examples/train.py \\
        --model llama-7b --weights s3://models/llama-7b/weights.bin

The workload token comes from ``$BROKER_TOKEN_FILE`` (a Kubernetes projected token), or the
GitHub Actions runner; the broker is ``$BROKER_URL`` (default http://127.0.0.1:8080).
``broker.client.credentials()`` is called whenever a client is needed: it returns the cached
credential, and exchanges again at about two thirds of its lifetime.

Against ``make run``'s dev broker, which has no AWS account behind it, ``--dry-run`` asks for a
broker JWT instead and reads nothing:

    broker dev token --sub repo:acme/evals:ref:refs/heads/main \\
        --claim job_workflow_ref=acme/workflows/.github/workflows/eval.yml@refs/heads/main \\
        > /tmp/workload.jwt
    BROKER_TOKEN_FILE=/tmp/workload.jwt python examples/train.py --model llama-7b --dry-run
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.client import AwsCredentials, ClientError, credentials

CHUNK = 1 << 20


def s3_client(model: str, action: str) -> Any:
    """An S3 client with the broker's current credentials for ``action`` on ``model``."""
    import boto3  # noqa: PLC0415 (only the real run needs it)

    aws = credentials(model=model, action=action, backend="aws")
    assert isinstance(aws, AwsCredentials)
    return boto3.client(
        "s3",
        aws_access_key_id=aws.access_key_id,
        aws_secret_access_key=aws.secret_access_key,
        aws_session_token=aws.session_token,
    )


def download(model: str, action: str, url: str, dest: Path) -> str:
    """Copy the object at ``s3://bucket/key`` to ``dest``; its SHA-256."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or not parts.path.strip("/"):
        raise ValueError(f"--weights: expected s3://bucket/key, got {url!r}")
    body = s3_client(model, action).get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))
    digest = hashlib.sha256()
    with dest.open("wb") as out:
        for chunk in body["Body"].iter_chunks(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def train(weights: Path, epochs: int) -> None:
    """Stands in for the real training loop."""
    size = weights.stat().st_size
    for epoch in range(1, epochs + 1):
        print(f"epoch {epoch}/{epochs}: {size} bytes of weights")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="llama-7b")
    p.add_argument("--action", default="evaluate")
    p.add_argument("--weights", help="s3://bucket/key (default: s3://models/MODEL/weights.bin)")
    p.add_argument("--out", type=Path, default=Path("weights.bin"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="a broker JWT only; no S3")
    args = p.parse_args(argv)
    weights = args.weights or f"s3://models/{args.model}/weights.bin"
    try:
        if args.dry_run:
            jwt = credentials(model=args.model, action=args.action)
            print(f"dry run: {jwt!r}; would read {weights} with the aws backend")
            return 0
        sha256 = download(args.model, args.action, weights, args.out)
    except ClientError as exc:
        print(f"the broker refused: {exc.code}: {exc.description}", file=sys.stderr)
        return 1
    except ValueError as exc:  # no token source, a malformed --weights
        print(f"error: {exc}", file=sys.stderr)
        return 2
    aws = credentials(model=args.model, action=args.action, backend="aws")
    print(f"read {weights} ({sha256}) with {aws!r}")
    train(args.out, args.epochs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
