"""broker.agent.exec.Child in-process with real child processes and a credential made here:
the environment it starts with, the refresh signal, stopping it when the agent gives up, and
a command that cannot run."""

from __future__ import annotations

import datetime as dt
import signal
import sys
import threading
from pathlib import Path

from broker.agent.exec import Child, exit_code
from broker.client import BrokerJWT
from tests.poll import poll

NOW = dt.datetime.now(dt.UTC)
JWT = BrokerJWT("g_1", "urn:ietf:params:oauth:token-type:jwt", NOW, NOW, token="a.b.c")
CHILD = """
import os, signal, sys, time
out = sys.argv[1]
def note(text):
    with open(out, "a") as f:
        f.write(text + "\\n")
signal.signal(signal.SIGUSR1, lambda *_: note("usr1"))
env = os.environ
note(" ".join([env["BROKER_JWT"], env["BROKER_GRANT_ID"], env["BROKER_CREDENTIAL_FILE"]]))
while True:
    signal.pause()
"""


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_starts_with_the_credential_signals_refreshes_and_is_stopped_when_the_agent_gives_up(
    tmp_path: Path,
) -> None:
    out, stop = tmp_path / "out", threading.Event()
    child = Child(
        [sys.executable, "-c", CHILD, str(out)],
        credential_file="/run/cred.json",
        refresh_signal=signal.SIGUSR1,
        stop=stop,
    )
    try:
        child.on_credential(JWT)
        poll(lambda: lines(out) or None, "the child to start")
        assert lines(out) == ["a.b.c g_1 /run/cred.json"]
        child.on_credential(JWT)
        poll(lambda: "usr1" in lines(out) or None, "the refresh signal")
        assert not stop.is_set()
        assert child.finish() == 128 + signal.SIGTERM  # not stopping: the agent gave up
        assert stop.is_set()
    finally:
        if child.proc is not None and child.proc.poll() is None:
            child.proc.kill()


def test_no_refresh_signal_sends_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = Child([sys.executable, "-c", CHILD, str(out)], credential_file="f", refresh_signal=None)
    try:
        child.on_credential(JWT)
        poll(lambda: lines(out) or None, "the child to start")
        child.on_credential(JWT)  # with SIGHUP's default action this would end the child
        assert child.proc is not None and child.proc.poll() is None
        child.forward(signal.SIGINT)
        assert child.finish() == 128 + signal.SIGINT
    finally:
        if child.proc is not None and child.proc.poll() is None:
            child.proc.kill()


def test_a_command_that_cannot_run_ends_the_agent_with_127_or_126(tmp_path: Path) -> None:
    stop = threading.Event()
    missing = Child([str(tmp_path / "nope")], credential_file="f", stop=stop)
    missing.on_credential(JWT)
    assert stop.is_set() and missing.finish() == 127
    plain = tmp_path / "plain"
    plain.write_text("not executable")
    denied = Child([str(plain)], credential_file="f")
    denied.on_credential(JWT)
    assert denied.finish() == 126


def test_exit_codes_read_as_a_shell_reads_them() -> None:
    assert [exit_code(c) for c in (0, 7, -15, -9)] == [0, 7, 143, 137]
    assert Child(["true"], credential_file="f").finish() is None  # never started
