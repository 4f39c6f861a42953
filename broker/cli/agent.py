"""``broker agent``: the command line of :mod:`broker.agent` (a sidecar, an init container, or
with ``--exec`` the parent of the job's command)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from broker.agent import FORMATS, Agent, Sink
from broker.agent.exec import Child
from broker.agent.sinks import BACKEND_OF_FORMAT
from broker.cli.main import TOKEN_TYPES, _ttl, _url
from broker.client.credentials import Provider
from broker.client.http import BrokerClient
from broker.client.sources import DEFAULT_OIDC_AUDIENCE, find_source
from broker.errors import ConfigError

log = logging.getLogger("broker.agent")


def _check(args: argparse.Namespace) -> None:
    wanted = BACKEND_OF_FORMAT.get(args.format)
    if wanted and args.backend != wanted:
        raise ConfigError(f"--format {args.format} needs --backend {wanted}")
    if args.format == "token" and args.backend == "aws":
        raise ConfigError(
            "--format token holds one token: AWS credentials need json, env or aws-credentials"
        )
    if args.exec and not args.command:
        raise ConfigError("--exec needs the command after --: broker agent ... --exec -- CMD ARG…")
    if args.command and not args.exec:
        raise ConfigError(f"{args.command[0]!r}: a command to run needs --exec before --")
    if args.sink is None and not args.exec:
        raise ConfigError("--sink FILE is required (or --exec -- CMD)")
    if args.sink is not None and not args.sink.parent.is_dir():
        raise ConfigError(f"--sink: {args.sink.parent} is not a directory")


def provider_of(args: argparse.Namespace) -> Provider:
    """The parsed command line's provider. Raises ConfigError."""
    try:
        source = find_source(
            token_file=args.token_file,
            token_env=args.token_env,
            github_actions=args.github_actions,
            oidc_audience=args.oidc_audience,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Provider(
        BrokerClient(_url(args)),
        source,
        model=args.model,
        action=args.action,
        backend=args.backend,
        audience=args.audience,
        requested_ttl=_ttl(args.ttl) if args.ttl else None,
        reason=args.reason,
    )


def _refresh_signal(name: str) -> signal.Signals | None:
    if name.lower() == "none":
        return None
    upper = name.upper()
    try:
        return signal.Signals[upper if upper.startswith("SIG") else f"SIG{upper}"]
    except KeyError:
        raise ConfigError(
            f"--refresh-signal: {name!r} is not a signal (e.g. SIGHUP, USR1, none)"
        ) from None


def cmd_agent(args: argparse.Namespace) -> int:
    _check(args)
    refresh_signal = _refresh_signal(args.refresh_signal)
    provider = provider_of(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s broker agent: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    stop = threading.Event()
    child: Child | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        if child is not None:
            child.forward(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with contextlib.ExitStack() as cleanup:
        sink_path = args.sink
        if sink_path is None:  # --exec alone: a private file for the child, removed at the end
            private = tempfile.mkdtemp(prefix="broker-agent-")
            cleanup.callback(shutil.rmtree, private, ignore_errors=True)
            suffix = {"json": ".json", "env": ".env"}.get(args.format, "")
            sink_path = Path(private) / f"credential{suffix}"
        if args.exec:
            child = Child(
                args.command,
                credential_file=str(sink_path),
                refresh_signal=refresh_signal,
                stop=stop,
            )
            cleanup.callback(child.finish)  # the child never outlives the agent
        agent = Agent(
            provider,
            Sink(sink_path, args.format),
            exit_after_auth=args.exit_after_auth,
            refusal_ends_before_first=args.exec,
            stop=stop,
            on_credential=child.on_credential if child else None,
        )
        code = agent.run()
        if child is not None:
            ended = child.finish()
            if ended is not None:
                return ended
        return code


def add_command(sub: Any) -> None:
    p = sub.add_parser(
        "agent",
        help="keep a credential fresh in a file (sidecar), fetch it once (init container), "
        "or run a command with it (--exec)",
        description="Exchange the workload's token for a credential, write it to --sink, and "
        "exchange again before it expires. SIGTERM stops it (exit 0). With --exec -- CMD ARG…, "
        "run CMD with the credential in its environment, signal it after each refresh, pass "
        "SIGTERM/SIGINT on to it and exit with its exit code.",
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
    p.add_argument(
        "--sink",
        type=Path,
        help="the file to write (mode 0600); required unless --exec, which then uses a private "
        "temporary file",
    )
    p.add_argument(
        "--format",
        choices=list(FORMATS),
        default="json",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--exit-after-auth",
        action="store_true",
        help="exit once the sink is written (an init container); a refusal exits 1 at once",
    )
    mode.add_argument(
        "--exec",
        action="store_true",
        help="run the command after -- with the credential in its environment "
        "($BROKER_CREDENTIAL_FILE names the sink); exit with its exit code",
    )
    p.add_argument(
        "--refresh-signal",
        default="SIGHUP",
        help="sent to the --exec command after each refresh (default SIGHUP; none: no signal)",
    )
    p.add_argument("--url", help="broker base URL (default: $BROKER_URL)")
    p.add_argument("command", nargs="*", help="with --exec: the command and its arguments")
    p.set_defaults(func=cmd_agent, json=False)
