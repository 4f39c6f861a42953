"""The vault backend against OpenBao as it is deployed: not in dev mode, but with integrated
storage (raft) on disk, initialised and unsealed, and a file audit device. The other vault tests
use the dev server; this one shows that nothing the backend does depends on dev mode, and it is
the server `bench/bench_vault.py` measures against."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.backends.vault import BROKER_MARKER, StaticToken, VaultBackend, plan_vault
from tests.backends.vault.conftest import (
    EXAMPLE_CONFIG,
    apply_plan,
    broker_token,
    example_policy,
    make_grant,
)
from tests.servers import require_bao, run_openbao_raft

pytestmark = pytest.mark.integration


def test_issue_and_revoke_on_openbao_with_integrated_storage(tmp_path: Path) -> None:
    with run_openbao_raft(require_bao(), tmp_path) as bao:
        assert bao.root.sys.read_health_status(method="GET")["sealed"] is False
        assert (tmp_path / "raft" / "raft" / "raft.db").is_file(), "storage is not on disk"
        policy = example_policy()
        plan = plan_vault(policy.policy, EXAMPLE_CONFIG)
        apply_plan(bao.root, plan)
        token = broker_token(bao.root, plan, 600)
        backend = VaultBackend(bao.url, StaticToken(token), policy, config=plan.config)
        try:
            grant = make_grant()
            cred = backend.issue(grant)
            info = bao.client(cred.access_token).auth.token.lookup_self()["data"]
            assert info["accessor"] == cred.credential_ref
            assert info["role"] == plan.token_role.name
            assert info["meta"]["grant_id"] == grant.id
            assert info["meta"]["broker"] == BROKER_MARKER
            created = [  # what Vault's own audit log says it handed out
                e["response"]["auth"]
                for e in bao.audit_entries()
                if e["type"] == "response"
                and e["request"]["path"] == f"auth/token/create/{plan.token_role.name}"
            ]
            assert [a["accessor"] for a in created] == [cred.credential_ref]
            assert created[0]["metadata"]["grant_id"] == grant.id

            assert backend.revoke(grant, cred.credential_ref) is True
            assert not bao.token_works(cred.access_token)
        finally:
            backend.close()
