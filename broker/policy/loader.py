"""Read, validate and compile a policy file.

This is the policy package's only I/O: the YAML file itself, the ``jwks_file`` key sets and
the webhook ``secret_file`` it names. Everything is checked at load time, so a broker never
starts with a policy it would have to reject half-way through a request. Every problem becomes
a :class:`~broker.errors.PolicyError` naming the file, the place in the document
(``rules[2].issuer``, ``actions.fine-tune.max_ttl``) and what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jwt
import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from broker.errors import PolicyError
from broker.policy.digest import policy_digest, sha256_digest
from broker.policy.glob import compile_glob, is_glob
from broker.policy.model import IssuerConfig, Policy, Rule

# Listing every known name in an error helps with typos until the list gets too long to read.
MAX_LISTED_NAMES = 20

# Members of a JWK that only a private (or symmetric) key has (RFC 7518 §6).
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule with its globs compiled once at load time, so deciding never compiles a regex."""

    rule: Rule
    subject_pattern: re.Pattern[str] | None
    """``None`` when the rule names an exact ``subject``."""
    claims: tuple[tuple[str, tuple[str, ...]], ...]
    """``(claim name, accepted values)`` in the order the rule declares them."""
    models: tuple[re.Pattern[str], ...]
    actions: frozenset[str]
    backends: frozenset[str]
    datasets: tuple[re.Pattern[str], ...]


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    """A validated policy, ready for :func:`broker.policy.decide`.

    ``policy.issuers[*].jwks_file`` are absolute paths; ``jwks`` holds the key set read from each
    of them at load time (by issuer name), and ``digest`` is the policy's
    :mod:`~broker.policy.digest`.
    """

    policy: Policy
    source: str
    digest: str
    rules: tuple[CompiledRule, ...]
    jwks: Mapping[str, Mapping[str, Any]] = field(repr=False)
    group_roles: Mapping[str, frozenset[str]] = field(repr=False)
    """A people issuer's group value → the role names it grants (the inverse of ``roles``)."""
    webhook_secret: str | None = field(default=None, repr=False)
    """The webhook signing secret read from ``approval.webhook.secret_file`` (``whsec_...``)."""
    console_secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Issuer name → the console client secret read from its ``console.client_secret_file``."""

    def roles_for(self, groups: Iterable[str]) -> frozenset[str]:
        """The role names (``admin``, ``approver``, ``auditor``) that ``groups`` grant.

        ``groups`` are the values of a person's roles claim; a single string counts as one
        group.
        """
        # NOTE: iterating a bare string would test each character as a group name.
        values = [groups] if isinstance(groups, str) else groups
        roles: set[str] = set()
        for group in values:
            roles |= self.group_roles.get(group, frozenset())
        return frozenset(roles)


def load_policy(path: Path, *, dev_mode: bool = False) -> LoadedPolicy:
    """Read and validate the policy file at ``path``; see :func:`parse_policy`.

    Raises:
        PolicyError: the file cannot be read, is not UTF-8, or is not a valid policy.
    """
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(source, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise PolicyError(source, "", f"cannot read the file: {exc.strerror or exc}") from exc
    return parse_policy(text, source=source, base_dir=path.parent, dev_mode=dev_mode)


def parse_policy(text: str, *, source: str, base_dir: Path, dev_mode: bool = False) -> LoadedPolicy:
    """Validate the policy document ``text`` and compile it.

    ``source`` names the document in errors; relative ``jwks_file`` paths are resolved against
    ``base_dir`` and each file must hold a public JWKS. Issuers with ``dev: true`` are refused
    unless ``dev_mode``.

    Raises:
        PolicyError: the YAML, the schema, a cross-reference or a ``jwks_file`` is invalid.
    """
    policy = _validate(_parse_yaml(text, source), source)
    _check_dev_issuers(policy, source, dev_mode=dev_mode)
    _check_unique_names(policy, source)
    for index, rule in enumerate(policy.rules):
        _check_rule_references(policy, index, rule, source)
    _check_people(policy, source)
    policy, jwks = _load_key_sets(policy, source, base_dir)
    webhook = policy.approval.webhook
    secret = _read_webhook_secret(base_dir / webhook.secret_file, source) if webhook else None
    console_secrets = _read_console_secrets(policy, source, base_dir)
    digest = policy_digest(
        policy, jwks_fingerprints={name: sha256_digest(doc) for name, doc in jwks.items()}
    )
    return LoadedPolicy(
        policy=policy,
        source=source,
        digest=digest,
        rules=tuple(_compile_rule(rule) for rule in policy.rules),
        jwks=MappingProxyType(jwks),
        group_roles=MappingProxyType(_group_roles(policy)),
        webhook_secret=secret,
        console_secrets=MappingProxyType(console_secrets),
    )


# --- YAML ----------------------------------------------------------------------------------------


class _PolicyYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate mapping keys.

    NOTE: plain YAML keeps the *last* of two equal keys, so a second ``rules:`` block or a
    repeated claim name would silently replace the first. Merge keys (``<<``) may still override.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        # A SafeLoader subclass: only plain data types are ever constructed, as with safe_load.
        data = yaml.load(text, Loader=_PolicyYamlLoader)  # noqa: S506
    except yaml.YAMLError as exc:
        raise PolicyError(source, "", _describe_yaml_error(exc)) from exc
    if data is None:
        raise PolicyError(source, "", "the policy file is empty")
    if not isinstance(data, dict):
        raise PolicyError(
            source,
            "",
            "the top level must be a mapping with issuers, actions, models, rules and roles, "
            f"got {_describe_value(data)}",
        )
    return data


def _describe_yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


# --- schema --------------------------------------------------------------------------------------


def _validate(data: dict[str, Any], source: str) -> Policy:
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        # NOTE: a misspelt key (``max_tll``) is two errors: the unknown key and the field it was
        # meant to be, now missing. The unknown key is the cause, so it is reported first, with
        # the missing field it most likely meant; "max_ttl is missing" alone would mislead.
        errors = sorted(
            exc.errors(include_url=False), key=lambda e: _REPORT_ORDER.get(e["type"], 1)
        )
        first = errors[0]
        message = _describe_validation_error(first)
        rest = errors[1:]
        if first["type"] == "extra_forbidden":
            meant = _meant_field(first, rest)
            if meant is not None:
                message = message.replace("; ", f" (did you mean {meant['loc'][-1]!r}?); ", 1)
                rest = [e for e in rest if e is not meant]
        if rest:
            message += f" (and {len(rest)} more problem(s) after fixing this one)"
        raise PolicyError(source, _format_loc(first["loc"]), message) from exc


_REPORT_ORDER = {"extra_forbidden": 0, "missing": 2}
"""Unknown keys first, missing fields last, everything else in between (in document order)."""


def _meant_field(unknown: ErrorDetails, others: Sequence[ErrorDetails]) -> ErrorDetails | None:
    """The missing field beside ``unknown`` whose name is closest to it, if any is close."""
    missing = {
        str(e["loc"][-1]): e
        for e in others
        if e["type"] == "missing" and e["loc"][:-1] == unknown["loc"][:-1]
    }
    close = difflib.get_close_matches(str(unknown["loc"][-1]), list(missing), n=1, cutoff=0.6)
    return missing[close[0]] if close else None


def _format_loc(loc: Sequence[int | str]) -> str:
    """``("rules", 1, "claims", "kubernetes.io/ns")`` → ``rules[1].claims["kubernetes.io/ns"]``."""
    out = ""
    for position, part in enumerate(loc):
        if part == "[key]":
            continue  # the element before names the offending key; the message says so
        is_key = position + 1 < len(loc) and loc[position + 1] == "[key]"
        if isinstance(part, int) and not is_key:
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{json.dumps(str(part), ensure_ascii=False)}]"
    return out


def _describe_validation_error(error: ErrorDetails) -> str:
    kind = error["type"]
    loc = error["loc"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return f"unknown field {str(loc[-1])!r}; docs/policy.md lists the fields allowed here"
    message = error["msg"]
    if kind in {"value_error", "assertion_error"}:
        # Our own validators: their messages already quote the bad value where it helps.
        return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = message[:1].lower() + message[1:]
    if loc and loc[-1] == "[key]":
        message = f"invalid key: {message}"
    # Policy files hold no secrets, so echoing the offending value is safe and helpful.
    return f"{message}, got {_describe_value(error['input'])}"


def _describe_value(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if value is None:
        return "null"
    if isinstance(value, str | int | float):
        text = repr(value)
        shown = text if len(text) <= 80 else text[:77] + "..."
        return f"{_SCALAR_NAMES.get(type(value), type(value).__name__)} {shown}"
    return "a mapping" if isinstance(value, dict) else f"a {type(value).__name__}"


_SCALAR_NAMES = {int: "integer", float: "number", str: "string"}


# --- cross-references ----------------------------------------------------------------------------


def list_known(names: Iterable[str]) -> str:
    """``"known: a, b"`` for error messages, or just a count when the list would be too long."""
    listed = list(names)
    if len(listed) > MAX_LISTED_NAMES:
        return f"{len(listed)} are defined"
    return "known: " + (", ".join(listed) if listed else "none")


def _check_dev_issuers(policy: Policy, source: str, *, dev_mode: bool) -> None:
    # NOTE: a dev issuer's keys live inside the broker process and anyone with access to the
    # dev endpoints can mint tokens from it; a production policy must never trust one.
    if dev_mode:
        return
    for index, issuer in enumerate(policy.issuers):
        if issuer.dev:
            raise PolicyError(
                source,
                f"issuers[{index}].dev",
                f"issuer {issuer.name!r}: dev issuers are only allowed with --dev",
            )


def _check_unique_names(policy: Policy, source: str) -> None:
    # NOTE: two issuers with one URL would make "which issuer verified this token" ambiguous;
    # two rules with one name would make grants and audit entries ambiguous.
    _check_unique(source, "issuers", "name", "issuer name", [i.name for i in policy.issuers])
    _check_unique(source, "issuers", "issuer", "issuer URL", [i.issuer for i in policy.issuers])
    _check_unique(source, "rules", "name", "rule name", [r.name for r in policy.rules])


def _check_unique(source: str, section: str, attr: str, label: str, values: list[str]) -> None:
    first_seen: dict[str, int] = {}
    for index, value in enumerate(values):
        if value in first_seen:
            raise PolicyError(
                source,
                f"{section}[{index}].{attr}",
                f"duplicate {label} {value!r} (also {section}[{first_seen[value]}])",
            )
        first_seen[value] = index


def _folded(text: str | None) -> str | None:
    return None if text is None else text.casefold()


def _check_people(policy: Policy, source: str) -> None:
    """Every identity in ``people`` names a defined issuer, and belongs to one person only
    (ignoring case, as separation of duties matches them)."""
    owner: dict[tuple[str, str | None, str | None, str | None], str] = {}
    for person, refs in policy.people.items():
        for position, ref in enumerate(refs):
            where = f"people.{person}[{position}]"
            if policy.issuer_by_name(ref.issuer) is None:
                names = list_known(i.name for i in policy.issuers)
                raise PolicyError(
                    source, f"{where}.issuer", f"issuer {ref.issuer!r} is not defined; {names}"
                )
            key = (ref.issuer, _folded(ref.subject), ref.claim, _folded(ref.value))
            if key in owner and owner[key] != person:
                raise PolicyError(
                    source, where, f"this identity is already mapped to {owner[key]!r}"
                )
            owner[key] = person


def _check_rule_references(policy: Policy, index: int, rule: Rule, source: str) -> None:
    where = f"rules[{index}]"
    issuer = policy.issuer_by_name(rule.issuer)
    if issuer is None:
        names = list_known(i.name for i in policy.issuers)
        raise PolicyError(
            source, f"{where}.issuer", f"issuer {rule.issuer!r} is not defined in issuers; {names}"
        )
    if issuer.kind != "workload":
        raise PolicyError(
            source,
            f"{where}.issuer",
            f"issuer {rule.issuer!r} is a people issuer; rules need a workload issuer",
        )
    for position, action in enumerate(rule.actions):
        if action not in policy.actions:
            raise PolicyError(
                source,
                f"{where}.actions[{position}]",
                f"unknown action {action!r}; {list_known(policy.actions)}",
            )
    for position, model in enumerate(rule.models):
        if not is_glob(model) and model not in policy.models:
            raise PolicyError(
                source,
                f"{where}.models[{position}]",
                f"unknown model {model!r}; {list_known(policy.models)}",
            )
    _check_rule_backends(policy, where, rule, source)


def _check_rule_backends(policy: Policy, where: str, rule: Rule, source: str) -> None:
    # A glob may name models added later, so only literal model names are checked here; the
    # engine refuses a request for a backend its model lacks either way.
    literal_models = [m for m in rule.models if not is_glob(m)]
    for position, backend in enumerate(rule.backends):
        for model in literal_models:
            if not policy.models[model].has_backend(backend):
                raise PolicyError(
                    source,
                    f"{where}.backends[{position}]",
                    f"backend {backend!r} is not configured for model {model!r} "
                    f"(add models.{model}.backends.{backend} or drop it from this rule)",
                )


# --- key sets ------------------------------------------------------------------------------------


def _load_key_sets(
    policy: Policy, source: str, base_dir: Path
) -> tuple[Policy, dict[str, dict[str, Any]]]:
    """Resolve every ``jwks_file`` against ``base_dir`` and read its key set."""
    issuers: list[IssuerConfig] = []
    key_sets: dict[str, dict[str, Any]] = {}
    for index, issuer in enumerate(policy.issuers):
        if issuer.jwks_file is None:
            issuers.append(issuer)
            continue
        resolved = (base_dir / issuer.jwks_file).resolve()
        key_sets[issuer.name] = _read_key_set(resolved, source, f"issuers[{index}].jwks_file")
        issuers.append(issuer.model_copy(update={"jwks_file": resolved}))
    return policy.model_copy(update={"issuers": issuers}), key_sets


def _read_key_set(path: Path, source: str, where: str) -> dict[str, Any]:
    def fail(problem: str) -> PolicyError:
        return PolicyError(source, where, f"{path}: {problem}")

    try:
        document = json.loads(path.read_bytes())
    except OSError as exc:
        raise fail(f"cannot read the key set: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise fail(f"not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise fail('not a JWKS: expected a JSON object with a "keys" list')
    if not document["keys"]:
        raise fail("the key set has no keys")
    for position, key in enumerate(document["keys"]):
        _check_public_key(key, position, fail)
    return document


def _check_public_key(key: object, position: int, fail: Callable[[str], PolicyError]) -> None:
    if not isinstance(key, dict):
        raise fail(f"keys[{position}] is not a JSON object")
    private = sorted(_PRIVATE_JWK_MEMBERS & key.keys())
    if private:
        # NOTE: a private key in a file the repository carries is a leaked key; refuse it
        # rather than quietly use only its public half.
        raise fail(
            f"keys[{position}] holds private or symmetric key material ({', '.join(private)}); "
            "a jwks_file must contain public keys only"
        )
    try:
        jwt.PyJWK(key)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise fail(f"keys[{position}] is not a usable public key: {exc}") from exc


# --- webhook secret ------------------------------------------------------------------------------

WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 (the format's prefix, not a secret)
WEBHOOK_SECRET_BYTES = (24, 64)
"""The Standard Webhooks specification's bounds on a signing secret's length."""


def _read_webhook_secret(path: Path, source: str) -> str:
    """The Standard Webhooks secret in ``path``: ``whsec_`` and the base64 of 24 to 64 random
    bytes (surrounding whitespace is ignored). Raises PolicyError; never quotes the file."""
    where = "approval.webhook.secret_file"
    path = path.resolve()
    try:
        text = path.read_bytes().decode("ascii").strip()
    except OSError as exc:
        raise PolicyError(
            source, where, f"{path}: cannot read the secret: {exc.strerror or exc}"
        ) from exc
    except UnicodeDecodeError:
        text = ""
    body = text.removeprefix(WEBHOOK_SECRET_PREFIX)
    try:
        secret = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except binascii.Error:
        secret = b""
    low, high = WEBHOOK_SECRET_BYTES
    if not text.startswith(WEBHOOK_SECRET_PREFIX) or not low <= len(secret) <= high:
        # NOTE: the message describes the expected form only: the file holds a secret.
        raise PolicyError(
            source,
            where,
            f"{path}: not a Standard Webhooks secret: expected {WEBHOOK_SECRET_PREFIX} followed "
            f"by the base64 of {low} to {high} random bytes, e.g. from "
            "`echo whsec_$(head -c 32 /dev/urandom | base64)`",
        )
    return text


def _read_console_secrets(policy: Policy, source: str, base_dir: Path) -> dict[str, str]:
    """Each people issuer's console client secret (surrounding whitespace ignored). Raises
    PolicyError for a file that cannot be read or is empty; never quotes the file."""
    secrets: dict[str, str] = {}
    for index, issuer in enumerate(policy.issuers):
        if issuer.console is None or issuer.console.client_secret_file is None:
            continue
        where = f"issuers[{index}].console.client_secret_file"
        path = (base_dir / issuer.console.client_secret_file).resolve()
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise PolicyError(source, where, f"{path}: cannot read the secret: {why}") from exc
        if not text:
            raise PolicyError(source, where, f"{path}: the file is empty")
        secrets[issuer.name] = text
    return secrets


# --- compilation ---------------------------------------------------------------------------------


def _compile_rule(rule: Rule) -> CompiledRule:
    claims = tuple(
        (name, (expected,) if isinstance(expected, str) else tuple(expected))
        for name, expected in rule.claims.items()
    )
    return CompiledRule(
        rule=rule,
        subject_pattern=(
            compile_glob(rule.subject_pattern) if rule.subject_pattern is not None else None
        ),
        claims=claims,
        models=tuple(compile_glob(m) for m in rule.models),
        actions=frozenset(rule.actions),
        backends=frozenset(rule.backends),
        datasets=tuple(compile_glob(d) for d in rule.datasets),
    )


def _group_roles(policy: Policy) -> dict[str, frozenset[str]]:
    """Group → roles, scoped or not (which models a role covers: broker.policy.roles)."""
    roles_by_group: dict[str, set[str]] = {}
    for role, groups in policy.roles.items():
        for group in groups:
            name = group if isinstance(group, str) else group.group
            roles_by_group.setdefault(name, set()).add(role)
    return {group: frozenset(roles) for group, roles in roles_by_group.items()}
