"""Integration tests share the session's OpenBao server (tests/conftest.py)."""

from __future__ import annotations

import hvac
import pytest

from tests.servers import OpenBao


@pytest.fixture(scope="session")
def openbao(openbao_server: OpenBao) -> hvac.Client:
    """A root client of the session's OpenBao dev server (each test mounts what it needs at a
    path of its own)."""
    return openbao_server.root
