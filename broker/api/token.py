"""``POST /v1/token`` (RFC 8693 token exchange) and ``POST /v1/introspect`` (RFC 7662)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from concurrent.futures import Executor
from typing import Annotated, Any
from urllib.parse import unquote, unquote_to_bytes

from fastapi import APIRouter, Form, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from broker.api.clients import ClientAddresses
from broker.api.deps import BrokerDep, authenticate_any
from broker.backends.base import TOKEN_TYPE_JWT
from broker.bounds import ascii_int, capped, shown
from broker.errors import (
    AuditUnavailable,
    BrokerError,
    ExchangeFailed,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    RateLimited,
    Unauthenticated,
    UnsupportedGrantType,
)
from broker.grants.introspection import introspect
from broker.grants.refusals import RefusalBudget
from broker.grants.service import ExchangeRequest, ExchangeResult, GrantService
from broker.jsonbytes import Encoder
from broker.runtime import Broker
from broker.store.db import Finished, OffLoop, advance, advance_in_thread

router = APIRouter()
log = logging.getLogger("broker.api")

PATH = "/v1/token"
INTROSPECT_PATH = "/v1/introspect"
EXCHANGE_THREADS = 40
"""Exchanges in their blocking part at once (as many as anyio's default for FastAPI): their
writes wait for the group commit together, so fewer threads make smaller batches."""

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
SUBJECT_TOKEN_TYPES = {
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
}
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
FORM = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 64 * 1024
MAX_FORM_FIELDS = 64
SINGLE_FIELDS = (
    "grant_type",
    "subject_token",
    "subject_token_type",
    "scope",
    "requested_token_type",
    "actor_token",
    "requested_ttl",
    "reason",
    "lineage",
    "approval_id",
    "emergency",
)
OptForm = Annotated[str | None, Form()]


def _one(
    name: str, values: list[str] | None, error: type[BrokerError] = InvalidRequest
) -> str | None:
    if not values:
        return None
    if len(values) > 1:
        raise error(f"{name}: expected exactly one, got {len(values)}")
    return values[0]


def parse_exchange(
    grant_type: str | None,
    subject_token: str | None,
    subject_token_type: str | None,
    resource: list[str] | None,
    scope: str | None,
    requested_token_type: str | None,
    audience: list[str] | None,
    actor_token: str | None,
    requested_ttl: str | None,
    emergency: str | None = None,
    **optional: str | None,
) -> ExchangeRequest:
    """Validate the form fields of a token exchange. Raises a BrokerError naming the field."""
    if not grant_type:
        raise InvalidRequest("grant_type is required")
    if grant_type != GRANT_TYPE:
        raise UnsupportedGrantType(f"grant_type: expected {GRANT_TYPE}, got {shown(grant_type)}")
    # NOTE: a token read from a file keeps its trailing newline (`broker dev token > f`); no JWT
    # contains whitespace, so stripping it loses nothing.
    subject_token = (subject_token or "").strip()
    if not subject_token:
        raise InvalidRequest("subject_token is required")
    if subject_token_type not in SUBJECT_TOKEN_TYPES:
        got = "nothing" if subject_token_type is None else shown(subject_token_type)
        raise InvalidRequest(
            f"subject_token_type: expected one of {sorted(SUBJECT_TOKEN_TYPES)}, got {got}"
        )
    if actor_token:
        raise InvalidRequest("actor_token: delegation is not supported; send only subject_token")
    target = _one("resource", resource, InvalidTarget)
    if target is None or not target.startswith("model:") or len(target) == len("model:"):
        raise InvalidTarget("resource: expected exactly one 'model:<model-id>'")
    actions = (scope or "").split()
    if len(actions) != 1:
        raise InvalidScope(f"scope: expected exactly one action, got {len(actions)}")
    ttl = ascii_int(requested_ttl, "requested_ttl") if requested_ttl else None
    if emergency not in (None, "true", "false"):
        raise InvalidRequest(f"emergency: expected true or false, got {shown(emergency)}")
    return ExchangeRequest(
        emergency=emergency == "true",
        subject_token=subject_token,
        model=target.removeprefix("model:"),
        action=actions[0],
        token_type=requested_token_type or TOKEN_TYPE_JWT,
        audience=_one("audience", audience, InvalidTarget),
        requested_ttl=ttl,
        **optional,
    )


def _form_schema() -> dict[str, Any]:
    """The OpenAPI description of the form that :class:`TokenEndpoint` parses itself."""
    text = {"type": "string"}
    many = {"type": "array", "items": {"type": "string"}}
    fields: dict[str, tuple[dict[str, Any], str]] = {
        "grant_type": (text, GRANT_TYPE),
        "subject_token": (text, "the workload identity JWT"),
        "subject_token_type": (text, " or ".join(sorted(SUBJECT_TOKEN_TYPES))),
        "resource": (many, "exactly one model:<model-id>"),
        "scope": (text, "exactly one action"),
        "requested_token_type": (text, f"default {TOKEN_TYPE_JWT} (a broker JWT)"),
        "audience": (many, "broker JWTs only: at most one audience the model allows"),
        "actor_token": (text, "refused: delegation is not supported"),
        "reason": (text, "free text, at most 1,000 characters, stored on the grant"),
        "lineage": (text, "JSON: the datasets, weights and prompts the job uses"),
        "approval_id": (text, "an approved request that covers exactly this request"),
        "requested_ttl": (text, "seconds wanted; capped by the action's max_ttl"),
        "emergency": (text, "true: break-glass, issued now and reviewed after (needs reason)"),
    }
    schema = {
        "type": "object",
        "required": ["grant_type", "subject_token", "subject_token_type", "resource", "scope"],
        "properties": {name: {**kind, "description": doc} for name, (kind, doc) in fields.items()},
    }
    return {"requestBody": {"required": True, "content": {FORM: {"schema": schema}}}}


_BODY = Encoder(sort_keys=False, ensure_ascii=False, allow_nan=False)


class CompactJSON(JSONResponse):
    """Starlette's JSONResponse, its body written by broker.jsonbytes: the same bytes, the
    exchange's answer in a microsecond instead of ten (docs/performance.md)."""

    def render(self, content: Any) -> bytes:
        return _BODY.encode(content)


def _header(scope: Scope, name: bytes) -> str | None:
    """The first ``name`` header of the request (ASGI names are lower case), as Starlette's
    ``Headers.get`` answers it."""
    for key, value in scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text
    return None


async def read_form(scope: Scope, receive: Receive) -> dict[str, list[str]]:
    """The fields of an ``application/x-www-form-urlencoded`` body of at most MAX_FORM_BYTES.
    Raises InvalidRequest naming what is wrong (type, size, encoding, too many fields), and
    Starlette's ClientDisconnect when the client went away before the body ended.
    NOTE: from the ASGI scope and messages themselves: Starlette's Request and Headers cost
    as much as the checks (every exchange)."""
    ctype = _header(scope, b"content-type")
    if ctype is None or ctype.partition(";")[0].strip().lower() != FORM:
        got = "nothing" if ctype is None else shown(ctype)
        raise InvalidRequest(f"Content-Type: expected {FORM}, got {got}")
    declared = _header(scope, b"content-length")
    if declared is None:
        declared = "0"
    # NOTE: ASCII digits only: str.isdigit also takes '²' and other digits int() refuses.
    if not (declared.isascii() and declared.isdigit()) or int(declared) > MAX_FORM_BYTES:
        raise InvalidRequest(f"body: larger than {MAX_FORM_BYTES} bytes")
    # NOTE: read in chunks against the cap: a chunked body has no Content-Length to check.
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        if message["type"] != "http.request":
            continue
        body += message.get("body", b"")
        if len(body) > MAX_FORM_BYTES:
            raise InvalidRequest(f"body: larger than {MAX_FORM_BYTES} bytes")
        if not message.get("more_body", False):
            break
    try:
        return parse_form(body.decode())
    except UnicodeDecodeError:
        raise InvalidRequest("body: expected UTF-8 form fields") from None
    except ValueError:
        raise InvalidRequest(f"body: expected at most {MAX_FORM_FIELDS} form fields") from None


def parse_form(text: str) -> dict[str, list[str]]:
    """``parse_qs(text, keep_blank_values=True, errors="strict",
    max_num_fields=MAX_FORM_FIELDS)``: the same fields in the same order, or the same error
    (ValueError for too many fields, UnicodeDecodeError for an escape that is not UTF-8), as
    ``tests/api/test_form.py`` holds them for any text.

    NOTE: why (docs/performance.md): ``parse_qsl`` took 27 µs of an exchange, most of it its
    general steps around fields that hold no escape (the token) and a regular expression that
    splits out non-ASCII runs before each unquoting (an exchange's form is ASCII)."""
    if text.count("&") >= MAX_FORM_FIELDS:
        raise ValueError("Max number of fields exceeded")
    form: dict[str, list[str]] = {}
    for field in text.split("&"):
        if field:
            name, _, value = field.partition("=")
            form.setdefault(_unquoted(name), []).append(_unquoted(value))
    return form


def _unquoted(text: str) -> str:
    """``unquote(text.replace("+", " "), errors="strict")``."""
    if "+" in text:
        text = text.replace("+", " ")
    if "%" not in text:
        return text
    if text.isascii():  # unquote's ASCII runs are then the whole text: the same decoding
        return unquote_to_bytes(text).decode()
    return unquote(text, errors="strict")


def exchange_fields(form: dict[str, list[str]]) -> ExchangeRequest:
    """:func:`parse_exchange` over parsed form fields: a blank field counts as absent, and a
    field other than ``resource`` and ``audience`` may appear at most once."""
    for name, given in form.items():
        if any("\x00" in value for value in given):
            # NOTE: no store takes NUL in text (PostgreSQL refuses it), and no field needs it.
            raise InvalidRequest(f"{capped(name, 64)}: contains a NUL character")
    single: dict[str, str | None] = {}
    for name in SINGLE_FIELDS:
        values = form.get(name)
        if values and len(values) > 1:
            raise InvalidRequest(f"{name}: expected at most one, got {len(values)}")
        single[name] = values[0] if values and values[0] else None
    return parse_exchange(resource=form.get("resource"), audience=form.get("audience"), **single)


def _answer(result: ExchangeResult) -> dict[str, Any]:
    cred = result.credential
    return {
        "access_token": cred.access_token,
        "issued_token_type": cred.issued_token_type,
        "token_type": cred.token_type,
        "expires_in": int((cred.expires_at - result.grant.issued_at).total_seconds()),
        "scope": result.grant.action,
        "grant_id": result.grant.id,
        **cred.extra,
        **({"emergency": result.emergency} if result.emergency else {}),
    }


async def exchange(grants: GrantService, req: ExchangeRequest, pool: Executor) -> ExchangeResult:
    """:meth:`GrantService.exchange` for the event loop. When the group commit writes on this
    loop (SQLite, :meth:`GrantService.attach_loop`), the steps run here, and from an OFF_LOOP
    on (keys to fetch, approvals, break-glass, external backends) in a thread of ``pool``
    until their next write; otherwise their first part runs in the pool. The loop, not a
    thread, awaits each group commit and resumes the rest (the answer, or the denial after a
    replay) itself.

    NOTE: one thread for the common case: in a worker pinned to one CPU, every hand-off
    between the loop, an exchange thread and the writer is a wait for the GIL, and a writer
    waiting for it holds the store's write lock (docs/performance.md). A thread blocked until
    the commit cost a wake-up per exchange, and anyio's thread hop more loop time than the
    executor's."""
    steps = grants.exchange_steps(req)
    loop = asyncio.get_running_loop()
    # The thread's log lines carry the request id too (run_in_executor copies no context).
    context = contextvars.copy_context()
    if grants.steps_on_loop:
        step = advance(steps)
    else:
        step = await loop.run_in_executor(pool, context.run, advance_in_thread, steps)
    while not isinstance(step, Finished):
        if isinstance(step, OffLoop):
            step = await loop.run_in_executor(pool, context.run, advance_in_thread, steps)
        else:
            step = advance(steps, await _committed(grants, step))
    return step.value


async def _committed(grants: GrantService, write: Any) -> Exception | None:
    """Queue ``write`` for the group commit and wait for its outcome on the loop."""
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    outcome: asyncio.Future[Exception | None] = loop.create_future()

    def settle(error: Exception | None) -> None:
        if not outcome.done():
            outcome.set_result(error)

    def done(error: Exception | None) -> None:  # on this loop, or in the writer thread
        if threading.get_ident() == loop_thread:
            settle(error)
        else:
            loop.call_soon_threadsafe(settle, error)

    try:
        grants.commit_later(write, done)
    except AuditUnavailable as exc:
        return exc
    return await outcome


class TokenEndpoint:
    """``POST /v1/token`` as a bare ASGI handler in front of the FastAPI router.

    NOTE: this is the hot path, so it skips FastAPI's routing, dependency solving and exception
    middleware (a third of an exchange's event-loop time): it parses the form on the event loop
    and runs the exchange with :func:`exchange`.
    Its OpenAPI entry is :data:`OPENAPI`. Every other request goes to ``app`` unchanged."""

    def __init__(
        self, app: ASGIApp, broker: Broker, pool: Executor, clients: ClientAddresses
    ) -> None:
        self.app = app
        self.broker = broker
        self.pool = pool
        self.clients = clients

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            error = InvalidRequest(f"method {capped(scope['method'], 20)}: expected POST")
            allow = {**NO_STORE, "Allow": "POST"}
            await CompactJSON(error.to_wire(), 405, allow)(scope, receive, send)
            return
        started = time.perf_counter()
        client = self.clients.of(scope)
        asked = ["", "", ""]  # model, action, requested_token_type, once parsed
        try:
            take_budget(self.broker.refusals, client, PATH)
            result = await self._exchange(scope, receive, client, asked)
        except BrokerError as exc:
            disclose = self.broker.grants.explain_denials
            outcome, response = exc.code, error_response(exc, NO_STORE, disclose=disclose)
            self.broker.metrics.refused(PATH, exc.reason)
        else:
            outcome, response = "issued", CompactJSON(_answer(result), 200, NO_STORE)
        model, action, token_type = asked
        observe = self.broker.metrics.exchanged(model, action, token_type, outcome)
        observe(time.perf_counter() - started)
        await response(scope, receive, send)

    async def _exchange(
        self, scope: Scope, receive: Receive, client: str, asked: list[str]
    ) -> ExchangeResult:
        """Parse and run the exchange (what it asks for put in ``asked``, for the metrics),
        with the token ``client`` took from its budget: kept by a refusal of an
        attempt that verified nobody (counted for the summary unless an event records it),
        given back otherwise.
        NOTE: fail closed: an error that escaped the exchange (a bug) is a 503, never a
        credential; what the exchange itself refuses it has recorded."""
        budget = self.broker.refusals
        try:
            req = exchange_fields(await read_form(scope, receive))
            asked[:] = req.model, req.action, req.token_type
            result = await exchange(self.broker.grants, req, self.pool)
        except BrokerError as exc:
            settle_budget(budget, client, PATH, exc)
            raise
        except Exception:
            budget.refund(client)
            log.exception("POST /v1/token failed unexpectedly; refused")
            raise ExchangeFailed("the broker failed while handling this exchange") from None
        budget.refund(client)
        return result


def take_budget(budget: RefusalBudget, client: str, endpoint: str) -> None:
    """Take a token of ``client``'s budget of unverifiable attempts; raise RateLimited (counted
    for the summary) when it has none."""
    wait = budget.take(client)
    if wait is not None:
        budget.count(client, endpoint, "rate_limited")
        raise RateLimited(
            f"too many unverifiable attempts from this address; retry in {wait} s",
            retry_after=wait,
        )


def settle_budget(budget: RefusalBudget, client: str, endpoint: str, error: BrokerError) -> None:
    """After the refusal ``error``: a refusal that verified nobody keeps ``client``'s token (and
    is counted for the summary unless an event records it); any other gives it back."""
    if error.attributed or error.status >= 500:
        budget.refund(client)
    elif error.fields.get("audit_index") is None:
        budget.count(client, endpoint, error.reason)


def error_response(
    exc: BrokerError, headers: dict[str, str], *, disclose: bool = False
) -> JSONResponse:
    """The JSON answer for ``exc``, with Retry-After for a 429."""
    if isinstance(exc, RateLimited):
        headers = {**headers, "Retry-After": str(exc.retry_after)}
    return CompactJSON(exc.to_wire(disclose=disclose), exc.status, headers)


def _openapi() -> dict[str, Any]:
    """The OpenAPI path item of :class:`TokenEndpoint`."""
    error = {"description": "RFC 6749 §5.2 error: `error` and `error_description`"}
    return {
        "post": {
            "tags": ["exchange"],
            "summary": "RFC 8693 token exchange",
            "operationId": "token_exchange_v1_token_post",
            **_form_schema(),
            "responses": {
                "200": {
                    "description": "access_token, issued_token_type, token_type, expires_in, "
                    "scope, grant_id (and the backend's extra fields)"
                },
                "400": error,
                "403": error,
                "405": error,
                "503": error,
            },
        }
    }


OPENAPI = _openapi()


@router.post("/v1/introspect", tags=["exchange"], summary="RFC 7662 introspection of broker JWTs")
def introspect_token(
    request: Request,
    broker: BrokerDep,
    token: OptForm = None,
) -> JSONResponse:
    """Whether a broker JWT's grant is active. The caller authenticates with its own bearer
    token; a caller whose bearer verifies nobody is charged to its address's budget."""
    client = request.app.state.clients.of(request.scope)
    try:
        take_budget(broker.refusals, client, INTROSPECT_PATH)
        authenticate_any(request, broker)
    except RateLimited as exc:
        broker.metrics.refused(INTROSPECT_PATH, exc.reason)
        raise
    except Unauthenticated as exc:
        broker.metrics.refused(INTROSPECT_PATH, exc.reason)
        settle_budget(broker.refusals, client, INTROSPECT_PATH, exc)
        raise
    broker.refusals.refund(client)
    token = (token or "").strip()
    if not token:
        raise InvalidRequest("token is required")
    body = introspect(token, keys=broker.keys, issuer_url=broker.issuer_url, grants=broker.grants)
    return JSONResponse(body, headers=NO_STORE)
