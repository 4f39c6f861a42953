"""``broker agent --exec -- CMD`` as processes against a running dev broker: the command starts
with the credential in its environment, sees a fresh one in $BROKER_CREDENTIAL_FILE after each
refresh signal, ends with the agent on SIGTERM, and its exit code is the agent's; it never
outlives the agent, even a SIGKILLed one."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from broker.runtime import Broker
from tests.cli.test_agent import EVAL, agent, eval_token
from tests.conftest import LiveServer
from tests.poll import POLL_LIMIT_S, poll

CHILD = str(Path(__file__).with_name("exec_child.py"))


def notes(out: Path) -> list[str]:
    return out.read_text().splitlines() if out.exists() else []


def noted(out: Path, prefix: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in notes(out) if line.startswith(prefix + " ")]


def gone(pid: int) -> bool:
    """The process has exited (a zombie awaiting its new parent's wait counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def exec_argv(server: LiveServer, token_file: Path, *extra: str) -> tuple[str, ...]:
    return (*EVAL, "--url", server.url, "--token-file", str(token_file), *extra, "--exec", "--")


def test_the_child_sees_each_refresh_and_ends_with_the_agent(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live_broker
    token_file, out, log = tmp_path / "token", tmp_path / "child.out", tmp_path / "agent.log"
    token_file.write_text(eval_token(broker))
    argv = exec_argv(server, token_file, "--ttl", "3")
    with agent(log, *argv, sys.executable, CHILD, str(out)) as proc:
        [started] = poll(lambda: noted(out, "start") or None, "the command to start")
        first, kind = started.split()
        assert first.startswith("g_") and kind == "jwt"  # the credential is in its environment
        [credential_file] = noted(out, "file")
        assert Path(credential_file).stat().st_mode & 0o077 == 0  # a private sink of its own
        token_file.write_text(eval_token(broker))  # the kubelet rotates the token
        fresh = poll(lambda: [g for g in noted(out, "hup") if g != first] or None, "a refresh")
        token_file.write_text(eval_token(broker))
        poll(lambda: [g for g in noted(out, "hup") if g not in (first, *fresh)] or None, "2nd")
        [pid] = noted(out, "pid")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=POLL_LIMIT_S) == 0  # the child's own exit code
    assert notes(out)[-1] == "term" and gone(int(pid))
    assert not Path(credential_file).exists()  # the private sink went with the agent
    text = log.read_text()
    assert "SIGTERM: stopping" in text and "Traceback" not in text


def test_a_given_sink_is_rewritten_and_named_to_the_child(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live_broker
    token_file, out, log = tmp_path / "token", tmp_path / "child.out", tmp_path / "agent.log"
    sink = tmp_path / "cred.json"
    token_file.write_text(eval_token(broker))
    argv = exec_argv(server, token_file, "--ttl", "3", "--sink", str(sink))
    with agent(log, *argv, sys.executable, CHILD, str(out)) as proc:
        [started] = poll(lambda: noted(out, "start") or None, "the command to start")
        assert noted(out, "file") == [str(sink)]
        token_file.write_text(eval_token(broker))
        [fresh] = poll(lambda: noted(out, "hup") or None, "a refresh")
        assert fresh != started.split()[0] and fresh in sink.read_text()
        proc.send_signal(signal.SIGINT)  # forwarded: the child's SIGINT ends it (exit 130)
        assert proc.wait(timeout=POLL_LIMIT_S) == 130
    assert sink.exists()


@pytest.mark.parametrize("code", [0, 7])
def test_the_child_exit_code_is_the_agents(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path, code: int
) -> None:
    server, broker = live_broker
    token_file, out, log = tmp_path / "token", tmp_path / "child.out", tmp_path / "agent.log"
    token_file.write_text(eval_token(broker))
    argv = exec_argv(server, token_file)
    with agent(log, *argv, sys.executable, CHILD, str(out), "exit", str(code)) as proc:
        assert proc.wait(timeout=POLL_LIMIT_S) == code
    assert len(noted(out, "start")) == 1


def test_a_sigkilled_agent_takes_the_child_along(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    if sys.platform != "linux":
        pytest.fail("the parent-death signal is Linux's")
    server, broker = live_broker
    token_file, out, log = tmp_path / "token", tmp_path / "child.out", tmp_path / "agent.log"
    token_file.write_text(eval_token(broker))
    with agent(log, *exec_argv(server, token_file), sys.executable, CHILD, str(out)) as proc:
        [pid] = poll(lambda: noted(out, "pid") or None, "the command to start")
        proc.kill()
        proc.wait(timeout=POLL_LIMIT_S)
    try:
        poll(lambda: gone(int(pid)) or None, "the orphan to be killed")
    finally:
        if not gone(int(pid)):
            os.kill(int(pid), signal.SIGKILL)  # the test leaves no process behind
    assert "term" not in notes(out)


def test_a_command_that_cannot_run_exits_127(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live_broker
    token_file, log = tmp_path / "token", tmp_path / "agent.log"
    token_file.write_text(eval_token(broker))
    missing = str(tmp_path / "no-such-command")
    with agent(log, *exec_argv(server, token_file), missing) as proc:
        assert proc.wait(timeout=POLL_LIMIT_S) == 127
    assert "no-such-command" in log.read_text()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("--exec",), "--exec needs the command after --"),
        (("--", "true"), "'true': a command to run needs --exec"),
        (("--exec", "--refresh-signal", "SIGNOPE", "--", "true"), "is not a signal"),
    ],
)
def test_usage_errors(tmp_path: Path, argv: tuple[str, ...], says: str) -> None:
    token_file, log = tmp_path / "token", tmp_path / "agent.log"
    token_file.write_text("x")
    with agent(log, *EVAL, "--token-file", str(token_file), *argv) as proc:
        assert proc.wait(timeout=POLL_LIMIT_S) == 2
    assert says in log.read_text()


def test_a_refusal_before_the_first_credential_exits_1_without_starting_the_command(
    live_broker: tuple[LiveServer, Broker], tmp_path: Path
) -> None:
    server, broker = live_broker
    token_file, out, log = tmp_path / "token", tmp_path / "child.out", tmp_path / "agent.log"
    token_file.write_text(eval_token(broker))
    argv = ("--model", "llama-7b", "--action", "deploy-weights", "--url", server.url)
    with agent(
        log, *argv, "--token-file", str(token_file), "--exec", "--", sys.executable, CHILD, str(out)
    ) as proc:
        assert proc.wait(timeout=POLL_LIMIT_S) == 1
    assert "access_denied" in log.read_text() and not out.exists()
