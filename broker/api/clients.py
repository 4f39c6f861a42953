"""Who is asking: the client address of a request, believing ``X-Forwarded-For`` only from
the configured trusted proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import Scope

from broker.errors import ConfigError

IPV6_PREFIX = 64
"""IPv6 clients are counted per /64: one host usually holds a whole /64, so a finer key would
let it spread its attempts over 2^64 addresses."""
UNKNOWN = "unknown"
MAX_REMEMBERED_PEERS = 4096
"""Peers whose key :meth:`ClientAddresses.of` keeps (forgotten all at once when full)."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """``BROKER_TRUSTED_PROXIES``: addresses or CIDR networks separated by commas or spaces.
    Raises ConfigError naming the entry that is neither."""
    networks = []
    for entry in text.replace(",", " ").split():
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ConfigError(
                f"BROKER_TRUSTED_PROXIES: {entry!r} is not an IP address or network"
            ) from None
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/{IPV6_PREFIX}", strict=False))
    return str(address)


class ClientAddresses:
    """Maps a request to the key of its client (an IPv4 address or an IPv6 /64)."""

    def __init__(self, trusted_proxies: Iterable[Network] = ()) -> None:
        self.trusted = tuple(trusted_proxies)
        self._peers: dict[str, str] = {}
        """Keys of peers that are not trusted proxies (theirs depends on nothing else).
        NOTE: every exchange asks (its refusal budget): parsing the address costs 5 µs."""

    def _is_trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self.trusted)

    def of(self, scope: Scope) -> str:
        """The client of an ASGI request.

        NOTE: ``X-Forwarded-For`` is read only when the peer is a trusted proxy, right to left
        (each proxy appends the address it saw); the first hop that is not a trusted proxy is
        the client. A hop that is not an address ends the walk at the proxy that added it."""
        host = (scope.get("client") or (UNKNOWN, 0))[0]
        known = self._peers.get(host)
        if known is not None:
            return known
        peer = _address(host)
        if peer is None:
            return UNKNOWN
        if not self.trusted or not self._is_trusted(peer):
            key = _key(peer)
            if len(self._peers) >= MAX_REMEMBERED_PEERS:
                self._peers.clear()
            self._peers[host] = key
            return key
        hops = [
            hop
            for name, value in scope.get("headers", ())
            if name == b"x-forwarded-for"
            for hop in value.decode("latin-1").split(",")
        ]
        client = peer
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                break
            client = address
            if not self._is_trusted(address):
                break
        return _key(client)
