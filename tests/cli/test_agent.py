"""``broker agent`` as a process against a running dev broker: it refreshes a short-lived
credential while its token file rotates, rides out the broker being down, exits cleanly on
SIGTERM, and as an init container exits once the sink is written."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.conftest import EVAL_SUB, EVAL_WORKFLOW, LiveServer, free_port
from tests.poll import POLL_LIMIT_S, poll

EVAL = ("--model", "llama-7b", "--action", "evaluate")


def eval_token(broker: Broker) -> str:
    assert broker.dev_issuer is not None
    return broker.dev_issuer.mint(sub=EVAL_SUB, claims={"job_workflow_ref": EVAL_WORKFLOW})


@contextmanager
def agent(log: Path, *argv: str) -> Iterator[subprocess.Popen[bytes]]:
    """``broker agent ARGV`` with its log in ``log``; killed at the end if still running."""
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli.main", "agent", *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=POLL_LIMIT_S)


def grant_in(sink: Path, other_than: str | None = None) -> str | None:
    """The grant id in the json sink, when it holds one other than ``other_than``."""
    try:
        grant = str(json.loads(sink.read_text())["grant_id"])
    except (FileNotFoundError, ValueError):
        return None
    return grant if grant != other_than else None


def test_refreshes_while_the_token_file_rotates_and_stops_on_sigterm(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live_broker
    token_file, sink, log = tmp_path / "token", tmp_path / "cred.json", tmp_path / "agent.log"
    token_file.write_text(eval_token(broker))
    argv = (*EVAL, "--url", server.url, "--token-file", str(token_file), "--ttl", "3")
    with agent(log, *argv, "--sink", str(sink)) as proc:
        first = poll(lambda: grant_in(sink), "the first credential")
        assert stat.S_IMODE(sink.stat().st_mode) == 0o600
        body = json.loads(sink.read_text())
        assert body["token"].count(".") == 2 and body["issued_token_type"].endswith(":jwt")
        token_file.write_text(eval_token(broker))  # the kubelet rotates the projected token
        second = poll(lambda: grant_in(sink, first), "a refresh")
        token_file.write_text(eval_token(broker))
        poll(lambda: grant_in(sink, second), "a second refresh")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=POLL_LIMIT_S) == 0
    text = log.read_text()
    assert "SIGTERM: stopping" in text and "Traceback" not in text
    assert body["token"] not in text  # the log names grants, never secrets


def test_rides_out_the_broker_being_down(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(dev=True, data_dir=tmp_path / "data", policy=EXAMPLE_POLICY, port=port)
    broker = build_broker(settings)
    token_file, sink, log = tmp_path / "token", tmp_path / "cred.json", tmp_path / "agent.log"
    token_file.write_text(eval_token(broker))
    url = f"http://127.0.0.1:{port}"
    argv = (*EVAL, "--url", url, "--token-file", str(token_file), "--ttl", "3")
    with agent(log, *argv, "--sink", str(sink)):
        # Nothing listens yet: the agent retries with backoff.
        poll(lambda: "unreachable" in log.read_text() or None, "a failed attempt")
        with LiveServer(create_app(broker=broker), port):
            first = poll(lambda: grant_in(sink), "the first credential once the broker is up")
        # Down again: the sink keeps the last credential until it expires, then is removed.
        token_file.write_text(eval_token(broker))
        poll(lambda: "keeping" in log.read_text() or None, "a refresh failing, credential kept")
        assert grant_in(sink) == first
        poll(lambda: not sink.exists() or None, "the expired credential removed")
        with LiveServer(create_app(broker=build_broker(settings)), port):
            poll(lambda: grant_in(sink, first), "a new credential once the broker is back")


def test_exit_after_auth_writes_the_sink_and_exits(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live_broker
    token_file, sink, log = tmp_path / "token", tmp_path / "cred.env", tmp_path / "agent.log"
    token_file.write_text(eval_token(broker))
    argv = (*EVAL, "--url", server.url, "--token-file", str(token_file), "--format", "env")
    with agent(log, *argv, "--sink", str(sink), "--exit-after-auth") as proc:
        assert proc.wait(timeout=POLL_LIMIT_S) == 0
    lines = dict(line.split("=", 1) for line in sink.read_text().splitlines())
    assert lines["BROKER_JWT"].count(".") == 2 and lines["BROKER_GRANT_ID"].startswith("g_")


def test_exit_after_auth_exits_1_when_refused(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live_broker
    token_file, sink, log = tmp_path / "token", tmp_path / "cred.json", tmp_path / "agent.log"
    token_file.write_text(eval_token(broker))
    argv = ("--model", "llama-7b", "--action", "deploy-weights", "--url", server.url)
    with agent(
        log, *argv, "--token-file", str(token_file), "--sink", str(sink), "--exit-after-auth"
    ) as proc:
        assert proc.wait(timeout=POLL_LIMIT_S) == 1
    assert "access_denied" in log.read_text() and not sink.exists()


def test_a_format_the_backend_cannot_fill_is_a_usage_error(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("x")
    argv = (*EVAL, "--token-file", str(token_file), "--sink", str(tmp_path / "c"))
    log = tmp_path / "agent.log"
    with agent(log, *argv, "--format", "aws-credentials") as proc:
        assert proc.wait(timeout=POLL_LIMIT_S) == 2
    assert "--format aws-credentials needs --backend aws" in log.read_text()
