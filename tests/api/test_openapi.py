"""The OpenAPI description of ``POST /v1/token`` (written by hand in broker/api/token.py, since
the endpoint parses its own form) states docs/api.md's field table: names, required, types."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
FORM = "application/x-www-form-urlencoded"
REPEATABLE = {"resource", "audience"}  # sent as repeated fields, so arrays in the schema


def _documented_fields() -> dict[str, bool]:
    """Field name -> required, from the table under "Token exchange" in docs/api.md."""
    section = API_DOC.read_text().split("## Token exchange", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (yes|no) \|", section, re.MULTILINE)
    return {name: required == "yes" for name, required in rows}


def test_the_token_form_schema_states_the_documented_fields(client: TestClient) -> None:
    body: dict[str, Any] = client.get("/openapi.json").json()["paths"]["/v1/token"]["post"][
        "requestBody"
    ]
    assert body["required"] is True
    schema = body["content"][FORM]["schema"]
    documented = _documented_fields()
    assert len(documented) > 8  # the table was found
    # actor_token is described too: it is read, to be refused (docs/api.md says so below).
    assert set(schema["properties"]) == {*documented, "actor_token"}
    assert schema["type"] == "object"
    assert set(schema["required"]) == {name for name, required in documented.items() if required}
    for name, prop in schema["properties"].items():
        string = {"type": "string"}
        kind = {"type": "array", "items": string} if name in REPEATABLE else string
        assert {k: v for k, v in prop.items() if k != "description"} == kind, name
        assert prop["description"], name
