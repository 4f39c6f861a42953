"""A small HTTP client for the broker's API (used by the CLI)."""

from broker.client.http import BrokerClient, ClientError

__all__ = ["BrokerClient", "ClientError"]
