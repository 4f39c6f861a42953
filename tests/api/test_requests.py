"""Request ids on every answer and in every log line of the request, the access log, and no
token or secret in any log line."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.api.requests import MAX_REQUEST_ID_CHARS
from broker.logs import QUIET_LIBRARIES, configure_logging
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.conftest import EVAL_SUB, eval_token, exchange_form

HEADER = "X-Request-ID"
GENERATED = re.compile("[0-9a-f]{32}")


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    """Every record of every logger, DEBUG and up, as JSON lines (the root logger restored)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in QUIET_LIBRARIES}
    stream = io.StringIO()
    configure_logging("json", logging.DEBUG, stream=stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, was in quiet.items():
        logging.getLogger(name).setLevel(was)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
def logged(data_dir: Path) -> Iterator[tuple[TestClient, Broker]]:
    """A dev broker with the access log on."""
    broker = build_broker(
        Settings(dev=True, data_dir=data_dir, policy=EXAMPLE_POLICY, access_log=True)
    )
    with TestClient(create_app(broker=broker)) as client:
        yield client, broker


def test_a_sane_request_id_comes_back_on_every_answer(client: TestClient, broker: Broker) -> None:
    answers = {
        "healthz": client.get("/healthz", headers={HEADER: "a1"}),
        "issued": client.post(
            "/v1/token", data=exchange_form(eval_token(broker)), headers={HEADER: "a2"}
        ),
        "refused": client.post("/v1/token", data=exchange_form("x"), headers={HEADER: "a3"}),
        "405": client.get("/v1/token", headers={HEADER: "a4"}),
        "404": client.get("/nowhere", headers={HEADER: "a5"}),
        "401": client.get("/v1/grants", headers={HEADER: "a6"}),
        "introspect": client.post("/v1/introspect", headers={HEADER: "Root=1-5e1b"}),
    }
    assert [r.status_code for r in answers.values()] == [200, 200, 400, 405, 404, 401, 401]
    ids = [r.headers[HEADER] for r in answers.values()]
    assert ids == ["a1", "a2", "a3", "a4", "a5", "a6", "Root=1-5e1b"]
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert client.get("/healthz", headers={HEADER: trace}).headers[HEADER] == trace


@pytest.mark.parametrize(
    "given",
    [
        "x" * (MAX_REQUEST_ID_CHARS + 1),
        "has space",
        '"quoted"',
        "tab\there",
        "semi;colon",
        "<script>",
    ],
)
def test_an_insane_request_id_is_replaced(client: TestClient, given: str) -> None:
    got = client.get("/healthz", headers={HEADER: given}).headers[HEADER]
    assert got != given and GENERATED.fullmatch(got)


def test_without_a_request_id_each_request_gets_a_new_one(client: TestClient) -> None:
    first, second = (client.get("/healthz").headers[HEADER] for _ in range(2))
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second) and first != second
    assert client.get("/healthz", headers={HEADER: "x" * MAX_REQUEST_ID_CHARS}).headers[HEADER] == (
        "x" * MAX_REQUEST_ID_CHARS
    )


def test_the_access_log_line_of_a_request_carries_its_id(
    logged: tuple[TestClient, Broker], log: io.StringIO
) -> None:
    client, broker = logged
    resp = client.post("/v1/token", data=exchange_form(eval_token(broker)))
    rid = resp.headers[HEADER]
    access = [line for line in lines(log) if line["logger"] == "broker.access"]
    assert len(access) == 1
    line = access[0]
    assert line["request_id"] == rid
    assert line["method"] == "POST" and line["path"] == "/v1/token" and line["status"] == 200
    assert line["client"] == "unknown"  # TestClient's peer is not an address
    assert line["duration_ms"] >= 0 and line["level"] == "INFO"
    assert line["message"].startswith("POST /v1/token 200 ")


def test_the_access_log_is_off_unless_asked(client: TestClient, log: io.StringIO) -> None:
    assert client.get("/healthz").status_code == 200
    assert not [line for line in lines(log) if line["logger"] == "broker.access"]


def test_the_access_log_has_no_query_string_body_or_authorization(
    logged: tuple[TestClient, Broker], log: io.StringIO
) -> None:
    client, _ = logged
    secrets = {"query": "Q-SECRET-1", "form": "F-SECRET-2", "bearer": "A-SECRET-3"}
    client.post(
        f"/v1/token?subject_token={secrets['query']}",
        data=exchange_form(secrets["form"]),
        headers={"Authorization": f"Bearer {secrets['bearer']}"},
    )
    client.get(f"/healthz?token={secrets['query']}")
    text = log.getvalue()
    assert [(line["path"], line["status"]) for line in lines(log) if "path" in line] == [
        ("/v1/token", 400),
        ("/healthz", 200),
    ]
    assert not [name for name, secret in secrets.items() if secret in text]


def test_no_log_line_holds_a_token_the_exchange_was_given(
    logged: tuple[TestClient, Broker], log: io.StringIO
) -> None:
    client, broker = logged
    now = int(dt.datetime.now(dt.UTC).timestamp())
    forged = jwt.encode(  # the dev issuer's claims, another key: refused for its signature
        {"iss": "https://dev.broker.invalid/workload", "sub": EVAL_SUB, "aud": "model-broker"}
        | {"iat": now, "exp": now + 300, "jti": "j-1"},
        ec.generate_private_key(ec.SECP256R1()),
        algorithm="ES256",
    )
    valid = eval_token(broker)
    tokens = {"forged": forged, "garbage": "eyJnot.a.token-" + "z" * 40, "valid": valid}
    answers = [
        client.post("/v1/token", data=exchange_form(forged)),
        client.post("/v1/token", data=exchange_form(tokens["garbage"])),
        client.post("/v1/token", data=exchange_form(valid, action="nope")),
        client.post("/v1/token", data=exchange_form(valid)),  # replayed
        client.post("/v1/introspect", data={"token": forged}, headers={"Authorization": forged}),
    ]
    assert [r.status_code for r in answers] == [400, 400, 400, 400, 401]
    text = log.getvalue()
    assert len(lines(log)) >= len(answers)  # the log was written (access lines at least)
    for name, token in tokens.items():
        assert token not in text, name
        signature = token.rsplit(".", 1)[-1]
        assert signature not in text, f"{name}: its signature is in the log"


def test_log_lines_from_the_exchange_thread_carry_the_request_id(
    client: TestClient, broker: Broker, log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    def steps(_req: object) -> Iterator[None]:
        logging.getLogger("broker.grants").warning("in the exchange pool")
        raise RuntimeError("a bug")
        yield  # a generator, as exchange_steps is

    monkeypatch.setattr(broker.grants, "exchange_steps", steps)
    resp = client.post("/v1/token", data=exchange_form(eval_token(broker)), headers={HEADER: "r1"})
    assert resp.status_code == 503 and resp.headers[HEADER] == "r1"
    written = {line["message"]: line for line in lines(log)}
    assert written["in the exchange pool"]["request_id"] == "r1"
    failed = written["POST /v1/token failed unexpectedly; refused"]
    assert failed["request_id"] == "r1" and "RuntimeError: a bug" in failed["exception"]


def test_an_unhandled_error_is_a_500_logged_with_the_request_id(
    client: TestClient, broker: Broker, log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, str]:
        raise RuntimeError("readiness broke")

    monkeypatch.setattr(broker, "readiness", broken)
    resp = client.get("/readyz", headers={HEADER: "r-500"})
    assert resp.status_code == 500 and resp.headers[HEADER] == "r-500"
    assert resp.json() == {"error": "server_error", "error_description": "the broker failed"}
    logged = [line for line in lines(log) if line.get("request_id") == "r-500"]
    assert [line["message"] for line in logged] == ["GET /readyz failed unexpectedly"]
    assert "RuntimeError: readiness broke" in logged[0]["exception"]


def test_the_token_endpoint_keeps_its_request_id_and_500_past_fastapis_layers(
    client: TestClient, broker: Broker, log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``POST /v1/token`` is served past FastAPI's and Starlette's outer middlewares
    (broker.api.app.BrokerAPI); the broker's own outermost one still gives it its request id
    and answers what nothing handled with a 500 in the broker's shape."""
    from broker.api import token

    first = client.post("/v1/token", data=exchange_form(eval_token(broker)))
    assert first.status_code == 200 and GENERATED.fullmatch(first.headers[HEADER])
    through_fastapi: list[str] = []
    stack = client.app.middleware_stack  # type: ignore[attr-defined]
    assert stack is not None

    async def recorded(scope: Any, receive: Any, send: Any) -> None:
        through_fastapi.append(scope.get("path", ""))
        await stack(scope, receive, send)

    monkeypatch.setattr(client.app, "middleware_stack", recorded)

    def broken(*_args: object) -> None:
        raise RuntimeError("a bug before the exchange")

    monkeypatch.setattr(token, "take_budget", broken)
    resp = client.post("/v1/token", data=exchange_form(eval_token(broker)), headers={HEADER: "t1"})
    assert resp.status_code == 500 and resp.headers[HEADER] == "t1"
    assert resp.json() == {"error": "server_error", "error_description": "the broker failed"}
    logged = [line for line in lines(log) if line.get("request_id") == "t1"]
    assert [line["message"] for line in logged] == ["POST /v1/token failed unexpectedly"]
    assert client.get("/healthz").status_code == 200
    assert through_fastapi == ["/healthz"]  # the exchange did not go through them


def test_a_path_cannot_forge_an_access_log_line(
    logged: tuple[TestClient, Broker], log: io.StringIO
) -> None:
    client, _ = logged
    stream = io.StringIO()
    configure_logging("text", logging.INFO, stream=stream)  # the `log` fixture restores it
    forged = "INFO broker.access: GET /v1/grants 200 1.0ms client=10.0.0.1"
    assert client.get(f"/x%0A{forged.replace(' ', '%20')}").status_code == 404
    assert client.get("/" + "y" * 5000).status_code == 404
    written = [line for line in stream.getvalue().splitlines() if "broker.access" in line]
    assert len(written) == 2
    assert written[0].startswith("INFO broker.access: GET /x\\nINFO broker.access: GET")
    assert "…[5001 characters, sha256:" in written[1] and len(written[1]) < 400
