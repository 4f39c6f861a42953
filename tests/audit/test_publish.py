"""Publication of signed checkpoints (issue 13): to moto's S3 with Object Lock over real HTTP, and
to a webhook; queued durably, retried when the target is down, never in an exchange's way."""

from __future__ import annotations

import datetime as dt
import http.server
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from fastapi.testclient import TestClient
from moto.server import ThreadedMotoServer
from sqlalchemy import select

from broker.api.app import create_app
from broker.audit.publish import S3Target
from broker.errors import ConfigError
from broker.runtime import Broker, build_broker
from broker.settings import Settings
from broker.store.tables import CheckpointRow, PublicationRow
from tests.conftest import eval_token, exchange_form, free_port
from tests.poll import SERVE_POLL_S

REGION = "eu-west-1"
BUCKET = "audit-checkpoints"
POLICY = """
issuers:
  - {name: dev, issuer: "https://dev.broker.invalid/workload", audiences: [model-broker],
     dev: true, algorithms: [ES256]}
  - {name: dev-people, kind: people, issuer: "https://dev.broker.invalid/people",
     audiences: [model-broker-admin], roles_claim: groups, dev: true, algorithms: [ES256]}
actions:
  evaluate: {tier: low, max_ttl: 1h}
models:
  llama-7b: {}
rules:
  - {name: eval, issuer: dev, subject: "repo:acme/evals:ref:refs/heads/main",
     models: [llama-7b], actions: [evaluate], backends: [jwt]}
roles:
  auditor: [security-audit]
"""


class Moto:
    """A moto server that can be stopped and started again on the same port (its buckets and
    objects live in this process, so they survive the restart)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def s3(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )

    def bucket(self, *, lock: bool = True) -> None:
        s3 = self.s3()
        s3.create_bucket(
            Bucket=BUCKET,
            CreateBucketConfiguration={"LocationConstraint": REGION},
            ObjectLockEnabledForBucket=lock,
        )
        if lock:
            s3.put_object_lock_configuration(
                Bucket=BUCKET,
                ObjectLockConfiguration={
                    "ObjectLockEnabled": "Enabled",
                    "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 1}},
                },
            )

    def objects(self) -> dict[str, bytes]:
        s3 = self.s3()
        listed = s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])
        return {o["Key"]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listed}


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Moto]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = Moto()
    server.start()
    try:
        httpx.post(f"{server.url}/moto-api/reset").raise_for_status()
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "broker-test-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "broker-test-secret")
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        monkeypatch.setenv("AWS_REGION", REGION)
        yield server
    finally:
        server.stop()


def make_broker(tmp_path: Path, **publish: Any) -> Broker:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    return build_broker(Settings(dev=True, data_dir=tmp_path / "data", policy=policy, **publish))


def exchange(client: TestClient, broker: Broker) -> None:
    resp = client.post("/v1/token", data=exchange_form(eval_token(broker)))
    assert resp.status_code == 200, resp.text


def sign(broker: Broker) -> str:
    with broker.store.write() as session:
        return broker.audit.sign_checkpoint(session, dt.datetime.now(dt.UTC)).note


def signed_notes(broker: Broker) -> dict[int, str]:
    with broker.store.read() as session:
        return {r.size: r.note for r in session.scalars(select(CheckpointRow))}


def queued(broker: Broker) -> list[tuple[str, int, str]]:
    with broker.store.read() as session:
        rows = session.scalars(select(PublicationRow).order_by(PublicationRow.size))
        return [(r.target, r.size, r.status) for r in rows]


def later(broker: Broker, minutes: int = 30) -> None:
    """Past every retry's backoff."""
    assert broker.publisher is not None
    moment = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=minutes)
    broker.publisher.clock = lambda: moment


def test_every_signed_checkpoint_goes_to_s3_under_object_lock(moto: Moto, tmp_path: Path) -> None:
    moto.bucket()
    broker = make_broker(
        tmp_path,
        audit_publish_s3=f"s3://{BUCKET}/broker/checkpoints",
        audit_publish_s3_retention_days=7,
    )
    with TestClient(create_app(broker=broker)) as client:
        for _ in range(2):
            exchange(client, broker)
            broker.maintain()
        notes = signed_notes(broker)
        assert len(notes) == 2 and queued(broker) == []
        assert moto.objects() == {
            f"broker/checkpoints/{size:020d}": note.encode() for size, note in notes.items()
        }
        s3 = moto.s3()
        key = f"broker/checkpoints/{max(notes):020d}"
        head = s3.head_object(Bucket=BUCKET, Key=key)
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert head["ObjectLockRetainUntilDate"] > dt.datetime.now(dt.UTC) + dt.timedelta(days=6)
        with pytest.raises(s3.exceptions.ClientError, match="AccessDenied"):
            s3.delete_object(Bucket=BUCKET, Key=key, VersionId=head["VersionId"])
        assert "notices" not in client.get("/readyz").json()
        metrics = client.get("/metrics").text
        assert 'broker_audit_publish_pending{target="s3"} 0.0' in metrics


def test_publication_survives_the_publisher_being_down(
    moto: Moto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    moto.bucket()
    moto.stop()
    broker = make_broker(tmp_path, audit_publish_s3=f"s3://{BUCKET}/cp")
    with TestClient(create_app(broker=broker)) as client:
        for _ in range(3):
            exchange(client, broker)  # exchanges never wait for publication
            broker.maintain()
        assert [status for _, _, status in queued(broker)] == ["pending"] * 3
        ready = client.get("/readyz")
        assert ready.status_code == 200  # publication behind never stops exchanges
        notice = ready.json()["notices"]["audit_publication_s3"]
        assert notice.startswith(f"s3://{BUCKET}/cp: 3 checkpoint(s) waiting")
        assert "PutObject" in notice
        metrics = client.get("/metrics").text
        assert 'broker_audit_publish_pending{target="s3"} 3.0' in metrics
        assert 'broker_audit_publish_failures_total{target="s3"} 3.0' in metrics
    assert any("not published to s3" in r.getMessage() for r in caplog.records)
    notes = signed_notes(broker)
    # The broker restarts while the target is still down, then the target comes back.
    broker = make_broker(tmp_path, audit_publish_s3=f"s3://{BUCKET}/cp")
    try:
        moto.start()
        later(broker)
        broker.maintain()
        assert queued(broker) == []
        expected = {size: note for size, note in signed_notes(broker).items()}
        assert notes.items() <= expected.items()
        assert moto.objects() == {f"cp/{s:020d}": n.encode() for s, n in expected.items()}
        assert broker.notices() == {}
    finally:
        broker.close()


def test_a_checkpoint_published_twice_is_one_object(moto: Moto, tmp_path: Path) -> None:
    """A crash between the upload and the queue's update uploads again: the same note is a
    success, not a second version."""
    moto.bucket()
    target = S3Target(f"s3://{BUCKET}")
    note = b"origin\n1\n" + b"A" * 44 + b"\n\n\xe2\x80\x94 sig\n"
    target.publish(1, note)
    target.publish(1, note)
    versions = moto.s3().list_object_versions(Bucket=BUCKET)["Versions"]
    assert [v["Key"] for v in versions] == [f"{1:020d}"]


def test_another_checkpoint_of_the_same_size_is_a_fork(
    moto: Moto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    moto.bucket()
    broker = make_broker(tmp_path, audit_publish_s3=f"s3://{BUCKET}")
    with TestClient(create_app(broker=broker)) as client:
        exchange(client, broker)
        size = 1 + 1  # policy.loaded and the exchange
        moto.s3().put_object(Bucket=BUCKET, Key=f"{size:020d}", Body=b"another history\n")
        with caplog.at_level(logging.CRITICAL):
            broker.maintain()
        assert queued(broker) == [("s3", size, "conflict")]
        problem = broker.readiness()["audit"]
        assert "holds another checkpoint of the same size: the log forked" in problem
        assert client.post("/v1/token", data=exchange_form(eval_token(broker))).status_code == 503
        assert "broker_audit_publication_conflict 1.0" in client.get("/metrics").text
    assert any(r.levelno == logging.CRITICAL and "forked" in r.getMessage() for r in caplog.records)
    restarted = make_broker(tmp_path, audit_publish_s3=f"s3://{BUCKET}")
    try:
        assert "forked" in restarted.readiness()["audit"]  # the conflict is kept, not forgotten
    finally:
        restarted.close()


def test_a_bucket_without_object_lock_is_a_notice(moto: Moto, tmp_path: Path) -> None:
    moto.bucket(lock=False)
    broker = make_broker(tmp_path, audit_publish_s3=f"s3://{BUCKET}")
    try:
        broker.maintain()
        assert queued(broker) == []
        notice = broker.notices()["audit_publication_s3"]
        assert f"bucket {BUCKET} has no Object Lock" in notice
    finally:
        broker.close()


@dataclass
class Hook:
    """A webhook receiver on loopback that can be told to fail."""

    answers: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
def hook() -> Iterator[tuple[Hook, str]]:
    state = Hook()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = state.answers.pop(0) if state.answers else 204
            if status < 300:
                state.received.append((dict(self.headers), body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": SERVE_POLL_S}, daemon=True
    )
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/checkpoints?secret=s3cr3t"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_webhook_gets_each_signed_note_and_a_failure_is_retried(
    hook: tuple[Hook, str], tmp_path: Path
) -> None:
    state, url = hook
    state.answers = [503]
    broker = make_broker(tmp_path, audit_publish_url=url)
    try:
        note = sign(broker)
        broker.maintain()
        assert queued(broker) == [("webhook", 1, "pending")] and state.received == []
        notice = broker.notices()["audit_publication_webhook"]
        assert "answered 503" in notice and "s3cr3t" not in notice
        later(broker)
        broker.maintain()
        assert queued(broker) == []
        [(headers, body)] = state.received
        assert body == note.encode()
        assert headers["Content-Type"] == "text/plain; charset=utf-8"
        assert headers["X-Broker-Audit-Size"] == "1"
        assert headers["X-Broker-Audit-Origin"] == broker.audit.origin
    finally:
        broker.close()


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("audit_publish_s3", "https://bucket/prefix", "BROKER_AUDIT_PUBLISH_S3"),
        ("audit_publish_s3", "s3:///prefix", "BROKER_AUDIT_PUBLISH_S3"),
        ("audit_publish_url", "ftp://hooks.example", "BROKER_AUDIT_PUBLISH_URL"),
    ],
)
def test_a_bad_target_is_refused_at_start(
    tmp_path: Path, setting: str, value: str, named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        make_broker(tmp_path, **{setting: value})
