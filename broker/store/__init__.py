"""Persistence: tables, migrations and transactions."""

from broker.store.db import Store, sqlite_url

__all__ = ["Store", "sqlite_url"]
