"""Where the agent puts a credential: one file, replaced atomically, mode 0600."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

from broker.client.credentials import (
    AwsCredentials,
    BrokerJWT,
    Credential,
    VaultToken,
    env_lines,
)
from broker.client.files import write_private


class SinkError(Exception):
    """The credential cannot be written in the sink's format (e.g. a database login as a
    bare token)."""


def _json(c: Credential) -> str:
    return json.dumps(c.fields(), indent=2, sort_keys=True) + "\n"


def _token(c: Credential) -> str:
    if not isinstance(c, BrokerJWT | VaultToken):
        raise SinkError(
            f"--format token holds one token, and a {type(c).__name__} has several parts: "
            "use --format json or env"
        )
    return c.token + "\n"


def _vault_token(c: Credential) -> str:
    if not isinstance(c, VaultToken):
        raise SinkError(f"--format vault-token needs a Vault token, not a {type(c).__name__}")
    return c.token + "\n"


def _aws_credentials(c: Credential) -> str:
    if not isinstance(c, AwsCredentials):
        raise SinkError(f"--format aws-credentials needs AWS credentials, not a {type(c).__name__}")
    return (
        "[default]\n"
        f"aws_access_key_id = {c.access_key_id}\n"
        f"aws_secret_access_key = {c.secret_access_key}\n"
        f"aws_session_token = {c.session_token}\n"
    )


FORMATS: dict[str, Callable[[Credential], str]] = {
    "json": _json,
    "env": env_lines,
    "token": _token,
    "vault-token": _vault_token,
    "aws-credentials": _aws_credentials,
}
BACKEND_OF_FORMAT = {"vault-token": "vault", "aws-credentials": "aws"}
"""Formats that only one backend's credentials fit (checked before the first exchange)."""


class Sink:
    """A file that always holds a whole credential or none: each write goes to a new file
    (mode 0600 from its creation) in the same directory, then replaces the sink."""

    def __init__(self, path: Path, fmt: str) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        self.path, self.format = path, fmt

    def render(self, credential: Credential) -> str:
        """Raises SinkError when the credential does not fit the format."""
        return FORMATS[self.format](credential)

    def write(self, credential: Credential) -> None:
        """Raises SinkError (the format) or OSError (the file)."""
        write_private(self.path, self.render(credential))

    def remove(self) -> None:
        """No credential rather than an expired one."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
