"""Every CLI command that sends the caller's own bearer token: with a person who lacks the role,
it exits 1 and says which role is needed (the broker's 403), without printing the token.

``GATED`` names each such command; a command that takes ``--bearer-file`` and is in neither
``GATED`` nor ``ANY_PERSON`` fails ``test_every_bearer_command_is_in_the_table``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from broker.cli.main import build_parser, main
from broker.runtime import Broker
from tests.conftest import LiveServer, eval_token, exchange_form, person_token


@dataclass(frozen=True)
class Gated:
    argv: tuple[str, ...]
    """The command line; ``{grant}`` and ``{approval}`` name a real grant and request,
    ``{tmp}`` the test's own temporary directory."""
    caller_roles: tuple[str, ...]
    """The person who runs it: roles that do not include the one needed."""
    needs: str
    """How the refusal names the roles needed."""


GATED: dict[tuple[str, ...], Gated] = {
    ("grants", "list"): Gated(("grants", "list"), ("approver",), "needs role auditor or admin"),
    ("grants", "show"): Gated(
        ("grants", "show", "{grant}"), ("approver",), "needs role auditor or admin"
    ),
    ("grants", "revoke"): Gated(
        ("grants", "revoke", "{grant}", "--reason", "x"), ("auditor",), "needs role admin"
    ),
    ("revoke",): Gated(
        ("revoke", "--model", "llama-7b", "--reason", "x"), ("auditor",), "needs role admin"
    ),
    ("keys", "rotate"): Gated(("keys", "rotate"), ("auditor", "approver"), "needs role admin"),
    ("approvals", "list"): Gated(
        ("approvals", "list"), (), "needs role approver or auditor or admin"
    ),
    ("approvals", "show"): Gated(
        ("approvals", "show", "{approval}"), (), "needs role approver or auditor or admin"
    ),
    ("approvals", "approve"): Gated(
        ("approvals", "approve", "{approval}", "--reason", "x"),
        ("auditor", "admin"),
        "needs role approver",
    ),
    ("approvals", "deny"): Gated(
        ("approvals", "deny", "{approval}", "--reason", "x"),
        ("auditor", "admin"),
        "needs role approver",
    ),
    ("lineage",): Gated(("lineage", "llama-7b"), (), "needs role approver or auditor or admin"),
    ("approvals", "wait"): Gated(
        ("approvals", "wait", "{approval}", "--timeout", "0"),
        (),
        "needs role approver or auditor or admin",
    ),
    ("audit", "monitor"): Gated(
        ("audit", "monitor", "--state", "{tmp}/monitor.state", "--once"),
        ("approver",),
        "needs role auditor or admin",
    ),
    ("rollback-tests", "list"): Gated(
        ("rollback-tests", "list", "--model", "llama-7b"),
        (),
        "needs role approver or auditor or admin",
    ),
}
ANY_PERSON = {("token", "introspect")}  # any person or workload may introspect (docs/api.md)


def bearer_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """The command paths (``("grants", "list")``, ...) whose parser takes ``--bearer-file``."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs and "--bearer-file" in parser._option_string_actions:
        yield path
    for action in subs:
        for name, child in action.choices.items():
            yield from bearer_commands(child, (*path, name))


def test_every_bearer_command_is_in_the_table() -> None:
    found = set(bearer_commands(build_parser()))
    assert len(found) > 5  # the walk reached the subcommands
    assert found == GATED.keys() | ANY_PERSON


@pytest.mark.parametrize("command", sorted(GATED), ids=" ".join)
def test_command_without_the_role_exits_1_naming_it(
    command: tuple[str, ...],
    live_broker: tuple[LiveServer, Broker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, broker = live_broker
    monkeypatch.delenv("BROKER_TOKEN", raising=False)
    grant, approval = _grant_and_approval(server, broker)
    gated = GATED[command]
    token = person_token(broker, *gated.caller_roles)
    bearer = tmp_path / "bearer.jwt"
    bearer.write_text(token)
    argv = [a.format(grant=grant, approval=approval, tmp=tmp_path) for a in gated.argv]

    code = main([*argv, "--bearer-file", str(bearer), "--url", server.url])
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    assert gated.needs in err  # the broker's 403 description, whatever the CLI wraps it in
    assert token not in out + err


def _grant_and_approval(server: LiveServer, broker: Broker) -> tuple[str, str]:
    assert broker.dev_issuer is not None
    trainer = broker.dev_issuer.mint(
        sub="system:serviceaccount:training:trainer",
        claims={"kubernetes.io": {"namespace": "training"}},
    )
    with httpx.Client(base_url=server.url, trust_env=False) as http:
        issued = http.post("/v1/token", data=exchange_form(eval_token(broker)))
        opened = http.post(
            "/v1/approvals",
            json={
                "model": "llama-7b",
                "action": "fine-tune",
                "lineage": {"datasets": ["s3://datasets/approved/set-1"]},
            },
            headers={"Authorization": f"Bearer {trainer}"},
        )
    assert issued.status_code == 200 and opened.status_code == 201, (issued.text, opened.text)
    return str(issued.json()["grant_id"]), str(opened.json()["id"])
