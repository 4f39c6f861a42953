"""HTTP client for the broker API. Errors carry the wire code and description."""

from __future__ import annotations

from typing import Any

import httpx

from broker.backends.base import TOKEN_TYPE_JWT

SUBJECT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 (a URN, not a secret)
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"


class ClientError(Exception):
    """The broker refused (``status`` 4xx/5xx) or could not be reached (``status`` None)."""

    def __init__(self, status: int | None, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.status = status
        self.code = code
        self.description = description


class BrokerClient:
    def __init__(self, url: str, *, bearer: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(None, "unreachable", f"{self._http.base_url}: {exc}") from None
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code >= 400:
            code = str(body.get("error", f"http_{resp.status_code}"))
            raise ClientError(resp.status_code, code, str(body.get("error_description", "")))
        assert isinstance(body, dict)
        return body

    def dev_token(self, **fields: Any) -> str:
        return str(self._call("POST", "/dev/token", json=fields)["token"])

    def exchange(
        self,
        subject_token: str,
        *,
        model: str,
        action: str,
        requested_token_type: str = TOKEN_TYPE_JWT,
        **optional: str | None,
    ) -> dict[str, Any]:
        form = {
            "grant_type": GRANT_TYPE,
            "subject_token": subject_token,
            "subject_token_type": SUBJECT_TOKEN_TYPE,
            "resource": f"model:{model}",
            "scope": action,
            "requested_token_type": requested_token_type,
            **{k: v for k, v in optional.items() if v is not None},
        }
        return self._call("POST", "/v1/token", data=form)

    def list_grants(self, **filters: str | None) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        grants: list[dict[str, Any]] = self._call("GET", "/v1/grants", params=params)["grants"]
        return grants

    def get_grant(self, grant_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/grants/{grant_id}")

    def revoke(self, grant_id: str, reason: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/grants/{grant_id}/revoke", json={"reason": reason})

    def revoke_matching(self, reason: str, **target: str | None) -> dict[str, Any]:
        body = {k: v for k, v in target.items() if v is not None}
        return self._call("POST", "/v1/revocations", json={**body, "reason": reason})

    def introspect(self, token: str) -> dict[str, Any]:
        return self._call("POST", "/v1/introspect", data={"token": token})

    def open_approval(self, **body: Any) -> dict[str, Any]:
        return self._call(
            "POST", "/v1/approvals", json={k: v for k, v in body.items() if v is not None}
        )

    def list_approvals(self, **filters: str | None) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        found: list[dict[str, Any]] = self._call("GET", "/v1/approvals", params=params)["approvals"]
        return found

    def get_approval(self, approval_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/approvals/{approval_id}")

    def act_on_approval(self, approval_id: str, verb: str, reason: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/approvals/{approval_id}/{verb}", json={"reason": reason})

    def lineage(self, model: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/lineage/{model}")

    def rotate_keys(self) -> dict[str, Any]:
        return self._call("POST", "/v1/keys/rotate")
