"""The client address of a request: X-Forwarded-For only from trusted proxies."""

from __future__ import annotations

import pytest

from broker.api import clients
from broker.api.clients import ClientAddresses, parse_networks
from broker.errors import ConfigError


def scope(peer: str, forwarded: str | None = None) -> dict[str, object]:
    headers = [] if forwarded is None else [(b"x-forwarded-for", forwarded.encode())]
    return {"client": (peer, 1234), "headers": headers}


TRUSTED = ClientAddresses(parse_networks("127.0.0.1, 10.0.0.0/8 fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("192.0.2.1", None, "192.0.2.1"),
        ("192.0.2.1", "198.51.100.7", "192.0.2.1"),  # not a trusted proxy: header ignored
        ("127.0.0.1", "198.51.100.7", "198.51.100.7"),
        ("127.0.0.1", "198.51.100.7, 10.1.1.1", "198.51.100.7"),  # a chain of our proxies
        ("127.0.0.1", "6.6.6.6, 198.51.100.7, 10.1.1.1", "198.51.100.7"),  # spoofed left part
        ("127.0.0.1", "198.51.100.7, junk", "127.0.0.1"),  # a bad hop ends the walk
        ("127.0.0.1", "10.2.2.2, 10.1.1.1", "10.2.2.2"),  # all ours: the leftmost
        ("127.0.0.1", None, "127.0.0.1"),
        ("2001:db8:1:2:3:4:5:6", None, "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.9", None, "192.0.2.9"),
        ("testclient", None, "unknown"),
    ],
)
def test_client_address(peer: str, forwarded: str | None, client: str) -> None:
    assert TRUSTED.of(scope(peer, forwarded)) == client


def test_without_trusted_proxies_the_header_is_never_read() -> None:
    assert ClientAddresses().of(scope("127.0.0.1", "198.51.100.7")) == "127.0.0.1"


def test_a_bad_trusted_proxy_setting_names_the_entry() -> None:
    with pytest.raises(ConfigError, match=r"'10\.0\.0\.300' is not an IP address or network"):
        parse_networks("127.0.0.1,10.0.0.300")


def test_a_remembered_peer_answers_the_same_and_a_trusted_proxy_is_never_remembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    addresses = ClientAddresses(parse_networks("127.0.0.1"))
    for forwarded in ("198.51.100.7", "203.0.113.5", None):  # a proxy: each header counts
        assert addresses.of(scope("127.0.0.1", forwarded)) == (forwarded or "127.0.0.1")
        assert addresses.of(scope("192.0.2.1", forwarded)) == "192.0.2.1"
    monkeypatch.setattr(clients, "MAX_REMEMBERED_PEERS", 3)
    for n in range(10):  # however many peers ask, a bounded number is kept
        assert addresses.of(scope(f"192.0.2.{n}")) == f"192.0.2.{n}"
        assert len(addresses._peers) <= 3
