"""``broker agent``: the command line of :mod:`broker.agent` (a sidecar or init container)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from broker.agent import FORMATS, Agent, Sink
from broker.agent.sinks import BACKEND_OF_FORMAT
from broker.cli.main import TOKEN_TYPES, _ttl, _url
from broker.client.credentials import Provider
from broker.client.http import BrokerClient
from broker.client.sources import DEFAULT_OIDC_AUDIENCE, find_source
from broker.errors import ConfigError


def cmd_agent(args: argparse.Namespace) -> int:
    wanted = BACKEND_OF_FORMAT.get(args.format)
    if wanted and args.backend != wanted:
        raise ConfigError(f"--format {args.format} needs --backend {wanted}")
    if args.format == "token" and args.backend == "aws":
        raise ConfigError(
            "--format token holds one token: AWS credentials need json, env or aws-credentials"
        )
    sink_dir = args.sink.parent
    if not sink_dir.is_dir():
        raise ConfigError(f"--sink: {sink_dir} is not a directory")
    try:
        source = find_source(
            token_file=args.token_file,
            token_env=args.token_env,
            github_actions=args.github_actions,
            oidc_audience=args.oidc_audience,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    provider = Provider(
        BrokerClient(_url(args)),
        source,
        model=args.model,
        action=args.action,
        backend=args.backend,
        audience=args.audience,
        requested_ttl=_ttl(args.ttl) if args.ttl else None,
        reason=args.reason,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s broker agent: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger("broker.agent").info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = Agent(
        provider, Sink(args.sink, args.format), exit_after_auth=args.exit_after_auth, stop=stop
    )
    return agent.run()


def add_command(sub: Any) -> None:
    p = sub.add_parser(
        "agent",
        help="keep a credential fresh in a file (sidecar), or fetch it once (init container)",
        description="Exchange the workload's token for a credential, write it to --sink, and "
        "exchange again before it expires. SIGTERM stops it (exit 0).",
    )
    p.add_argument("--model", required=True)
    p.add_argument("--action", required=True)
    p.add_argument("--backend", choices=sorted(TOKEN_TYPES), default="jwt")
    p.add_argument("--audience", help="the broker JWT's audience (jwt backend)")
    p.add_argument("--ttl", help="requested lifetime (capped by the action's max_ttl)")
    p.add_argument("--reason")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--token-file",
        help="the workload token, read again before every exchange (default: $BROKER_TOKEN_FILE)",
    )
    source.add_argument(
        "--github-actions",
        action="store_true",
        help="ask the GitHub Actions runner for an OIDC token (ACTIONS_ID_TOKEN_REQUEST_URL)",
    )
    source.add_argument(
        "--token-env", metavar="VAR", help="a variable holding the token (GitLab CI id_tokens)"
    )
    p.add_argument(
        "--oidc-audience",
        default=DEFAULT_OIDC_AUDIENCE,
        help=f"the aud to ask GitHub Actions for (default {DEFAULT_OIDC_AUDIENCE})",
    )
    p.add_argument("--sink", type=Path, required=True, help="the file to write (mode 0600)")
    p.add_argument(
        "--format",
        choices=list(FORMATS),
        default="json",
    )
    p.add_argument(
        "--exit-after-auth",
        action="store_true",
        help="exit once the sink is written (an init container); a refusal exits 1 at once",
    )
    p.add_argument("--url", help="broker base URL (default: $BROKER_URL)")
    p.set_defaults(func=cmd_agent, json=False)
