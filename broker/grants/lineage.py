"""Lineage a request may carry: the data, weights, prompts and rollback point it touches."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker.bounds import bounded_json, capped
from broker.errors import InvalidRequest

MAX_LINEAGE_BYTES = 16 * 1024


class Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(min_length=1, max_length=2048, pattern=r"^[a-zA-Z][a-zA-Z0-9+.-]*:\S+$")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class RollbackTest(BaseModel):
    """Evidence that rolling back to the rollback point was exercised."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ref: str = Field(min_length=1, max_length=2048)
    result: Literal["passed", "failed"]
    tested_at: AwareDatetime


class RollbackPoint(Artifact):
    test: RollbackTest | None = None


class Lineage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    datasets: list[Artifact] = Field(default_factory=list)
    weights: list[Artifact] = Field(default_factory=list)
    prompts: list[Artifact] = Field(default_factory=list)
    rollback_point: RollbackPoint | None = None

    @field_validator("datasets", "weights", "prompts", mode="before")
    @classmethod
    def _uri_shorthand(cls, value: Any) -> Any:
        # A bare string is shorthand for {"uri": ...}.
        if isinstance(value, list):
            return [{"uri": v} if isinstance(v, str) else v for v in value]
        return value


def lineage_datasets(lineage: dict[str, Any] | None) -> list[str]:
    """The dataset URIs a (parsed) lineage introduces."""
    return [str(d["uri"]) for d in (lineage or {}).get("datasets", [])]


def parse_lineage(raw: str | None) -> dict[str, Any] | None:
    """Parse the ``lineage`` form field. Raises InvalidRequest naming the bad path."""
    if raw is None or raw == "":
        return None
    data = bounded_json(raw, "lineage", max_bytes=MAX_LINEAGE_BYTES)
    if isinstance(data, dict) and isinstance(data.get("rollback_point"), str):
        data["rollback_point"] = {"uri": data["rollback_point"]}
    try:
        return Lineage.model_validate(data).model_dump(mode="json", exclude_none=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(capped(str(p), 64) for p in err["loc"]) or "lineage"
        raise InvalidRequest(f"lineage.{where}: {err['msg']}") from None
