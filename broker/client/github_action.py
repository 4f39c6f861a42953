"""The GitHub Action's step (``action.yml`` at the repository root): the runner's OIDC token
exchanged for a credential, every secret masked, the credential exported to later steps.

Run as ``python -m broker.client.github_action`` with the inputs in ``INPUT_*`` variables (the
action passes them through ``env:``, never into the script's text). In this order:

1. the runner's OIDC token is requested for ``INPUT_AUDIENCE`` and masked (``::add-mask::``);
2. it is exchanged; every secret of the answer is masked before anything else is printed;
3. the credential's variables (those of ``broker agent --format env``) are appended to
   ``$GITHUB_ENV``, and ``grant-id``, ``expires-at``, ``issued-token-type`` to
   ``$GITHUB_OUTPUT``, each in the multi-line-safe ``NAME<<DELIMITER`` form.

NOTE: lean like the rest of :mod:`broker.client`: httpx and the standard library only.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TextIO

from broker.client.credentials import TOKEN_TYPES, Credential, Provider
from broker.client.http import BrokerClient, ClientError, url_problem
from broker.client.sources import DEFAULT_OIDC_AUDIENCE, github_actions_source
from broker.durations import parse_duration

EXIT_OK, EXIT_FAILED = 0, 1


class ActionError(Exception):
    """An input is wrong, or the runner's files are missing: said as a workflow error."""


def _escape(text: str) -> str:
    """A workflow command's data, escaped as the runner's toolkit does (``escapeData``)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def mask(values: Iterable[str], out: TextIO) -> None:
    """``::add-mask::`` each value, and each line of a multi-line one (the runner masks line by
    line in its logs)."""
    for value in values:
        for part in {value, *value.splitlines()}:
            if part.strip():
                out.write(f"::add-mask::{_escape(part)}\n")
    out.flush()


def heredoc(values: Mapping[str, str]) -> str:
    """``NAME<<DELIMITER`` / value / ``DELIMITER`` blocks, as ``$GITHUB_ENV`` and
    ``$GITHUB_OUTPUT`` read them; each delimiter is random and appears in no value."""
    blocks = []
    for name, value in values.items():
        delimiter = f"ghadelimiter_{secrets.token_hex(16)}"
        while delimiter in value:  # pragma: no cover (2**-128)
            delimiter = f"ghadelimiter_{secrets.token_hex(16)}"
        blocks.append(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")
    return "".join(blocks)


def _append(variable: str, text: str) -> None:
    path = os.environ.get(variable)
    if not path:
        raise ActionError(f"${variable} is not set: run this as a step of a GitHub Actions job")
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(text)


def _input(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(f"INPUT_{name.upper().replace('-', '_')}", "").strip()
    return value or default


def _required(name: str) -> str:
    value = _input(name)
    if not value:
        raise ActionError(f"input {name} is required")
    return value


def provider_from_inputs() -> Provider:
    """The exchange the action's inputs describe. Raises ActionError naming the input."""
    url = _required("broker-url")
    if url_problem(url):
        raise ActionError(f"input broker-url: {url_problem(url)}")
    backend = _input("backend", "jwt") or "jwt"
    if backend not in TOKEN_TYPES:
        raise ActionError(f"input backend: expected one of {', '.join(TOKEN_TYPES)}")
    ttl = _input("ttl")
    try:
        requested_ttl = parse_duration(int(ttl) if ttl and ttl.isdigit() else ttl) if ttl else None
    except ValueError as exc:
        raise ActionError(f"input ttl: {exc}") from None
    return Provider(
        BrokerClient(url),
        github_actions_source(_input("audience", DEFAULT_OIDC_AUDIENCE) or DEFAULT_OIDC_AUDIENCE),
        model=_required("model"),
        action=_required("action"),
        backend=backend,
        audience=_input("jwt-audience"),
        requested_ttl=requested_ttl,
        reason=_input("reason"),
    )


def run(out: TextIO = sys.stdout) -> Credential:
    """The action's work (module docstring). Raises ActionError, ClientError (the broker
    refused or is unreachable), ValueError (the runner's OIDC endpoint)."""
    provider = provider_from_inputs()
    if not os.environ.get("GITHUB_ENV") or not os.environ.get("GITHUB_OUTPUT"):
        raise ActionError("$GITHUB_ENV and $GITHUB_OUTPUT are not set: run this in a job's step")
    oidc = provider.source
    token = oidc()
    mask([token], out)  # NOTE: the runner's OIDC token is a secret too (actions/toolkit masks it)
    provider.source = lambda: token
    credential, _ = provider.exchange(_input("approval-id"))
    mask(credential.secrets(), out)  # NOTE: before anything else about the credential prints
    variables = credential.env()
    _append("GITHUB_ENV", heredoc(variables))
    _append(
        "GITHUB_OUTPUT",
        heredoc(
            {
                "grant-id": credential.grant_id,
                "expires-at": variables["BROKER_EXPIRES_AT"],
                "issued-token-type": credential.issued_token_type,
            }
        ),
    )
    out.write(
        f"model-broker: {credential!r} for {provider.action} on {provider.model}; "
        f"exported {', '.join(variables)}\n"
    )
    return credential


def main() -> int:
    try:
        run()
    except ActionError as exc:
        print(f"::error title=model-broker::{_escape(str(exc))}")
        return EXIT_FAILED
    except ClientError as exc:
        hint = ""
        if exc.code == "approval_required" and exc.fields.get("approval_id"):
            approval = exc.fields["approval_id"]
            hint = f" (request {approval}: broker approvals show {approval}; re-run once approved)"
        print(f"::error title=model-broker::{_escape(f'{exc.code}: {exc.description}{hint}')}")
        return EXIT_FAILED
    except (ValueError, OSError) as exc:
        print(f"::error title=model-broker::{_escape(str(exc))}")
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
