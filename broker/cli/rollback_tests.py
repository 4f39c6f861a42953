"""``broker rollback-tests report|list``: a rollback tester reports a test with its own workload
token; people list what was recorded. Lean like the rest of the CLI (the HTTP client only)."""

from __future__ import annotations

import argparse
from typing import Any

from broker.cli.main import (
    EXIT_OK,
    _client,
    _common,
    _out,
    _read_secret,
    _table,
    _url,
)
from broker.client.http import BrokerClient

COLUMNS = ("id", "result", "model", "uri", "sha256", "reporter", "recorded_at")


def _row(test: dict[str, Any]) -> dict[str, Any]:
    point = test["rollback_point"]
    return {
        **test,
        "uri": point["uri"],
        "sha256": point["sha256"][:12] + "…",
        "reporter": f"{test['reporter']['subject']} ({test['reporter']['issuer']})",
    }


def _human(test: dict[str, Any]) -> str:
    row = _row(test)
    lines = [
        f"{row['id']}  {row['result']}  {row['model']}  recorded {row['recorded_at']}",
        f"rollback point  {row['uri']} (sha256 {test['rollback_point']['sha256']})",
        f"reported by     {row['reporter']} through rule {row['rule']}",
    ]
    if test.get("evidence_uri"):
        lines.append(f"evidence        {test['evidence_uri']}")
    if test.get("started_at") or test.get("finished_at"):
        lines.append(f"ran             {test['started_at'] or '?'} .. {test['finished_at'] or '?'}")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    client = BrokerClient(_url(args), bearer=_read_secret(args.token, "--token"))
    test = client.report_rollback_test(
        model=args.model,
        rollback_point={"uri": args.uri, "sha256": args.sha256},
        result=args.result,
        evidence_uri=args.evidence_uri,
        started_at=args.started_at,
        finished_at=args.finished_at,
    )
    _out(args, test, lambda: _human(test))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    found = _client(args, bearer=True).list_rollback_tests(
        model=args.model, uri=args.uri, limit=str(args.limit)
    )
    _out(args, found, lambda: _table([_row(t) for t in found], COLUMNS))
    return EXIT_OK


def add_commands(sub: Any) -> None:
    """Add ``rollback-tests`` to the ``broker`` parser's subcommands ``sub``."""
    tests = sub.add_parser(
        "rollback-tests", help="report and list rollback tests (the rollback gate's evidence)"
    ).add_subparsers(dest="rollback_tests_cmd", required=True)
    p = tests.add_parser("report", help="report a rollback test, with the tester's workload token")
    p.add_argument("--token", required=True, help="file with the workload token, or - for stdin")
    p.add_argument("--model", required=True)
    p.add_argument("--uri", required=True, help="the rollback point that was exercised")
    p.add_argument("--sha256", required=True, help="the rollback point's digest (64 hex)")
    p.add_argument("--result", required=True, choices=["passed", "failed"])
    p.add_argument("--evidence-uri", help="where the test's log or report lives")
    p.add_argument("--started-at", help="RFC 3339 time with an offset, e.g. 2026-11-24T09:00:00Z")
    p.add_argument("--finished-at", help="RFC 3339 time with an offset")
    _common(p)
    p.set_defaults(func=cmd_report)
    p = tests.add_parser("list", help="recorded rollback tests, newest first")
    p.add_argument("--model")
    p.add_argument("--uri")
    p.add_argument("--limit", type=int, default=100)
    _common(p, bearer=True)
    p.set_defaults(func=cmd_list)
