"""The ``broker`` command.

Exit codes scripts can rely on: 0 success; 1 the broker refused (any 4xx but approval_required:
denied, invalid, not found, unauthenticated), a policy decision of deny, or an awaited approval
that ended otherwise than approved (denied, cancelled, expired, used); 2 usage or configuration
error (bad flags, a bad URL, a token where a file is expected, an invalid policy file); 3 the
broker is unreachable or unavailable (5xx, or something other than the broker answered); 4
approval required (the error names the approval request; ``policy explain``: the decision needs
approval); 5 an awaited approval is still pending when ``--timeout`` ran out. With ``--json``
an error is printed as JSON on standard error too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from broker.client.http import BrokerClient, ClientError, url_problem
from broker.durations import parse_duration
from broker.errors import BrokerError, ConfigError

EXIT_OK, EXIT_REFUSED, EXIT_CONFIG, EXIT_UNAVAILABLE, EXIT_APPROVAL = 0, 1, 2, 3, 4
EXIT_TIMEOUT = 5
WAIT_FIRST_S, WAIT_MAX_S = 1.0, 30.0
"""Polling an approval: the first pause, doubled after each poll up to the longest."""
DEFAULT_WAIT = "30m"
DEFAULT_URL = "http://127.0.0.1:8080"
_JWT_SHAPE = re.compile(r"\s*eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\s*")
TOKEN_TYPES = {
    "jwt": "urn:ietf:params:oauth:token-type:jwt",
    "vault": "urn:broker:token-type:vault-token",
    "aws": "urn:broker:token-type:aws-credentials",
}


def _out(args: argparse.Namespace, data: Any, human: Callable[[], str]) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else human())


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c) if r.get(c) is not None else "-") for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _fields(data: dict[str, Any]) -> str:
    width = max(len(k) for k in data)
    return "\n".join(
        f"{k.ljust(width)}  {json.dumps(v) if isinstance(v, dict | list) else v}"
        for k, v in data.items()
    )


def _read_secret(path: str, flag: str) -> str:
    """A token from the file ``path``, or ``-`` for stdin (never from argv, where ``ps`` would
    show it). Raises ConfigError, naming ``flag``, when ``path`` is a token itself or names no
    file; the value is never echoed, since it may be a secret."""
    if path == "-":
        text = sys.stdin.read()
    else:
        file = Path(path)
        if not file.exists():
            if _JWT_SHAPE.fullmatch(path):
                raise ConfigError(
                    f"{flag} takes the path of a file holding the token (or - for stdin), "
                    "and this is a token: write it to a file, or pipe it with "
                    f"{flag} - (a token on the command line is visible to every user of "
                    "this machine)"
                )
            raise ConfigError(
                f"{flag}: no such file (give the path of a file holding the token, or - for stdin)"
            )
        text = file.read_text()
    if not text.strip():
        raise ConfigError(f"{flag}: {'stdin' if path == '-' else path} holds no token")
    return text.strip()


def _token_source(path: str, flag: str) -> Callable[[], str]:
    """The token in ``path``, read again at each call: a token file that its platform refreshes
    in place (a Kubernetes projected token) stays valid through a long wait. Standard input
    (``-``) is read once."""
    if path == "-":
        token = _read_secret(path, flag)
        return lambda: token
    return lambda: _read_secret(path, flag)


def _timeout(text: str) -> int:
    """``--timeout``: a duration (``10m``, ``600``), or 0 to look once without waiting."""
    if text.strip() == "0":
        return 0
    return _duration(text, "--timeout")


class WaitEnded(Exception):
    """An awaited approval ended otherwise than approved, or is still pending at the timeout."""

    def __init__(self, exit_code: int, code: str, description: str, view: dict[str, Any]):
        super().__init__(description)
        self.exit_code, self.code, self.description = exit_code, code, description
        self.fields = {"approval_id": view.get("id"), "approval_status": view.get("status")}


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _await_approval(get: Callable[[], dict[str, Any]], timeout: int) -> dict[str, Any]:
    """Poll ``get`` (one approval request) with exponential backoff until it is no longer
    pending; return it when approved. Raises WaitEnded (exit 1) when it ended otherwise and
    (exit 5) when it is still pending after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = WAIT_FIRST_S
    while True:
        view = get()
        if view["status"] != "pending":
            break
        left = deadline - time.monotonic()
        if left <= 0:
            progress = f"{view['approvals']} of {view['approvals_required']} approval(s)"
            raise WaitEnded(
                EXIT_TIMEOUT,
                "timeout",
                f"approval {view['id']} is still pending after {timeout} s ({progress}); "
                "wait again, or give a longer --timeout",
                view,
            )
        _sleep(min(pause, left))
        pause = min(pause * 2, WAIT_MAX_S)
    if view["status"] == "approved":
        return view
    why = f"approval {view['id']} is {view['status']}"
    denials = [r for r in view.get("reviews", []) if r["decision"] == "deny"]
    if denials:
        by = denials[0]["reviewer"]
        why += f": denied by {by['subject']} ({by['issuer']}): {denials[0]['reason']}"
    raise WaitEnded(EXIT_REFUSED, f"approval_{view['status']}", _printable(why), view)


def _printable(text: str) -> str:
    """``text`` with control characters escaped: what a requester wrote (reason, lineage,
    claims) must not move a reviewer's cursor or forge lines on their terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _url(args: argparse.Namespace) -> str:
    """The broker's base URL from --url, else BROKER_URL, else the default. Raises ConfigError
    naming where a URL without an http(s) scheme came from."""
    url, source = args.url, "--url"
    if url is None:
        url, source = os.environ.get("BROKER_URL") or DEFAULT_URL, "BROKER_URL"
    problem = url_problem(url)
    if problem:
        hint = f" (did you mean http://{url}?)" if "://" not in url else ""
        raise ConfigError(f"{source} {url!r} is not a broker URL{hint}: {problem}")
    return str(url)


def _client(args: argparse.Namespace, *, bearer: bool = False) -> BrokerClient:
    url, token = _url(args), None
    if bearer:
        if getattr(args, "bearer_file", None):
            token = _read_secret(args.bearer_file, "--bearer-file")
        else:
            token = os.environ.get("BROKER_TOKEN")
        if not token:
            raise ConfigError("this command needs your token: --bearer-file FILE or BROKER_TOKEN")
    return BrokerClient(url, bearer=token)


# --- commands -------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.cli.serve import serve

    serve(
        policy=args.policy,
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        dev=args.dev,
        workers=args.workers,
    )
    return EXIT_OK


def cmd_dev_token(args: argparse.Namespace) -> int:
    claims: dict[str, str] = {}
    for item in args.claim or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--claim: expected KEY=VALUE, got {item!r}")
        claims[key] = value
    roles = [r for r in args.roles.split(",") if r] if args.roles is not None else None
    token = _client(args).dev_token(
        sub=args.sub, claims=claims, aud=args.aud, ttl=_ttl(args.ttl), roles=roles
    )
    _out(args, {"token": token}, lambda: token)
    return EXIT_OK


def _ttl(text: str) -> int:
    return _duration(text, "--ttl")


def _duration(text: str, flag: str) -> int:
    try:
        return parse_duration(text if not text.isdigit() else int(text))
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _lineage(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--lineage: not JSON ({exc.msg})") from None


def cmd_token_exchange(args: argparse.Namespace) -> int:
    client = _client(args)
    token = _token_source(args.token, "--token")
    ttl = _ttl(args.ttl) if args.ttl else None
    approval_id = args.approval_id
    if args.emergency and (args.wait or approval_id):
        raise ConfigError("--emergency is reviewed after the fact: no --wait, no --approval-id")
    if args.wait:
        timeout = _timeout(args.timeout)
        if approval_id is None:
            approval_id = _open_ahead(client, token(), args, ttl)
        if approval_id is not None:
            wanted = approval_id
            _await_approval(lambda: client.get_approval(wanted, bearer=token()), timeout)
    result = client.exchange(
        token(),
        model=args.model,
        action=args.action,
        requested_token_type=TOKEN_TYPES[args.backend],
        audience=args.audience,
        reason=args.reason,
        lineage=args.lineage,
        approval_id=approval_id,
        requested_ttl=str(ttl) if ttl else None,
        emergency="true" if args.emergency else None,
    )
    if "emergency" in result:
        said = result["emergency"]
        print(
            f"EMERGENCY use recorded: approval {said['approval_id']} must be approved by "
            f"{said['ratify_by']}",
            file=sys.stderr,
        )
    _exchange_out(args, result)
    return EXIT_OK


def _exchange_out(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """A broker JWT or Vault token alone (for ``$(...)``); a database login or AWS credentials
    with every part by name. ``--format env``: ``NAME=value`` lines of every part."""
    from broker.client.credentials import BrokerJWT, VaultToken, env_lines, parse_answer

    if args.format == "json" or args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    try:
        credential = parse_answer(result)
    except ValueError as exc:
        raise ClientError(None, "not_a_broker", str(exc)) from None
    if args.format == "env":
        print(env_lines(credential), end="")
    elif isinstance(credential, BrokerJWT | VaultToken):
        print(credential.token)
    else:
        print(_fields(credential.fields()))


def _open_ahead(
    client: BrokerClient, token: str, args: argparse.Namespace, ttl: int | None
) -> str | None:
    """The approval request for exactly this exchange (opened now, or the live one), or None
    when the action needs no approval. NOTE: opening does not spend a single-use token, so the
    exchange after the wait can still use it."""
    try:
        view = client.open_approval(
            bearer=token,
            model=args.model,
            action=args.action,
            requested_token_type=TOKEN_TYPES[args.backend],
            audience=args.audience,
            requested_ttl=ttl,
            lineage=_lineage(args.lineage),
            reason=args.reason,
        )
    except ClientError as exc:
        if exc.code == "invalid_request" and exc.fields.get("approvals_required") == 0:
            return None
        raise
    return str(view["id"])


def cmd_token_introspect(args: argparse.Namespace) -> int:
    result = _client(args, bearer=True).introspect(_read_secret(args.token, "--token"))
    _out(args, result, lambda: _fields(result))
    return EXIT_OK if result.get("active") else EXIT_REFUSED


GRANT_COLUMNS = ("id", "status", "model", "action", "subject", "backend", "issued_at", "expires_at")


def cmd_grants_list(args: argparse.Namespace) -> int:
    grants = _client(args, bearer=True).list_grants(
        model=args.model, subject=args.subject, status=args.status, limit=str(args.limit)
    )
    _out(args, grants, lambda: _table(grants, GRANT_COLUMNS))
    return EXIT_OK


def cmd_grants_show(args: argparse.Namespace) -> int:
    grant = _client(args, bearer=True).get_grant(args.grant_id)
    _out(args, grant, lambda: _fields(grant))
    return EXIT_OK


def cmd_grants_revoke(args: argparse.Namespace) -> int:
    grant = _client(args, bearer=True).revoke(args.grant_id, args.reason)
    _out(args, grant, lambda: f"revoked {grant['id']} (backend: {grant['backend_revocation']})")
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    result = _client(args, bearer=True).revoke_matching(
        args.reason, model=args.model, subject=args.subject, issuer=args.issuer
    )
    said = f"revoked {len(result['revoked'])} grant(s)"
    if result.get("spared"):
        said += (
            f"; spared {len(result['spared'])} of the owners' rollback path (your role is scoped)"
        )
    _out(args, result, lambda: said)
    return EXIT_OK


APPROVAL_COLUMNS = (
    "id",
    "status",
    "model",
    "action",
    "tier",
    "approvals",
    "approvals_required",
    "expires_at",
)


def _approval_human(view: dict[str, Any]) -> str:
    """Everything a reviewer approves, and what changed since the last approval of the same
    model and action. Values the requester chose are shown with control characters escaped."""
    who = view["requester"]
    target = f"{view['action']} on {view['model']} via {view['backend']}"
    people = f"; counts as {', '.join(who['people'])}" if who.get("people") else ""
    lines = [
        f"{view['id']}  {view['status']}  {target}  (tier {view['tier']}, rule {view['rule']})",
        f"requester  {who['subject']} ({who['issuer']}){people}",
        *(f"  claim {name} = {value}" for name, value in sorted(who.get("claims", {}).items())),
        f"credential {view.get('requested_token_type')}, audience {view.get('audience')}, "
        f"ttl {view.get('ttl_seconds')} s",
        f"reason     {view.get('reason') or '-'}",
        *_lineage_lines(view.get("lineage")),
        f"approvals  {view['approvals']} of {view['approvals_required']}"
        + ("  (rollback test required)" if view["rollback_required"] else ""),
        f"expires    {view['approved_until'] or view['expires_at']}",
    ]
    lines += [
        f"  {r['decision']:8} {r['reviewer']['subject']} ({r['reviewer']['issuer']}): {r['reason']}"
        for r in view["reviews"]
    ]
    if "differs_from_last_approved" in view:
        lines += _since_last(view)
    return "\n".join(_printable(line) for line in lines)


def _artifact(item: dict[str, Any]) -> str:
    return f"{item['uri']}  " + (
        f"sha256:{item['sha256']}" if item.get("sha256") else "(no digest)"
    )


def _lineage_lines(lineage: dict[str, Any] | None) -> list[str]:
    if not lineage:
        return ["lineage    -"]
    lines = ["lineage"]
    for kind in ("datasets", "weights", "prompts"):
        lines += [f"  {kind[:-1]:8} {_artifact(item)}" for item in lineage.get(kind, [])]
    point = lineage.get("rollback_point")
    if point:
        lines.append(f"  rollback {_artifact(point)}")
        test = point.get("test")
        lines.append(
            f"    evidence {test['ref']}: {test['result']} at {test['tested_at']}"
            if test
            else "    evidence none"
        )
    return lines


def _since_last(view: dict[str, Any]) -> list[str]:
    last = view["differs_from_last_approved"]
    if last is None:
        return [f"no earlier approval of {view['action']} on {view['model']}"]
    head = f"since {last['approval_id']} (approved {last['decided_at']})"
    if not last["changes"]:
        return [f"{head}: nothing changed"]
    return [f"{head}:"] + [
        f"  {c['field']}: {json.dumps(c['last_approved'])} -> {json.dumps(c['this'])}"
        for c in last["changes"]
    ]


def cmd_approvals_request(args: argparse.Namespace) -> int:
    client = BrokerClient(_url(args), bearer=_read_secret(args.token, "--token"))
    view = client.open_approval(
        model=args.model,
        action=args.action,
        requested_token_type=TOKEN_TYPES[args.backend],
        audience=args.audience,
        requested_ttl=_ttl(args.ttl) if args.ttl else None,
        lineage=_lineage(args.lineage),
        reason=args.reason,
    )
    _out(args, view, lambda: _approval_human(view))
    return EXIT_OK


def cmd_approvals_wait(args: argparse.Namespace) -> int:
    """Wait until the request is decided; exit 0 when approved (see WaitEnded otherwise). The
    token (the workload's --token, or your --bearer-file) is read again at each poll."""
    timeout = _timeout(args.timeout)
    if args.token:
        bearer = _token_source(args.token, "--token")
    elif args.bearer_file:
        bearer = _token_source(args.bearer_file, "--bearer-file")
    else:
        token = os.environ.get("BROKER_TOKEN")
        if not token:
            raise ConfigError(
                "wait needs a token: --token FILE, --bearer-file FILE or BROKER_TOKEN"
            )
        bearer = lambda: token  # noqa: E731
    client = BrokerClient(_url(args))
    view = _await_approval(lambda: client.get_approval(args.approval_id, bearer=bearer()), timeout)
    _out(args, view, lambda: _approval_human(view))
    return EXIT_OK


def cmd_approvals_list(args: argparse.Namespace) -> int:
    found = _client(args, bearer=True).list_approvals(status=args.status, model=args.model)
    _out(args, found, lambda: _table(found, APPROVAL_COLUMNS))
    return EXIT_OK


def cmd_approvals_show(args: argparse.Namespace) -> int:
    view = _client(args, bearer=True).get_approval(args.approval_id)
    _out(args, view, lambda: _approval_human(view))
    return EXIT_OK


def cmd_approvals_review(args: argparse.Namespace) -> int:
    if args.approvals_cmd == "cancel":
        client = BrokerClient(_url(args), bearer=_read_secret(args.token, "--token"))
    else:
        client = _client(args, bearer=True)
    view = client.act_on_approval(args.approval_id, args.approvals_cmd, args.reason)
    _out(args, view, lambda: _approval_human(view))
    return EXIT_OK


def cmd_lineage(args: argparse.Namespace) -> int:
    result = _client(args, bearer=True).lineage(args.model)
    history = result["history"]

    def human() -> str:
        if not history:
            return f"no model-altering grants for {args.model}"
        out = []
        for g in history:
            point = (g.get("lineage") or {}).get("rollback_point") or {}
            out.append(
                f"{g['issued_at']}  {g['action']}  {g['subject']} ({g['issuer']})  {g['status']}"
            )
            out.append(
                f"  grant {g['id']}, approval {g['approval_id']}, policy {g['policy_digest']}"
            )
            out += [
                f"  {r['decision']} by {r['reviewer']['subject']}: {r['reason']}"
                for r in g["reviews"]
            ]
            for kind in ("datasets", "weights", "prompts"):
                out += [f"  {kind[:-1]} {a['uri']}" for a in (g.get("lineage") or {}).get(kind, [])]
            if point:
                out.append(f"  rollback point {point['uri']}")
        return "\n".join(out)

    _out(args, result, human)
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Run the broker's housekeeping once, here: revoke backend credentials with no active
    grant, settle grants stuck issuing, retry due revocations."""
    from broker.runtime import build_broker
    from broker.settings import Settings

    overrides: dict[str, Any] = {"data_dir": args.data_dir}
    if args.policy:
        overrides["policy"] = args.policy
    if args.dev:
        overrides["dev"] = True
    broker = build_broker(Settings(**overrides))
    try:
        revocations = broker.grants.revocations
        stuck = revocations.settle_stuck(older_than_s=args.min_age)
        orphans = revocations.reconcile(min_age_s=args.min_age)
        confirmed = revocations.process()
    finally:
        broker.close()
    data = {"stuck_settled": stuck, "orphans_revoked": orphans, "revocations_confirmed": confirmed}
    human = (
        f"settled {stuck} stuck grant(s); revoked {len(orphans)} orphan credential(s); "
        f"{confirmed} queued revocation(s) confirmed"
    )
    _out(args, data, lambda: human)
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    result = _client(args, bearer=True).rotate_keys()
    _out(args, result, lambda: f"current key {result['kid']}; retired {result['retired_kid']}")
    return EXIT_OK


def _aws_warnings(policy: Any) -> list[str]:
    """Actions that aws rules reach but whose TTL does not suit AWS STS."""
    from broker.backends.aws import check_action_ttl

    warnings = []
    for name in sorted({a for r in policy.rules if "aws" in r.backends for a in r.actions}):
        action = policy.actions[name]
        tier = policy.tiers.get(action.tier)
        ttl = min(action.max_ttl, tier.max_ttl) if tier else action.max_ttl
        problem = check_action_ttl(ttl)
        if problem:
            warnings.append(f"actions.{name} (aws): {problem}")
    return warnings


def _dev_warnings(policy: Any) -> list[str]:
    return [
        f"issuers[{index}].dev: issuer {issuer.name!r} is a dev issuer: `broker serve` refuses "
        "this policy without --dev"
        for index, issuer in enumerate(policy.issuers)
        if issuer.dev
    ]


def cmd_policy_check(args: argparse.Namespace) -> int:
    """Everything ``broker serve`` would check; dev issuers are a warning (``serve`` without
    ``--dev`` refuses them), unless ``--dev`` says the policy is meant for a dev broker."""
    from broker.policy import load_policy

    loaded = load_policy(Path(args.file), dev_mode=True)
    p = loaded.policy
    warnings = ([] if args.dev else _dev_warnings(p)) + _aws_warnings(p)
    summary: dict[str, Any] = {
        "file": args.file,
        "digest": loaded.digest,
        "issuers": len(p.issuers),
        "actions": len(p.actions),
        "models": len(p.models),
        "rules": len(p.rules),
        "warnings": warnings,
    }

    def human() -> str:
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        counts = {k: v for k, v in summary.items() if k != "warnings"}
        return "\n".join([f"ok {args.file} {loaded.digest}", _fields(counts)])

    _out(args, summary, human)
    return EXIT_OK


def cmd_aws_credential_process(args: argparse.Namespace) -> int:
    """Exchange the workload's token for model-scoped AWS credentials and print them as an
    AWS ``credential_process`` (Version 1) JSON, for the AWS CLI and every AWS SDK. The answer
    is cached (0600) and printed again by later runs until shortly before it expires, so that a
    single-use token serves every process of a job."""
    from broker.client.aws_cache import CredentialProcessCache, cache_key, default_dir
    from broker.client.credentials import AwsCredentials, parse_answer

    if not args.token_file:
        raise ConfigError("--token-file (or BROKER_SUBJECT_TOKEN_FILE) names the workload token")
    url, ttl = _url(args), _ttl(args.ttl) if args.ttl else None
    cache = None if args.no_cache else CredentialProcessCache(args.cache_dir or default_dir())
    key = cache_key(
        url, args.profile, args.model, args.action, str(Path(args.token_file).absolute()), str(ttl)
    )
    cached = cache.get(key) if cache else None
    if cached is not None:
        print(cached)
        return EXIT_OK
    answer = BrokerClient(url).exchange(
        _read_secret(args.token_file, "--token-file"),
        model=args.model,
        action=args.action,
        requested_token_type=TOKEN_TYPES["aws"],
        reason=args.reason,
        requested_ttl=str(ttl) if ttl else None,
    )
    credential = parse_answer(answer)
    if not isinstance(credential, AwsCredentials):
        raise ClientError(None, "not_a_broker", "the answer holds no AWS credentials")
    text = credential.process_json()
    if cache:
        try:
            cache.put(key, text)
        except OSError as exc:
            print(f"warning: not cached ({cache.dir}: {exc.strerror or exc})", file=sys.stderr)
    print(text)
    return EXIT_OK


def _dev_key_sets(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    """The dev issuer's JWKS for the policy's dev issuers, from the dev broker's store."""
    from broker.cli.keys import key_store
    from broker.dev.issuer import DevIssuer, dev_issuer_key

    keys = key_store(Path(args.data_dir), None, args.kek_file)
    try:
        key = dev_issuer_key(keys, create=False)
    finally:
        keys.store.close()
    if key is None:
        raise ConfigError(
            f"no dev issuer key in {args.data_dir}'s store: no --dev broker ran there"
        )
    return DevIssuer(key, loaded).static_key_sets()


def cmd_policy_explain(args: argparse.Namespace) -> int:
    from broker.identity.jwks import JWKSCache
    from broker.identity.verifier import Verifier
    from broker.policy import Outcome, decide, load_policy
    from broker.settings import EXAMPLE_POLICY

    policy_file = Path(args.policy) if args.policy else (EXAMPLE_POLICY if args.dev else None)
    if policy_file is None:
        raise ConfigError("no policy: pass --policy FILE (or --dev for the example policy)")
    loaded = load_policy(policy_file, dev_mode=args.dev)
    static = _dev_key_sets(args, loaded) if args.dev else None
    verifier = Verifier(loaded.policy, JWKSCache(static=static), roles_for=loaded.roles_for)
    identity = verifier.verify_workload(_read_secret(args.token, "--token"))
    decision = decide(loaded, identity, args.model, args.action, args.backend)
    data = {
        "outcome": str(decision.outcome),
        "rule": decision.rule,
        "tier": decision.tier,
        "ttl_seconds": decision.ttl_seconds,
        "approvals_required": decision.approvals_required,
        "issuer": identity.issuer_name,
        "subject": identity.subject,
        "reasons": decision.reasons(),
        "policy_digest": loaded.digest,
    }

    def human() -> str:
        head = f"{decision.outcome}: {identity.subject} ({identity.issuer_name}) → "
        head += f"{args.action} on {args.model} via {args.backend}"
        if decision.rule:
            ttl = decision.ttl_seconds
            head += f"\nmatched rule {decision.rule} (tier {decision.tier}, ttl {ttl}s)"
        return "\n".join([head, *(f"  - {r}" for r in decision.reasons())])

    _out(args, data, human)
    exits = {Outcome.ALLOW: EXIT_OK, Outcome.APPROVAL_REQUIRED: EXIT_APPROVAL}
    return exits.get(decision.outcome, EXIT_REFUSED)


def _open_log(args: argparse.Namespace) -> tuple[Any, Any]:
    """The store and audit log named by --data-dir / --database-url, the log's keys opened
    with the KEK (--kek-file); no server needed, nor a data dir with --database-url and
    --kek-file. The anchor is the data dir's, if the data dir exists."""
    from broker.audit.log import AuditLog
    from broker.cli.keys import key_store

    data_dir = Path(args.data_dir)
    keys = key_store(data_dir, args.database_url, args.kek_file)
    try:
        audit = AuditLog.from_store(keys, data_dir=data_dir if data_dir.is_dir() else None)
    except BaseException:
        keys.store.close()
        raise
    return keys.store, audit


def _trusted(args: argparse.Namespace, verifier: Any) -> tuple[list[Any], list[Any]]:
    """The checkpoints held outside the store: ``--trusted-checkpoint`` and the data dir's
    anchor, verified; and the problems of those that do not verify."""
    from broker.audit.anchor import ANCHOR_FILE
    from broker.audit.checkpoint import CheckpointError
    from broker.audit.verify import Problem, Trusted

    held: list[Any] = []
    problems: list[Any] = []
    sources = [(Path(args.data_dir) / ANCHOR_FILE, "the broker's anchor (audit-anchor)", False)]
    if args.trusted_checkpoint:
        where = args.trusted_checkpoint
        sources.append((Path(where), f"the trusted checkpoint {where}", True))
    for path, label, required in sources:
        if not path.exists():
            if required:
                raise ConfigError(f"--trusted-checkpoint: no such file: {path}")
            continue
        try:
            held.append(Trusted(label, verifier.verify(path.read_bytes())))
        except CheckpointError as exc:
            problems.append(Problem(None, f"{label} does not verify: {exc}"))
    return held, problems


def _verify_export(path: Path, key: str) -> Any:
    """A whole export (a directory) or a scoped one (a file)."""
    from broker.audit.export import verify_export
    from broker.audit.scoped import verify_scoped

    if path.is_dir():
        return verify_export(path, key)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--export: no such file or directory: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--export: {path} is not a JSON scoped export: {exc}") from None
    return verify_scoped(doc, key)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from broker.audit.checkpoint import NoteVerifier
    from broker.audit.export import verify_store
    from broker.audit.state import snapshot, verify_state
    from broker.audit.verify import Problem

    held: list[Any] = []
    if args.export:
        if not args.key:
            raise ConfigError("--export needs --key (the log's verifier key, from a trusted place)")
        if args.trusted_checkpoint:
            raise ConfigError(
                "--trusted-checkpoint checks the store; for an export, its proof.json's "
                "previous checkpoint links it to one you hold"
            )
        report = _verify_export(Path(args.export), args.key)
    else:
        store, audit = _open_log(args)
        verifier = NoteVerifier.from_vkey(args.key or audit.verifier_key())
        held, unusable = _trusted(args, verifier)
        try:
            with store.read() as session:
                conn = snapshot(session)  # one snapshot for the log and the tables
                report = verify_store(session, verifier, held)
                state = [] if args.log_only else verify_state(conn)
        finally:
            store.close()
        report.problems[:0] = unusable
        report.problems += [Problem(None, str(finding)) for finding in state]
    data = {
        "ok": report.ok,
        "start": report.start,
        "size": report.size,
        "checkpoints": report.checkpoints,
        "latest_checkpoint": report.latest_checkpoint,
        "trusted": [{"label": t.label, "size": t.checkpoint.size} for t in held],
        "first_bad_index": report.first_bad_index,
        "problems": [str(p) for p in report.problems],
    }

    models = getattr(report, "models", None)
    if models is not None:
        data |= {"models": list(models), "entries": report.entries}

    def human() -> str:
        if not report.ok:
            return "FAILED:\n" + "\n".join(f"  - {p}" for p in report.problems)
        if models is not None:
            return (
                f"ok: {report.entries} entries of {' '.join(models)} are in the log of the signed "
                f"checkpoint {report.size}; {report.checkpoints - 1} earlier checkpoint(s) are "
                "consistent with it (this cannot show that none of these models' entries was "
                "left out: docs/audit.md)"
            )
        said = f"ok: entries {report.start}..{report.size - 1}"
        if report.latest_checkpoint or held:
            said += f" verify; {report.checkpoints} signed checkpoint(s) in the store"
            said += "".join(f"; consistent with {t.label}" for t in held)
        else:
            said += (
                " are consistent with the hashes recorded at append time; no signed checkpoint "
                "covers them yet"
            )
        if not args.export and not args.log_only:
            said += "; the grants, approvals and revocation tables agree with the log"
        return said

    _out(args, data, human)
    return EXIT_OK if report.ok else EXIT_REFUSED


def cmd_audit_monitor(args: argparse.Namespace) -> int:
    """Check the broker's log as a monitor (broker.client.monitor), once or every --interval
    seconds. NOTE: lean imports only: this runs on auditors' machines."""
    import time

    from broker.client.monitor import Monitor, MonitorAlarm, StateError

    url, state = _url(args), Path(args.state)
    if not args.interval > 0:
        raise ConfigError(f"--interval: expected a number of seconds above 0, got {args.interval}")
    while True:
        try:
            checked = Monitor(_client(args, bearer=True), url, state, args.key).check()
        except MonitorAlarm as exc:
            if args.json:
                _print_error({"error": "audit_inconsistent", "error_description": str(exc)})
            else:
                print(f"ALARM: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        except StateError as exc:
            raise ConfigError(str(exc)) from None
        except ClientError as exc:
            if args.once:
                raise
            _failed(args, exc)  # nothing learned; the next round tries again
        else:
            if checked.pinned_now:
                print(
                    "warning: pinned the verifier key the broker served (trust on first use); "
                    "pass --key from a trusted place instead",
                    file=sys.stderr,
                )
            if checked.previous is None:
                human = f"ok: checkpoint {checked.size} verified and remembered in {state}"
            else:
                human = f"ok: checkpoint {checked.size} extends {checked.previous}"
            result = {"ok": True, "previous": checked.previous, "size": checked.size}
            _out(args, result, human.__str__)
        if args.once:
            return EXIT_OK
        time.sleep(args.interval)


def cmd_audit_export(args: argparse.Namespace) -> int:
    from broker.audit.export import export_log

    if args.model:
        return _audit_export_scoped(args)
    store, audit = _open_log(args)
    try:
        with store.write() as session:
            manifest = export_log(session, audit, args.since, Path(args.dir))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        store.close()
    data = {**manifest, "key": audit.verifier_key(), "directory": args.dir}
    human = f"exported entries {manifest['since']}..{manifest['size'] - 1} to {args.dir}\n"
    human += f"verify with: broker audit verify --export {args.dir} --key {audit.verifier_key()}"
    _out(args, data, lambda: human)
    return EXIT_OK


def _audit_export_scoped(args: argparse.Namespace) -> int:
    """``audit export FILE --model GLOB``: one JSON document (broker.audit.scoped)."""
    from broker.audit.scope import ModelScope
    from broker.audit.scoped import export_scoped

    if args.since:
        raise ConfigError("--since is for whole exports; a scoped export covers the whole log")
    store, audit = _open_log(args)
    try:
        with store.write() as session:
            doc = export_scoped(session, audit, ModelScope(args.model))
    finally:
        store.close()
    Path(args.dir).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    data = {"file": args.dir, "models": doc["models"], "size": doc["size"]}
    data |= {"entries": len(doc["entries"]), "key": audit.verifier_key()}
    human = f"exported {len(doc['entries'])} entries of {' '.join(doc['models'])} to {args.dir}\n"
    human += f"verify with: broker audit verify --export {args.dir} --key {audit.verifier_key()}"
    _out(args, data, lambda: human)
    return EXIT_OK


def cmd_audit_proof(args: argparse.Namespace) -> int:
    import base64
    import datetime as dt

    from sqlalchemy import select

    from broker.audit.merkle import leaf_hash, verify_inclusion
    from broker.store.tables import EventRow

    store, audit = _open_log(args)
    try:
        with store.write() as session:
            row = session.scalars(
                select(EventRow).where(
                    EventRow.grant_id == args.grant_id, EventRow.type == "exchange.allowed"
                )
            ).first()
            if row is None:
                raise ConfigError(f"no issuance event for grant {args.grant_id}")
            signed = audit.sign_checkpoint(session, dt.datetime.now(dt.UTC))
            proof = audit.inclusion_proof(session, row.idx, signed.size)
            leaf = row.body
    finally:
        store.close()
    ok = verify_inclusion(leaf_hash(leaf), row.idx, signed.size, proof, signed.root)
    data = {
        "grant_id": args.grant_id,
        "index": row.idx,
        "size": signed.size,
        "leaf": base64.b64encode(leaf).decode(),
        "proof": [base64.b64encode(h).decode() for h in proof],
        "checkpoint": signed.note,
        "verified": ok,
    }
    _out(args, data, lambda: _fields({k: v for k, v in data.items() if k != "checkpoint"}))
    return EXIT_OK if ok else EXIT_REFUSED


# --- parser ---------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, *, url: bool = True, bearer: bool = False) -> None:
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    if url:
        _url_flag(p)
    if bearer:
        p.add_argument(
            "--bearer-file", help="file holding your own OIDC token (default: $BROKER_TOKEN)"
        )


def _wait_timeout(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--timeout",
        default=DEFAULT_WAIT,
        help=f"how long to wait for a decision (default {DEFAULT_WAIT}; 0: look once)",
    )


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {number}")
    return number


def _url_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"broker base URL (default: $BROKER_URL, else {DEFAULT_URL})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="broker", description="The model-credential broker.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the broker")
    p.add_argument("--policy", type=Path)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--dev", action="store_true", help="embedded default with a dev issuer (loopback only)"
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="processes of this broker on this machine, sharing its store (default 1)",
    )
    p.set_defaults(func=cmd_serve)

    dev = sub.add_parser("dev", help="dev-mode helpers").add_subparsers(
        dest="dev_cmd", required=True
    )
    p = dev.add_parser(
        "token", help="mint a workload (or, with --roles, person) token from a dev broker"
    )
    p.add_argument("--sub", required=True)
    p.add_argument("--claim", action="append", metavar="KEY=VALUE")
    p.add_argument("--aud")
    p.add_argument("--ttl", default="10m")
    p.add_argument("--roles", help="comma-separated roles: makes a person token")
    _common(p)
    p.set_defaults(func=cmd_dev_token)

    tok = sub.add_parser("token", help="exchange and inspect tokens").add_subparsers(
        dest="token_cmd", required=True
    )
    p = tok.add_parser("exchange", help="exchange a workload token for a credential")
    p.add_argument("--token", required=True, help="file with the workload token, or - for stdin")
    p.add_argument("--model", required=True)
    p.add_argument("--action", required=True)
    p.add_argument("--backend", choices=sorted(TOKEN_TYPES), default="jwt")
    p.add_argument("--audience")
    p.add_argument("--reason")
    p.add_argument("--lineage", help="JSON: datasets, weights, prompts, rollback_point")
    p.add_argument("--approval-id")
    p.add_argument("--ttl", help="requested lifetime (capped by the action's max_ttl)")
    p.add_argument(
        "--emergency",
        action="store_true",
        help="break-glass, where the policy allows it: issued now with a capped lifetime, "
        "loudly, and reviewed after (needs --reason)",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="if the action needs approval: open the request (or use --approval-id), wait "
        "until it is decided, then exchange (the --token file is read again)",
    )
    p.add_argument(
        "--format",
        choices=["text", "json", "env"],
        default="text",
        help="text (default): the token alone, or every part of a database login or AWS "
        "credentials by name; json: the broker's answer (as --json); env: NAME=value lines",
    )
    _wait_timeout(p)
    _common(p)
    p.set_defaults(func=cmd_token_exchange)
    p = tok.add_parser("introspect", help="is this broker JWT's grant active? (RFC 7662)")
    p.add_argument("--token", required=True, help="file with the broker JWT, or - for stdin")
    _common(p, bearer=True)
    p.set_defaults(func=cmd_token_introspect)

    grants = sub.add_parser("grants", help="list, show and revoke grants").add_subparsers(
        dest="grants_cmd", required=True
    )
    p = grants.add_parser("list")
    p.add_argument("--model")
    p.add_argument("--subject")
    p.add_argument("--status", choices=["active", "expired", "revoked"])
    p.add_argument("--limit", type=int, default=100)
    _common(p, bearer=True)
    p.set_defaults(func=cmd_grants_list)
    p = grants.add_parser("show")
    p.add_argument("grant_id")
    _common(p, bearer=True)
    p.set_defaults(func=cmd_grants_show)
    p = grants.add_parser("revoke")
    p.add_argument("grant_id")
    p.add_argument("--reason", required=True)
    _common(p, bearer=True)
    p.set_defaults(func=cmd_grants_revoke)

    p = sub.add_parser("revoke", help="revoke every active grant of a model, subject or issuer")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model")
    target.add_argument("--subject")
    target.add_argument("--issuer")
    p.add_argument("--reason", required=True)
    _common(p, bearer=True)
    p.set_defaults(func=cmd_revoke)

    appr = sub.add_parser("approvals", help="just-in-time approval requests").add_subparsers(
        dest="approvals_cmd", required=True
    )
    p = appr.add_parser("request", help="open a request ahead of time, with the workload's token")
    p.add_argument("--token", required=True, help="file with the workload token, or - for stdin")
    p.add_argument("--model", required=True)
    p.add_argument("--action", required=True)
    p.add_argument("--backend", choices=sorted(TOKEN_TYPES), default="jwt")
    p.add_argument("--audience", help="the broker JWT audience the exchange will ask for")
    p.add_argument("--ttl", help="the lifetime the exchange will ask for")
    p.add_argument("--lineage", help="JSON: datasets, weights, prompts, rollback_point")
    p.add_argument("--reason")
    _common(p)
    p.set_defaults(func=cmd_approvals_request)
    p = appr.add_parser(
        "wait", help="wait until a request is decided: exit 0 approved, 1 otherwise, 5 timeout"
    )
    p.add_argument("approval_id")
    p.add_argument("--token", help="file with the requesting workload's token (default: yours)")
    _wait_timeout(p)
    _common(p, bearer=True)
    p.set_defaults(func=cmd_approvals_wait)
    p = appr.add_parser("list")
    p.add_argument(
        "--status", choices=["pending", "approved", "denied", "cancelled", "expired", "used"]
    )
    p.add_argument("--model")
    _common(p, bearer=True)
    p.set_defaults(func=cmd_approvals_list)
    p = appr.add_parser("show")
    p.add_argument("approval_id")
    _common(p, bearer=True)
    p.set_defaults(func=cmd_approvals_show)
    for verb in ("approve", "deny"):
        p = appr.add_parser(verb)
        p.add_argument("approval_id")
        p.add_argument("--reason", required=True)
        _common(p, bearer=True)
        p.set_defaults(func=cmd_approvals_review)
    p = appr.add_parser("cancel", help="cancel your own pending request (the workload's token)")
    p.add_argument("approval_id")
    p.add_argument("--token", required=True, help="file with the workload token, or - for stdin")
    p.add_argument("--reason", required=True)
    _common(p)
    p.set_defaults(func=cmd_approvals_review)

    # Imported here: broker.cli.rollback_tests and broker.cli.agent use this module's helpers
    # (no import cycle).
    from broker.cli.rollback_tests import add_commands

    add_commands(sub)
    from broker.cli.agent import add_command as add_agent

    add_agent(sub)

    p = sub.add_parser("lineage", help="who changed a model, with what, approved by whom")
    p.add_argument("model")
    _common(p, bearer=True)
    p.set_defaults(func=cmd_lineage)

    aws = sub.add_parser("aws", help="AWS helpers").add_subparsers(dest="aws_cmd", required=True)
    p = aws.add_parser(
        "credential-process",
        help="print AWS credential_process JSON for one model and action (for ~/.aws/config)",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--action", required=True)
    p.add_argument(
        "--token-file",
        default=os.environ.get("BROKER_SUBJECT_TOKEN_FILE"),
        help="the workload identity token (default: $BROKER_SUBJECT_TOKEN_FILE)",
    )
    p.add_argument("--ttl", help="requested lifetime, at least 15m (AWS's minimum)")
    p.add_argument("--reason")
    p.add_argument(
        "--profile",
        default=os.environ.get("AWS_PROFILE"),
        help="part of the cache key (default: $AWS_PROFILE)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="where answers are cached, 0600 (default: ~/.cache/broker/credential-process)",
    )
    p.add_argument("--no-cache", action="store_true", help="exchange at every run")
    _url_flag(p)
    p.set_defaults(func=cmd_aws_credential_process)

    p = sub.add_parser("reconcile", help="revoke backend credentials that no active grant owns")
    p.add_argument("--policy", type=Path)
    p.add_argument(
        "--data-dir", type=Path, default=Path(os.environ.get("BROKER_DATA_DIR", ".broker"))
    )
    p.add_argument("--dev", action="store_true")
    p.add_argument(
        "--min-age", type=int, default=60, help="spare credentials younger than this (s)"
    )
    _common(p, url=False)
    p.set_defaults(func=cmd_reconcile)

    keys = sub.add_parser("keys", help="the broker's signing keys").add_subparsers(
        dest="keys_cmd", required=True
    )
    p = keys.add_parser(
        "rotate", help="new signing key; the previous stays published until the next rotation"
    )
    _common(p, bearer=True)
    p.set_defaults(func=cmd_keys_rotate)
    from broker.cli.keys import add_commands as add_kek
    from broker.cli.keys import kek_flag

    add_kek(keys)

    aud = sub.add_parser("audit", help="verify, export and prove the audit log").add_subparsers(
        dest="audit_cmd", required=True
    )

    def store_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", default=os.environ.get("BROKER_DATA_DIR", ".broker"))
        p.add_argument("--database-url", default=os.environ.get("BROKER_DATABASE_URL"))
        kek_flag(p)
        _common(p, url=False)

    p = aud.add_parser(
        "verify", help="recompute the whole log, check every checkpoint and the state tables"
    )
    p.add_argument(
        "--export", help="verify an export (a directory, or a scoped export's file) offline"
    )
    p.add_argument("--key", help="verifier key <name>+<id>+<base64>; required with --export")
    p.add_argument(
        "--trusted-checkpoint",
        metavar="FILE",
        help="a signed checkpoint held outside the broker: the store must be consistent with it",
    )
    p.add_argument(
        "--log-only",
        action="store_true",
        help="skip holding the grants, approvals and revocation tables against the log",
    )
    store_args(p)
    p.set_defaults(func=cmd_audit_verify)
    p = aud.add_parser(
        "monitor", help="watch a broker's checkpoints: each must extend the last one seen"
    )
    p.add_argument("--state", required=True, help="file where the last checkpoint is kept")
    p.add_argument("--key", help="verifier key <name>+<id>+<base64> (default: the one pinned)")
    p.add_argument("--interval", type=float, default=300.0, help="seconds between checks")
    p.add_argument("--once", action="store_true", help="check once and exit")
    _common(p, bearer=True)
    p.set_defaults(func=cmd_audit_monitor)
    p = aud.add_parser("export", help="write entries, checkpoint and proofs for offline checks")
    p.add_argument("dir", help="a directory; with --model, a file")
    p.add_argument("--since", type=int, default=0, help="first index to export")
    p.add_argument(
        "--model",
        action="append",
        metavar="GLOB",
        help="only these models' entries, each with its inclusion proof (repeatable)",
    )
    store_args(p)
    p.set_defaults(func=cmd_audit_export)
    p = aud.add_parser("proof", help="inclusion proof of a grant's issuance")
    p.add_argument("grant_id")
    store_args(p)
    p.set_defaults(func=cmd_audit_proof)

    pol = sub.add_parser("policy", help="check and explain policy files").add_subparsers(
        dest="policy_cmd", required=True
    )
    p = pol.add_parser("check", help="validate a policy file")
    p.add_argument("file")
    p.add_argument("--dev", action="store_true", help="a policy for --dev: no dev-issuer warning")
    _common(p, url=False)
    p.set_defaults(func=cmd_policy_check)
    p = pol.add_parser("explain", help="why would this token get / not get this credential")
    p.add_argument("--token", required=True, help="file with the workload token, or - for stdin")
    p.add_argument("--model", required=True)
    p.add_argument("--action", required=True)
    p.add_argument("--backend", choices=sorted(TOKEN_TYPES), default="jwt")
    p.add_argument("--policy")
    p.add_argument(
        "--dev", action="store_true", help="trust the dev issuer (its key in --data-dir's store)"
    )
    p.add_argument("--data-dir", default=os.environ.get("BROKER_DATA_DIR", ".broker"))
    kek_flag(p)
    _common(p, url=False)
    p.set_defaults(func=cmd_policy_explain)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors come out as JSON when the command line asks for --json."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if not self.json_errors:
            super().error(message)
        _print_error({"error": "usage_error", "error_description": f"{self.prog}: {message}"})
        raise SystemExit(EXIT_CONFIG)


def _print_error(body: dict[str, Any]) -> None:
    print(json.dumps(body, sort_keys=True), file=sys.stderr)


def _approval_hint(exc: ClientError) -> str:
    approval_id = exc.fields.get("approval_id")
    if not approval_id:
        return ""
    return (
        f"\napproval request {approval_id}: once approved (broker approvals show {approval_id}), "
        f"run the same exchange again with --approval-id {approval_id}"
    )


def _failed(args: argparse.Namespace, exc: Exception) -> int:
    """Print ``exc`` (as JSON with --json) on stderr; the exit code for it."""
    if isinstance(exc, ClientError):
        if exc.code == "approval_required":
            code = EXIT_APPROVAL
        elif exc.status is None or exc.status >= 500:
            code = EXIT_UNAVAILABLE
        else:
            code = EXIT_REFUSED
        body, human = exc.to_wire(), f"error: {exc.code}: {exc.description}{_approval_hint(exc)}"
    elif isinstance(exc, WaitEnded):
        code, human = exc.exit_code, f"error: {exc.code}: {exc.description}"
        body = {"error": exc.code, "error_description": exc.description, **exc.fields}
    elif isinstance(exc, ConfigError):
        code, human = EXIT_CONFIG, f"error: {exc.description}"
        body = {"error": "usage_error", "error_description": exc.description}
    elif isinstance(exc, BrokerError):
        code, human = EXIT_REFUSED, f"error: {exc.code}: {exc.description}"
        body = exc.to_wire()
    else:
        assert isinstance(exc, OSError)
        where = f"{exc.filename}: " if exc.filename else ""
        code, human = EXIT_CONFIG, f"error: {where}{exc.strerror or exc}"
        body = {"error": "usage_error", "error_description": human.removeprefix("error: ")}
    if getattr(args, "json", False):
        _print_error(body)
    else:
        print(human, file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_errors = "--json" in argv
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except (ClientError, BrokerError, WaitEnded, OSError) as exc:
        return _failed(args, exc)


if __name__ == "__main__":
    raise SystemExit(main())
