"""Credential backends behind one Protocol, chosen by name from a registry."""

from broker.backends.base import Backend, BackendRegistry, Credential

__all__ = ["Backend", "BackendRegistry", "Credential"]
