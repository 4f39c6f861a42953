"""The broker's client side: the HTTP API client (used by the CLI and the agent) and
:func:`credentials`, one call for training code that returns a typed, refreshed credential."""

from broker.client.credentials import (
    AwsCredentials,
    BrokerJWT,
    Credential,
    DatabaseLogin,
    Provider,
    VaultToken,
    credentials,
)
from broker.client.http import BrokerClient, ClientError
from broker.client.sources import find_source

__all__ = [
    "AwsCredentials",
    "BrokerClient",
    "BrokerJWT",
    "ClientError",
    "Credential",
    "DatabaseLogin",
    "Provider",
    "VaultToken",
    "credentials",
    "find_source",
]
