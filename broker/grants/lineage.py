"""Lineage a request may carry: the data, weights, prompts and rollback point it touches."""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from broker.bounds import bounded_json, capped, shown
from broker.errors import InvalidRequest

MAX_LINEAGE_BYTES = 16 * 1024
MAX_URI_CHARS = 2048

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HOST = re.compile(r"//(?P<userinfo>[^/?#@]*@)?(?P<host>[^/?#:]*)")
_SEGMENT_END = re.compile(r"[;?#]")
_SHAPE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:\S+")


def _invisible(text: str) -> str | None:
    """The first control (C0, DEL, C1) or format character (bidi overrides, zero-width) in
    ``text``, or None: such a URI reads differently in a log or a review than it compares."""
    return next((c for c in text if unicodedata.category(c) in ("Cc", "Cf")), None)


def _decoded(segment: str) -> str:
    """``segment`` percent-decoded until nothing changes (``%252e`` is ``.`` to a reader that
    decodes twice)."""
    while (decoded := _ESCAPE.sub(lambda m: chr(int(m[1], 16)), segment)) != segment:
        segment = decoded
    return segment


def _check_segment(segment: str) -> None:
    decoded = _decoded(segment)
    if "/" in decoded or "\\" in decoded:
        raise ValueError(
            f"segment {shown(segment)} holds an encoded '/' or '\\' (%2F, %5C): readers "
            "disagree whether it separates segments"
        )
    char = _invisible(decoded)
    if char is not None:
        raise ValueError(
            f"segment {shown(segment)} encodes the control or format character U+{ord(char):04X}"
        )
    # NOTE: ``..;x`` and ``..?x`` are ``..`` to servlet containers and HTTP servers, and
    # compatibility forms (fullwidth dots) become ``..`` under NFKC.
    stem = unicodedata.normalize("NFKC", _SEGMENT_END.split(decoded, maxsplit=1)[0])
    if stem in (".", ".."):
        raise ValueError(
            f"a {shown(stem)} segment (also percent-encoded) is refused: it would resolve "
            "outside the path that a rule's pattern matched"
        )


def normalise_uri(uri: str) -> str:
    """``uri`` normalised (RFC 3986 §6.2.2): scheme and host in lower case, percent-encodings
    of unreserved characters decoded and the others in upper case.

    NOTE: a rule's ``datasets`` globs compare text, while a reader of the URI resolves it:
    ``s3://datasets/approved/../secret/pii`` matches ``s3://datasets/approved/**`` as text and
    names ``s3://datasets/secret/pii``. Anything a reader might resolve differently from the
    text is refused rather than guessed at.

    Raises:
        ValueError: not ``scheme:rest`` without whitespace; or a ``.`` or ``..`` segment (also
            percent-encoded), an encoded ``/`` or ``\\``, a backslash, a control or format
            character (also percent-encoded), or a ``%`` that does not start a
            percent-encoding.
    """
    char = _invisible(uri)
    if char is not None:
        raise ValueError(f"the control or format character U+{ord(char):04X} is refused")
    if not _SHAPE.fullmatch(uri):
        raise ValueError("expected a URI such as s3://bucket/key: a scheme, ':', no whitespace")
    if "\\" in uri:
        raise ValueError("a backslash is refused: some readers take it for '/'")
    if _BAD_ESCAPE.search(uri):
        raise ValueError("'%' must start a percent-encoding such as %20 (a literal '%' is %25)")
    scheme, _, rest = uri.partition(":")
    rest = _ESCAPE.sub(_normal_escape, rest)
    for segment in rest.split("/"):
        _check_segment(segment)
    if (host := _HOST.match(rest)) is not None:
        rest = rest[: host.start("host")] + host["host"].lower() + rest[host.end("host") :]
    return f"{scheme.lower()}:{rest}"


def _normal_escape(match: re.Match[str]) -> str:
    char = chr(int(match[1], 16))
    return char if char in _UNRESERVED else "%" + match[1].upper()


Uri = Annotated[
    str,
    Field(min_length=1, max_length=MAX_URI_CHARS),
    AfterValidator(normalise_uri),
]
"""A URI in lineage or a rollback test report: checked and normalised (:func:`normalise_uri`)."""

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: Uri
    sha256: Sha256 | None = None


class RollbackTest(BaseModel):
    """The requester's own account of a rollback test: kept as information only. The rollback
    gate counts only tests the broker recorded (``POST /v1/rollback-tests``)."""

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
        message = str(err["msg"]).removeprefix("Value error, ")
        raise InvalidRequest(f"lineage.{where}: {message}") from None
