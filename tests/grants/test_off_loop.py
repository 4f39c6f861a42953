"""What of an exchange the API's event loop runs itself (SQLite, ``broker.api.token.exchange``):
the steps up to their first OFF_LOOP, and what follows each commit. Nothing that may block
runs there: no store transaction or read, no backend's network call, no key fetch. A tripwire
fails the test when one runs while the steps are driven "on the loop"."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.backends.base import TOKEN_TYPE_JWT, TOKEN_TYPE_VAULT, BackendRegistry
from broker.errors import ApprovalRequired, BrokerError, IdentityRejected
from broker.grants.service import ExchangeRequest
from broker.identity.verifier import KeysNotReady
from broker.runtime import Broker, build_broker
from broker.settings import Settings
from broker.store.db import Finished, OffLoop, advance, advance_in_thread
from tests.conftest import eval_token
from tests.grants.support import FakeBackend
from tests.vendor import VENDOR_SUB, vendor_policy

TRAINER = "system:serviceaccount:training:trainer"


class Tripwire:
    """Wraps what may block; fails when it runs while ``on_loop`` is set."""

    def __init__(self) -> None:
        self.on_loop = False
        self.tripped: list[str] = []

    def guard(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.on_loop:
                self.tripped.append(name)
            return fn(*args, **kwargs)

        return guarded

    @contextlib.contextmanager
    def loop(self) -> Iterator[None]:
        self.on_loop = True
        try:
            yield
        finally:
            self.on_loop = False


@pytest.fixture
def wire(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> Tripwire:
    return tripwire(broker, monkeypatch)


def tripwire(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> Tripwire:
    """A Tripwire around ``broker``'s store, and its key lookups that would fetch or read."""
    wire = Tripwire()
    store = broker.grants.store
    for name in ("read", "write", "transaction"):
        monkeypatch.setattr(store, name, wire.guard(f"store.{name}", getattr(store, name)))
    keys = broker.grants.verifier._keys
    key_for = keys.key_for

    def looked_up(issuer: Any, kid: str | None, *, offline: bool = False) -> Any:
        if wire.on_loop and not offline:  # it could fetch or read
            wire.tripped.append("key_for")
        return key_for(issuer, kid, offline=offline)

    monkeypatch.setattr(keys, "key_for", looked_up)
    return wire


@pytest.fixture
def fake(broker: Broker, wire: Tripwire) -> FakeBackend:
    """A fake external backend in the place of vault, its calls behind the tripwire."""
    fake = FakeBackend()
    fake.issue = wire.guard("backend.issue", fake.issue)  # type: ignore[method-assign]
    broker.grants.backends = BackendRegistry(
        {"jwt": broker.grants.backends.get("jwt"), "vault": fake}
    )
    return fake


def like_the_api(broker: Broker, wire: Tripwire, req: ExchangeRequest) -> tuple[Any, int]:
    """Drive the steps as the API does on SQLite: on the loop, in a thread from each OFF_LOOP
    to the next write; each write committed. Returns the result (or the error) and how many
    times the steps asked to leave the loop."""
    grants = broker.grants
    steps = grants.exchange_steps(req)
    hops = 0
    try:
        with wire.loop():
            step = advance(steps)
        while not isinstance(step, Finished):
            if isinstance(step, OffLoop):
                hops += 1
                step = advance_in_thread(steps)
                continue
            error: Exception | None = None
            try:
                grants._writes.run(step)
            except Exception as exc:
                error = exc
            with wire.loop():
                step = advance(steps, error)
    except Exception as exc:
        return exc, hops
    return step.value, hops


def test_the_common_exchange_runs_on_the_loop_without_blocking(
    broker: Broker, wire: Tripwire
) -> None:
    req = ExchangeRequest(eval_token(broker), "llama-7b", "evaluate", TOKEN_TYPE_JWT)
    result, hops = like_the_api(broker, wire, req)
    assert hops == 0 and wire.tripped == []
    assert broker.grants.get(result.grant.id).id == result.grant.id


def test_a_refusal_is_recorded_from_the_loop_without_blocking(
    broker: Broker, wire: Tripwire
) -> None:
    req = ExchangeRequest(eval_token(broker), "llama-7b", "deploy", TOKEN_TYPE_JWT)
    error, hops = like_the_api(broker, wire, req)
    assert isinstance(error, BrokerError) and error.fields["audit_index"] is not None
    assert hops == 0 and wire.tripped == []


def test_an_action_that_needs_approval_leaves_the_loop_before_the_store(
    broker: Broker, wire: Tripwire
) -> None:
    assert broker.dev_issuer is not None
    token = broker.dev_issuer.mint(sub=TRAINER, claims={"kubernetes.io": {"namespace": "training"}})
    lineage = json.dumps({"datasets": ["s3://datasets/approved/a"]})
    req = ExchangeRequest(token, "llama-7b", "fine-tune", TOKEN_TYPE_JWT, lineage=lineage)
    error, hops = like_the_api(broker, wire, req)
    assert isinstance(error, ApprovalRequired) and error.fields["approval_id"]
    assert hops == 1 and wire.tripped == []  # the approval was opened off the loop


def test_an_external_backend_is_called_off_the_loop(
    broker: Broker, wire: Tripwire, fake: FakeBackend
) -> None:
    req = ExchangeRequest(eval_token(broker), "llama-7b", "evaluate", TOKEN_TYPE_VAULT)
    result, hops = like_the_api(broker, wire, req)
    assert hops == 1 and wire.tripped == []
    assert fake.live == {result.grant.id: result.credential.credential_ref}


def test_keys_that_need_a_fetch_are_fetched_off_the_loop(
    broker: Broker, wire: Tripwire, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verifier asked not to fetch says so (KeysNotReady) before any key lookup; the steps
    then leave the loop and verify there."""
    keys = broker.grants.verifier._keys
    key_for = keys.key_for  # the tripwire's

    def not_ready(issuer: Any, kid: str | None, *, offline: bool = False) -> Any:
        if offline:
            raise KeysNotReady
        return key_for(issuer, kid)

    monkeypatch.setattr(keys, "key_for", not_ready)
    token = eval_token(broker)
    with pytest.raises(KeysNotReady):
        broker.grants.verifier.verify_workload(token, offline=True)
    with pytest.raises(IdentityRejected, match="signature"):  # what is checked before keys
        broker.grants.verifier.verify_workload(token[:-8] + "AAAAAAAA", offline=False)
    result, hops = like_the_api(
        broker, wire, ExchangeRequest(token, "llama-7b", "evaluate", TOKEN_TYPE_JWT)
    )
    assert hops == 1 and wire.tripped == []
    assert result.grant.model == "llama-7b"


def test_break_glass_leaves_the_loop_before_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An emergency use reads its per-identity count and records its review in the store."""
    policy = vendor_policy(tmp_path)
    broker = build_broker(Settings(dev=True, data_dir=tmp_path / "d", policy=policy))
    try:
        wire = tripwire(broker, monkeypatch)
        assert broker.dev_issuer is not None
        req = ExchangeRequest(
            broker.dev_issuer.mint(sub=VENDOR_SUB),
            "vendor-llm",
            "hotfix",
            TOKEN_TYPE_JWT,
            reason="INC-1: the serving weights are corrupt",
            emergency=True,
        )
        result, hops = like_the_api(broker, wire, req)
        assert result.emergency is not None and result.emergency["approval_id"]
        assert hops == 1 and wire.tripped == []
    finally:
        broker.close()


def test_the_signing_keys_refresh_leaves_the_loop(broker: Broker, wire: Tripwire) -> None:
    """Every REFRESH_S the jwt backend reads the store for the keys' generation first: that
    exchange leaves the loop; the next one, with the keys just checked, stays on it."""
    ring = broker.keys
    ring._checked = float("-inf")  # due, as REFRESH_S after the last check
    assert ring.due()
    req = ExchangeRequest(eval_token(broker), "llama-7b", "evaluate", TOKEN_TYPE_JWT)
    result, hops = like_the_api(broker, wire, req)
    assert hops == 1 and wire.tripped == [] and not ring.due()
    assert result.grant.model == "llama-7b"
    again = ExchangeRequest(eval_token(broker), "llama-7b", "evaluate", TOKEN_TYPE_JWT)
    assert like_the_api(broker, wire, again)[1] == 0
