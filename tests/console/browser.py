"""A broker whose policy signs people in through a real OpenID provider, and Chromium to use
its console: shared by the browser tests and bench/console_screenshots.py."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from broker.api.app import create_app
from broker.runtime import Broker, build_broker
from broker.settings import EXAMPLE_POLICY, Settings
from tests.console.oidc_provider import Provider, run_provider
from tests.servers import Part, unavailable

CHROMIUM = Path("/usr/bin/chromium")
CLIENT_ID = "broker-console"
PEOPLE = {
    # alice: the person behind workflows that carry actor=alice (the policy's people section).
    "alice@example.com": ["ml-safety-reviewers"],
    "bob@example.com": ["ml-safety-reviewers"],
    "carol@example.com": ["ml-safety-reviewers"],
    "dave@example.com": ["ml-platform-admins", "security-audit"],
}


def require_chromium() -> Any:
    """Playwright's sync API, with Debian's chromium present; else :func:`unavailable`."""
    if not CHROMIUM.exists():
        unavailable(Part.CHROMIUM, f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable(Part.CHROMIUM, "the playwright package is not installed")
    return sync_playwright


def console_policy(directory: Path, provider_url: str, *, dev: bool = True) -> Path:
    """The example policy plus a people issuer ``corp`` at ``provider_url`` with a console
    client, and alice's identity there; without ``dev``, less its dev issuers."""
    doc = yaml.safe_load(EXAMPLE_POLICY.read_text())
    if not dev:
        names = {i["name"] for i in doc["issuers"] if i.get("dev")}
        doc["issuers"] = [i for i in doc["issuers"] if i["name"] not in names]
        doc["rules"] = [r for r in doc["rules"] if r["issuer"] not in names]
        doc["people"] = {
            person: [ref for ref in refs if ref["issuer"] not in names]
            for person, refs in doc["people"].items()
        }
    keys = directory / "keys"
    shutil.copytree(EXAMPLE_POLICY.parent / "keys", keys)
    doc["issuers"].append(
        {
            "name": "corp",
            "kind": "people",
            "issuer": provider_url,
            "audiences": [CLIENT_ID],
            "roles_claim": "groups",
            "algorithms": ["RS256"],
            "console": {"client_id": CLIENT_ID, "scopes": ["openid", "groups"]},
        }
    )
    doc["people"]["alice"].append({"issuer": "corp", "subject": "alice@example.com"})
    path = directory / "policy.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class Site:
    broker: Broker
    url: str
    provider: Provider


@contextmanager
def console_site(directory: Path, broker_port: int, provider_port: int) -> Iterator[Site]:
    """A live dev broker (console mounted) and the provider its ``corp`` issuer trusts."""
    from tests.conftest import LiveServer

    broker_url = f"http://127.0.0.1:{broker_port}"
    with run_provider(
        provider_port,
        client_id=CLIENT_ID,
        redirect_uri=f"{broker_url}/console/callback",
        users=PEOPLE,
    ) as provider:
        policy = console_policy(directory, provider.url)
        broker = build_broker(
            Settings(dev=True, data_dir=directory / "data", policy=policy, port=broker_port)
        )
        with LiveServer(create_app(broker=broker), broker_port):
            yield Site(broker, broker_url, provider)


def sign_in_with_corp(page: Any, site: Site, user: str) -> None:
    """Sign ``page`` in through the provider's login form as ``user``."""
    page.goto(f"{site.url}/console/signin")
    page.get_by_role("link", name="Sign in with corp").click()
    page.get_by_label("User").select_option(user)
    page.get_by_role("button", name="Sign in at the IdP").click()
    page.wait_for_url(f"{site.url}/console/approvals")
