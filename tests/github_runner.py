"""A GitHub runner in miniature, for running action.yml's steps as the runner does.

- ``serve_runner``: a loopback stand-in for the runner's OIDC endpoint
  (``ACTIONS_ID_TOKEN_REQUEST_URL``): it checks the bearer ``ACTIONS_ID_TOKEN_REQUEST_TOKEN``
  and hands out GitHub-shaped tokens for the audience asked for, signed with ``github_key``.
- ``run_action``: each ``run:`` step with its ``${{ ... }}`` expressions replaced textually (as
  the runner does before bash sees the script), under ``bash --noprofile --norc -eo pipefail``,
  with ``GITHUB_ENV`` carried between steps and each step's ``GITHUB_OUTPUT`` read back in the
  runner's formats.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import EVAL_SUB, EVAL_WORKFLOW
from tests.poll import SERVE_POLL_S

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "action.yml"
GITHUB = "https://token.actions.githubusercontent.com"
RUNNER_BEARER = "runner-request-" + uuid.uuid4().hex
EXPRESSION = re.compile(r"\$\{\{\s*([a-z_]+)\.([A-Za-z0-9_.-]+)\s*\}\}")


@dataclass
class Runner:
    """The runner's OIDC endpoint: what it was asked and what it handed out."""

    url: str
    audiences: list[str] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    refused: int = 0
    mint: Callable[[str], str] | None = None
    """Makes the token for an audience; default: GitHub's shape, signed with ``github_key``."""


@contextmanager
def serve_runner(github_key: rsa.RSAPrivateKey) -> Iterator[Runner]:
    """The runner's OIDC endpoint on loopback, stopped at the end."""
    state = Runner(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.headers.get("Authorization") != f"Bearer {RUNNER_BEARER}":
                state.refused += 1
                self.send_response(401)
                self.end_headers()
                return
            audience = parse_qs(urlsplit(self.path).query).get("audience", [""])[0]
            state.audiences.append(audience)
            now = int(time.time())
            claims = {
                "iss": GITHUB,
                "aud": audience,
                "sub": EVAL_SUB,
                "repository": "acme/evals",
                "repository_owner_id": "42",
                "ref": "refs/heads/main",
                "job_workflow_ref": EVAL_WORKFLOW,
                "jti": uuid.uuid4().hex,
                "iat": now,
                "nbf": now,
                "exp": now + 300,
            }
            token = (
                state.mint(audience)
                if state.mint
                else jwt.encode(claims, github_key, algorithm="RS256", headers={"kid": "gh-1"})
            )
            state.issued.append(token)
            body = json.dumps({"count": 1, "value": token}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": SERVE_POLL_S}, daemon=True
    )
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/_apis/token?api-version=2.0"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass
class Run:
    code: int
    log: str
    """stdout and stderr as the runner's log has them (one stream)."""
    env: dict[str, str]
    outputs: dict[str, str]


def read_runner_file(path: Path) -> dict[str, str]:
    """``NAME=value`` and ``NAME<<DELIMITER`` blocks, parsed as the runner parses them."""
    values: dict[str, str] = {}
    lines = path.read_text().split("\n") if path.exists() else []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line:
            continue
        eq, here = line.find("="), line.find("<<")
        if eq >= 0 and (here < 0 or eq < here):
            values[line[:eq]] = line[eq + 1 :]
            continue
        assert here > 0, f"not a runner file line: {line!r}"
        name, delimiter, body = line[:here], line[here + 2 :], []
        while lines[i] != delimiter:  # IndexError: an unterminated block
            body.append(lines[i])
            i += 1
        i += 1
        values[name] = "\n".join(body)
    return values


def expand(text: str, contexts: dict[str, dict[str, str]]) -> str:
    """``${{ context.name }}`` replaced by its value, textually, as the runner does before a
    script runs (which is why an input must never appear in a script's text)."""

    def value(m: re.Match[str]) -> str:
        context, name = m.group(1), m.group(2)
        if context == "steps":
            step, _, output = name.partition(".outputs.")
            return contexts["steps"].get(f"{step}.{output}", "")
        assert name in contexts[context], f"unknown expression {m.group(0)}"
        return contexts[context][name]

    return EXPRESSION.sub(value, text)


def run_action(tmp_path: Path, runner: Runner, **inputs: str) -> Run:
    """Every step of action.yml in order, as a GitHub runner runs a composite action."""
    action = yaml.safe_load(ACTION.read_text())
    given = {name: spec.get("default", "") for name, spec in action["inputs"].items()}
    unknown = set(inputs) - set(given)
    assert not unknown, f"action.yml has no inputs {unknown}"
    given.update(inputs)
    for name, spec in action["inputs"].items():
        assert given[name] or not spec.get("required"), f"input {name} is required"
    work = tmp_path / "runner"
    temp = work / "temp"
    temp.mkdir(parents=True, exist_ok=True)
    github_env = work / "github_env"
    github_env.touch()
    contexts: dict[str, dict[str, str]] = {
        "inputs": given,
        "github": {"action_path": str(ROOT)},
        "steps": {},
    }
    base = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "RUNNER_TEMP": str(temp),
        "GITHUB_ACTIONS": "true",
        "GITHUB_ENV": str(github_env),
        "GITHUB_ACTION_PATH": str(ROOT),
        "ACTIONS_ID_TOKEN_REQUEST_URL": runner.url,
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": RUNNER_BEARER,
    }
    log, code = [], 0
    for n, step in enumerate(action["runs"]["steps"]):
        assert step.get("shell") == "bash", "every step says its shell"
        script = work / f"step-{n}.sh"
        script.write_text(expand(step["run"], contexts))
        output = work / f"step-{n}-output"
        output.touch()
        env = {**base, **read_runner_file(github_env), "GITHUB_OUTPUT": str(output)}
        env.update({k: expand(str(v), contexts) for k, v in step.get("env", {}).items()})
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            check=False,
            env=env,
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
        log.append(done.stdout)
        for name, value in read_runner_file(output).items():
            contexts["steps"][f"{step.get('id', n)}.{name}"] = value
        if done.returncode != 0:
            code = done.returncode
            break
    outputs = {name: expand(spec["value"], contexts) for name, spec in action["outputs"].items()}
    return Run(code, "".join(log), read_runner_file(github_env), outputs)


def assert_masked_first(log: str, secret: str) -> None:
    """The first log line that holds ``secret`` is its own ``::add-mask::``."""
    lines = log.splitlines()
    holding = [i for i, line in enumerate(lines) if secret in line]
    assert holding, "the secret never reached the log, not even as a mask"
    assert lines[holding[0]] == f"::add-mask::{secret}", f"line {holding[0]} shows it unmasked"
