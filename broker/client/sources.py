"""Where a job's workload identity token comes from, read again before every exchange.

- a file (``BROKER_TOKEN_FILE``): a Kubernetes projected service-account token, which the
  kubelet rewrites in place before it expires;
- GitHub Actions' OIDC endpoint (``ACTIONS_ID_TOKEN_REQUEST_URL`` / ``_TOKEN``, present when the
  job has ``permissions: id-token: write``), asked for a token with the broker's audience;
- an environment variable holding the token (GitLab CI's ``id_tokens``).

NOTE: lean like :mod:`broker.client.http`. Error messages name the source, never its token.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import httpx

TokenSource = Callable[[], str]
"""Returns the current workload token; raises ValueError (or OSError) naming what failed."""

DEFAULT_OIDC_AUDIENCE = "model-broker"
"""The ``aud`` the example policy's issuers expect (``issuers[].audiences``)."""
TOKEN_FILE_ENV = "BROKER_TOKEN_FILE"  # noqa: S105 (a variable's name)
GITHUB_URL_ENV = "ACTIONS_ID_TOKEN_REQUEST_URL"
GITHUB_TOKEN_ENV = "ACTIONS_ID_TOKEN_REQUEST_TOKEN"  # noqa: S105 (a variable's name)


def file_source(path: str | Path) -> TokenSource:
    """The token in ``path``, read at each call."""
    file = Path(path)

    def read() -> str:
        try:
            text = file.read_text().strip()
        except FileNotFoundError:
            raise ValueError(f"token file {file}: no such file") from None
        if not text:
            raise ValueError(f"token file {file} holds no token")
        return text

    return read


def env_source(name: str) -> TokenSource:
    """The token in the environment variable ``name``, read at each call."""

    def read() -> str:
        text = os.environ.get(name, "").strip()
        if not text:
            raise ValueError(f"environment variable {name} holds no token")
        return text

    return read


def github_actions_source(
    audience: str = DEFAULT_OIDC_AUDIENCE, timeout: float = 30.0
) -> TokenSource:
    """A new OIDC token from the GitHub Actions runner at each call, for ``audience``."""

    def request() -> str:
        url, bearer = os.environ.get(GITHUB_URL_ENV), os.environ.get(GITHUB_TOKEN_ENV)
        if not url or not bearer:
            raise ValueError(
                f"{GITHUB_URL_ENV} and {GITHUB_TOKEN_ENV} are not set: "
                "does the job have `permissions: id-token: write`?"
            )
        try:
            resp = httpx.get(
                url,
                params={"audience": audience},
                headers={"Authorization": f"Bearer {bearer}"},
                timeout=timeout,
            )
        except httpx.HTTPError as exc:
            raise ValueError(f"the GitHub Actions OIDC endpoint is unreachable: {exc}") from None
        if resp.status_code != 200:
            raise ValueError(f"the GitHub Actions OIDC endpoint answered {resp.status_code}")
        try:
            value = resp.json()["value"]
        except (ValueError, KeyError, TypeError):
            raise ValueError("the GitHub Actions OIDC endpoint answered without a value") from None
        if not isinstance(value, str) or not value:
            raise ValueError("the GitHub Actions OIDC endpoint answered without a value")
        return value

    return request


def find_source(
    *,
    token_file: str | Path | None = None,
    token_env: str | None = None,
    github_actions: bool | None = None,
    oidc_audience: str | None = None,
) -> TokenSource:
    """The source given, else the first one the environment offers: ``$BROKER_TOKEN_FILE``,
    then the GitHub Actions runner's OIDC endpoint.

    Raises:
        ValueError: more than one source was given, or none was given or found.
    """
    given = [s for s in (token_file, token_env, github_actions or None) if s]
    if len(given) > 1:
        raise ValueError("give one token source: a token file, a token variable or GitHub Actions")
    if token_file:
        return file_source(token_file)
    if token_env:
        return env_source(token_env)
    if github_actions:
        return github_actions_source(oidc_audience or DEFAULT_OIDC_AUDIENCE)
    if os.environ.get(TOKEN_FILE_ENV):
        return file_source(os.environ[TOKEN_FILE_ENV])
    if os.environ.get(GITHUB_URL_ENV):
        return github_actions_source(oidc_audience or DEFAULT_OIDC_AUDIENCE)
    raise ValueError(
        f"no workload token source: give a token file (or set {TOKEN_FILE_ENV}), a token "
        "variable, or run in GitHub Actions with `permissions: id-token: write`"
    )
