"""The HTTP under hvac: what hvac needs of a ``requests.Session``, on urllib3 directly.

hvac builds every Vault request (path, headers, token, namespace) and maps every Vault error
(``hvac.utils.raise_for_error``) itself; it hands the result to its session's ``request``. This
class is that session. NOTE: requests' per-call machinery (preparing the request, merging
cookies, hooks and settings, building its response) cost 0.24 ms of CPU of the 0.66 ms a token
creation took through hvac, in a broker whose throughput is bound by its CPU; see
docs/performance.md. Behaviour kept from the requests session it replaces:

- nothing from the environment: no proxy, no ``.netrc``, no CA bundle from ``REQUESTS_CA_BUNDLE``
  or the like decides where the broker's Vault token goes;
- TLS is verified against certifi's CA bundle, as requests did, unless a CA bundle file or
  directory is given (``VAULT_CACERT``);
- redirects are followed (a standby Vault node redirects to the active one), no retries;
- any failure to reach Vault raises an :class:`OSError`, as requests' errors are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import certifi
import urllib3
import urllib3.exceptions

MAX_REDIRECTS = 5


class VaultResponse:
    """The part of ``requests.Response`` hvac and the backend read."""

    def __init__(self, status: int, headers: Mapping[str, str], content: bytes) -> None:
        self.status_code = status
        self.headers = headers  # urllib3's HTTPHeaderDict: names are case-insensitive
        self.content = content

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not (as requests raises)."""
        return json.loads(self.content)


class VaultUnreachable(ConnectionError):
    """No answer from Vault: refused, timed out, reset, TLS failed, or too many redirects."""


class VaultTransport:
    """A session for hvac (``hvac.Client(session=...)``) with ``maxsize`` keep-alive
    connections per Vault host."""

    cert = None  # hvac reads these three from its session
    proxies: dict[str, str] = {}  # noqa: RUF012 (hvac reads it; never written)

    def __init__(self, verify: bool | str = True, *, maxsize: int = 10) -> None:
        self.verify = verify
        tls: dict[str, Any] = {"cert_reqs": "CERT_REQUIRED", "ca_certs": certifi.where()}
        if verify is False:
            tls = {"cert_reqs": "CERT_NONE"}
        elif isinstance(verify, str):
            key = "ca_cert_dir" if os.path.isdir(verify) else "ca_certs"
            tls = {"cert_reqs": "CERT_REQUIRED", key: verify}
        retries = urllib3.Retry(
            total=None, connect=0, read=False, status=0, other=0, redirect=MAX_REDIRECTS
        )
        self._pool = urllib3.PoolManager(maxsize=maxsize, retries=retries, **tls)

    def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = True,
        cert: object = None,
        verify: object = None,
        proxies: object = None,
    ) -> VaultResponse:
        """One call. ``cert``, ``verify`` and ``proxies`` (hvac passes them on every call) were
        fixed at construction; any other keyword (``data``, ``files``...) is a TypeError, never
        a body silently dropped. NOTE: ``json`` is hvac's name for the body, so the module is
        reached through :func:`_dumps`."""
        sent = dict(headers or {})
        body = None
        if json is not None:
            body = _dumps(json)
            sent["Content-Type"] = "application/json"
        if params:
            url = f"{url}?{urlencode(params, doseq=True)}"
        try:
            resp = self._pool.request(
                method.upper(),
                url,
                body=body,
                headers=sent,
                timeout=timeout,
                redirect=allow_redirects,
            )
        except urllib3.exceptions.HTTPError as exc:
            cause = getattr(exc, "reason", None) or exc  # MaxRetryError wraps the first error
            raise VaultUnreachable(type(cause).__name__) from exc
        return VaultResponse(resp.status, resp.headers, resp.data)

    def close(self) -> None:
        self._pool.clear()


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False).encode()
