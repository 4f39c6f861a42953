"""HTTP client for the broker API. Errors carry the wire code and description.

NOTE: the CLI imports this module on every command, so it stays lean: httpx and the standard
library only, nothing of the server (FastAPI, SQLAlchemy, hvac, boto3).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

SUBJECT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 (a URN, not a secret)
TOKEN_TYPE_JWT = SUBJECT_TOKEN_TYPE
"""The broker JWT (``broker.backends.base.TOKEN_TYPE_JWT``, not imported: see the note above)."""
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
MAX_EXCERPT_CHARS = 200
"""How much of an answer that is not the broker's JSON an error quotes."""


class ClientError(Exception):
    """The broker refused (``status`` 4xx/5xx), could not be reached (``status`` None), or
    something else answered. ``fields`` are the error body's other members (``approval_id``,
    ``reasons``, ...)."""

    def __init__(
        self,
        status: int | None,
        code: str,
        description: str,
        fields: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {description}")
        self.status = status
        self.code = code
        self.description = description
        self.fields = fields or {}

    def to_wire(self) -> dict[str, Any]:
        """The error as the broker's JSON error shape, plus ``status`` when there was one."""
        body: dict[str, Any] = {"error": self.code, "error_description": self.description}
        if self.status is not None:
            body["status"] = self.status
        return {**self.fields, **body}


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the broker's base URL, or None. (``localhost:8080`` parses as
    scheme ``localhost``: without this check it would only fail as "unreachable".)"""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "expected a URL such as http://127.0.0.1:8080 or https://broker.example.com"
    return None


def _excerpt(resp: httpx.Response) -> str:
    """A short, one-line excerpt of an answer that is not the broker's JSON."""
    text = " ".join(resp.text.split())
    if not text:
        return "(empty body)"
    return text if len(text) <= MAX_EXCERPT_CHARS else text[:MAX_EXCERPT_CHARS] + "..."


def _auth(bearer: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {bearer}"} if bearer else {}


class BrokerClient:
    def __init__(self, url: str, *, bearer: str | None = None, timeout: float = 30.0) -> None:
        """Raises ValueError when ``url`` is not an http(s) URL (:func:`url_problem`)."""
        problem = url_problem(url)
        if problem:
            raise ValueError(problem)
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=_auth(bearer), timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, str]:
        request = self._http.build_request(method, path, **kwargs)
        where = f"{method} {request.url}"
        try:
            return self._http.send(request), where
        except httpx.HTTPError as exc:
            raise ClientError(None, "unreachable", f"{where}: {exc}") from None

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        resp, where = self._send(method, path, **kwargs)
        return self._json(resp, where)

    def _plain(self, path: str, **kwargs: Any) -> bytes:
        """The exact bytes of a ``text/plain`` answer; an error is raised as by :meth:`_call`."""
        resp, where = self._send("GET", path, **kwargs)
        if resp.status_code >= 400:
            self._json(resp, where)
        if not resp.headers.get("content-type", "").startswith("text/plain"):
            raise ClientError(None, "not_a_broker", f"{where} answered without text/plain")
        return resp.content

    @staticmethod
    def _json(resp: httpx.Response, where: str) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            body = None
        answered = f"{where} answered {resp.status_code} {resp.reason_phrase}".rstrip()
        if not isinstance(body, dict):
            if resp.status_code >= 400:
                code = f"http_{resp.status_code}"
                raise ClientError(resp.status_code, code, f"{answered}: {_excerpt(resp)}")
            raise ClientError(
                None, "not_a_broker", f"{answered} without a JSON object: {_excerpt(resp)}"
            )
        if resp.status_code >= 400:
            if "error" not in body:  # not the broker's error shape (a proxy, another server)
                shown = body.get("detail") or json.dumps(body)
                text = str(shown)[:MAX_EXCERPT_CHARS]
                raise ClientError(
                    resp.status_code, f"http_{resp.status_code}", f"{answered}: {text}"
                )
            fields = {k: v for k, v in body.items() if k not in ("error", "error_description")}
            description = str(body.get("error_description") or answered)
            raise ClientError(resp.status_code, str(body["error"]), description, fields)
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

    def open_approval(self, *, bearer: str | None = None, **body: Any) -> dict[str, Any]:
        """Open (or find) the request for exactly this future exchange; ``bearer`` (the
        workload's token) replaces the client's."""
        return self._call(
            "POST",
            "/v1/approvals",
            json={k: v for k, v in body.items() if v is not None},
            headers=_auth(bearer),
        )

    def list_approvals(self, **filters: str | None) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        found: list[dict[str, Any]] = self._call("GET", "/v1/approvals", params=params)["approvals"]
        return found

    def get_approval(self, approval_id: str, *, bearer: str | None = None) -> dict[str, Any]:
        """One request; ``bearer`` (e.g. the workload's refreshed token) replaces the client's."""
        return self._call(
            "GET", f"/v1/approvals/{quote(approval_id, safe='')}", headers=_auth(bearer)
        )

    def act_on_approval(self, approval_id: str, verb: str, reason: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/approvals/{approval_id}/{verb}", json={"reason": reason})

    def report_rollback_test(self, **body: Any) -> dict[str, Any]:
        return self._call(
            "POST", "/v1/rollback-tests", json={k: v for k, v in body.items() if v is not None}
        )

    def list_rollback_tests(self, **filters: str | None) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v is not None}
        found: list[dict[str, Any]] = self._call("GET", "/v1/rollback-tests", params=params)[
            "rollback_tests"
        ]
        return found

    def lineage(self, model: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/lineage/{model}")

    def rotate_keys(self) -> dict[str, Any]:
        return self._call("POST", "/v1/keys/rotate")

    def audit_checkpoint(self) -> bytes:
        """The newest signed checkpoint (a signed note), as served: verify it before use."""
        return self._plain("/v1/audit/checkpoint")

    def audit_key(self) -> str:
        """The log's verifier key as the broker serves it (trust it only on first use)."""
        return self._plain("/v1/audit/key").decode("utf-8", "replace").strip()

    def audit_consistency(self, old: int, new: int) -> dict[str, Any]:
        return self._call("GET", "/v1/audit/proof/consistency", params={"from": old, "to": new})
