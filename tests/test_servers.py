"""``require``: a test whose part of the machine is missing skips, except under ``CI=true``,
where it fails with the same reason: the helper itself, then real tests run as CI runs them, in
a subprocess with a part hidden."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import CI_OPTIONAL, Part, require, unavailable

ROOT = Path(__file__).resolve().parents[1]


def pytest_run(*args: str, ci: bool, **env: str) -> tuple[int, str]:
    """pytest ``args`` in a subprocess from the repository root, with or without ``CI=true``."""
    full = {k: v for k, v in os.environ.items() if k not in ("CI", CI_OPTIONAL)}
    full.update(env, PYTHONPATH=str(ROOT))
    if ci:
        full["CI"] = "true"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
def ci(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv(CI_OPTIONAL, raising=False)
    return monkeypatch


def test_a_missing_part_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"^bao is not here$"):
        require(Part.OPENBAO, "bao is not here")
    require(Part.OPENBAO, None)  # present: nothing happens


def test_a_missing_part_fails_in_ci_with_the_reason(ci: pytest.MonkeyPatch) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"^bao is not here \(CI=true: openbao must"):
        require(Part.OPENBAO, "bao is not here")
    require(Part.OPENBAO, None)


def test_ci_may_excuse_a_part_by_name(ci: pytest.MonkeyPatch) -> None:
    ci.setenv(CI_OPTIONAL, "terraform, openbao")
    with pytest.raises(pytest.skip.Exception):
        unavailable(Part.OPENBAO, "bao is not here")
    with pytest.raises(pytest.fail.Exception):
        unavailable(Part.POSTGRESQL, "no initdb")


def test_missing_rfc6962_vectors_fail_the_real_tests_in_ci(tmp_path: Path) -> None:
    """The Merkle tests as they are, with BROKER_SHARED_DIR pointing at an empty folder."""
    selection = ("tests/audit/test_merkle.py", "-k", "vector")
    code, output = pytest_run(*selection, ci=True, BROKER_SHARED_DIR=str(tmp_path))
    assert code == 1 and "3 failed" in output, output
    assert f"RFC 6962 proof vectors not found at {tmp_path}" in output


def test_a_hidden_terraform_fails_the_real_test_in_ci() -> None:
    """terraform's fmt check with a PATH that has no terraform on it."""
    hidden = os.pathsep.join(
        d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "terraform").exists()
    )
    selection = ("tests/backends/vault/test_terraform.py", "-k", "fmt")
    code, output = pytest_run(*selection, ci=True, PATH=hidden)
    assert code == 1 and "1 failed" in output and "terraform is not installed" in output, output
