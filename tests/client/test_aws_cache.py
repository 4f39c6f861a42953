"""The credential_process cache: reused until shortly before expiry, one entry per key, and
trusted only when private to this user."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

from broker.client.aws_cache import REUSE_MARGIN, CredentialProcessCache, cache_key

NOW = dt.datetime(2030, 1, 1, 12, tzinfo=dt.UTC)


def answer(expires: dt.datetime) -> str:
    stamp = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    return json.dumps({"Version": 1, "AccessKeyId": "ASIA1", "Expiration": stamp})


def test_reused_until_the_margin_before_expiry(tmp_path: Path) -> None:
    cache = CredentialProcessCache(tmp_path / "c")
    key = cache_key("http://b", None, "llama-7b", "evaluate", "/t", None)
    text = answer(NOW + dt.timedelta(hours=1))
    cache.put(key, text)
    assert cache.get(key, NOW) == text
    assert cache.get(key, NOW + dt.timedelta(hours=1) - REUSE_MARGIN - dt.timedelta(seconds=1))
    assert cache.get(key, NOW + dt.timedelta(hours=1) - REUSE_MARGIN) is None
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o700


def test_keys_differ_by_every_part() -> None:
    parts = ["http://b", "prof", "llama-7b", "evaluate", "/t", "3600"]
    keys = {cache_key(*parts)}
    for i in range(len(parts)):
        keys.add(cache_key(*[p if j != i else p + "x" for j, p in enumerate(parts)]))
    assert len(keys) == len(parts) + 1


def test_a_cache_others_can_reach_is_not_trusted(tmp_path: Path) -> None:
    cache = CredentialProcessCache(tmp_path / "c")
    cache.put("k", answer(NOW + dt.timedelta(hours=1)))
    (tmp_path / "c").chmod(0o755)
    assert cache.get("k", NOW) is None
    (tmp_path / "c").chmod(0o700)
    assert cache.get("k", NOW) is not None
    (tmp_path / "c" / "k.json").write_text("not json")
    assert cache.get("k", NOW) is None
