"""broker.client.credentials against a running dev broker: typed, cached, refreshed while the
token file rotates, kept while the broker is down, one exchange for many threads."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest

from broker.api.app import create_app
from broker.client import BrokerClient, BrokerJWT, ClientError, Provider
from broker.client.credentials import (
    AwsCredentials,
    DatabaseLogin,
    credentials,
    env_lines,
    parse_answer,
    refresh_delay,
)
from broker.client.sources import file_source
from broker.runtime import Broker, build_broker
from tests.conftest import EVAL_SUB, EVAL_WORKFLOW, LiveServer
from tests.poll import POLL_LIMIT_S, poll


def eval_token(broker: Broker) -> str:
    assert broker.dev_issuer is not None
    return broker.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})


def test_one_call_gives_a_typed_cached_credential(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live_broker
    token_file = tmp_path / "workload.jwt"
    token_file.write_text(eval_token(broker))
    args = {"model": "llama-7b", "action": "evaluate", "url": server.url}
    first = credentials(**args, token_file=str(token_file))
    assert isinstance(first, BrokerJWT) and first.grant_id.startswith("g_")
    assert first.token.count(".") == 2 and first.ttl_seconds == 3600
    # The dev token is single-use: a second exchange would be refused, so this is the cache.
    assert credentials(**args, token_file=str(token_file)) is first
    assert first.token not in repr(first) and first.token not in str(first)


def test_refreshes_while_the_token_file_rotates(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live_broker
    token_file = tmp_path / "workload.jwt"
    token_file.write_text(eval_token(broker))
    provider = Provider(
        BrokerClient(server.url),
        file_source(token_file),
        model="llama-7b",
        action="evaluate",
        requested_ttl=3,
    )
    first = provider.get()
    assert first.ttl_seconds == 3
    token_file.write_text(eval_token(broker))  # the kubelet's rotation: a new single-use token
    second = poll(
        lambda: c if (c := provider.get()).grant_id != first.grant_id else None, "refresh"
    )
    token_file.write_text(eval_token(broker))
    poll(lambda: c if (c := provider.get()).grant_id != second.grant_id else None, "2nd refresh")


def test_keeps_the_last_credential_while_the_broker_is_down(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live_broker
    token_file = tmp_path / "workload.jwt"
    token_file.write_text(eval_token(broker))
    provider = Provider(
        BrokerClient(server.url, timeout=2),
        file_source(token_file),
        model="llama-7b",
        action="evaluate",
        requested_ttl=3,
    )
    first = provider.get()
    token_file.write_text(eval_token(broker))
    server.__exit__()
    seen: list[str] = []

    def outage() -> ClientError | None:
        try:
            seen.append(provider.get().grant_id)  # due for refresh: the broker is unreachable
        except ClientError as exc:
            return exc
        return None

    refused = poll(outage, "the kept credential to expire")
    assert refused.code == "unreachable" and set(seen) == {first.grant_id}
    assert dt.datetime.now(dt.UTC) >= first.expires_at
    # The broker comes back: a new process on the same port and data dir.
    with LiveServer(create_app(broker=build_broker(broker.settings)), broker.settings.port):
        assert provider.get().grant_id != first.grant_id


def test_many_threads_share_one_exchange(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live_broker
    token_file = tmp_path / "workload.jwt"
    token_file.write_text(eval_token(broker))  # single-use: a second exchange would fail
    provider = Provider(
        BrokerClient(server.url), file_source(token_file), model="llama-7b", action="evaluate"
    )
    got: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            got.append(provider.get().grant_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=POLL_LIMIT_S)
    assert errors == [] and len(got) == 8 and len(set(got)) == 1


def test_a_refusal_names_the_code_and_no_credential_is_made(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live_broker
    token_file = tmp_path / "workload.jwt"
    token_file.write_text(eval_token(broker))
    with pytest.raises(ClientError) as refused:
        credentials(
            model="llama-7b", action="deploy-weights", url=server.url, token_file=str(token_file)
        )
    assert refused.value.code == "access_denied"


ISSUED = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)


def test_a_database_login_has_username_and_password() -> None:
    answer = {
        "access_token": "pw-secret",
        "username": "v-llama-eval",
        "issued_token_type": "urn:broker:token-type:database-credentials",
        "token_type": "N_A",
        "expires_in": 600,
        "grant_id": "g_1",
    }
    login = parse_answer(answer, ISSUED)
    assert isinstance(login, DatabaseLogin)
    assert (login.username, login.password) == ("v-llama-eval", "pw-secret")
    assert login.expires_at == ISSUED + dt.timedelta(seconds=600)
    assert "DB_USERNAME=v-llama-eval\nDB_PASSWORD=pw-secret\n" in env_lines(login)
    assert "pw-secret" not in repr(login) and login.secrets() == ["pw-secret"]


def test_aws_credentials_have_every_part() -> None:
    answer = {
        "access_token": "st",
        "issued_token_type": "urn:broker:token-type:aws-credentials",
        "token_type": "N_A",
        "expires_in": 900,
        "grant_id": "g_2",
        "aws_credentials": {
            "access_key_id": "ASIA1",
            "secret_access_key": "sk",
            "session_token": "st",
            "expiration": "2030-01-01T12:15:00Z",
        },
    }
    aws = parse_answer(answer, ISSUED)
    assert isinstance(aws, AwsCredentials)
    assert aws.env()["AWS_ACCESS_KEY_ID"] == "ASIA1"
    assert aws.env()["AWS_SECRET_ACCESS_KEY"] == "sk" and aws.env()["AWS_SESSION_TOKEN"] == "st"
    assert aws.env()["AWS_CREDENTIAL_EXPIRATION"] == "2030-01-01T12:15:00Z"
    assert '"Expiration": "2030-01-01T12:15:00Z"' in aws.process_json()


def test_an_answer_without_a_part_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="username"):
        parse_answer(
            {
                "access_token": "pw-secret",
                "issued_token_type": "urn:broker:token-type:database-credentials",
                "expires_in": 60,
                "grant_id": "g",
            }
        )


def test_refresh_comes_at_about_two_thirds_with_jitter() -> None:
    cred = BrokerJWT("g", "t", ISSUED, ISSUED + dt.timedelta(seconds=900), token="x")
    assert refresh_delay(cred, lambda: 0.0) == 600
    assert refresh_delay(cred, lambda: 1.0) == pytest.approx(510)
