"""VaultTransport, the HTTP under hvac: what it keeps of the requests session it replaced."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import hvac
import pytest

from broker.backends.vault_http import VaultTransport, VaultUnreachable
from tests.backends.vault.conftest import VaultSetup
from tests.poll import SERVE_POLL_S
from tests.servers import free_port_pair

pytestmark = pytest.mark.integration


@contextmanager
def redirecting_to(target: str) -> Iterator[str]:
    """A loopback server answering every request with 307 to the same path on ``target`` (what
    a standby Vault node does); stopped on exit."""

    class Redirect(BaseHTTPRequestHandler):
        def _redirect(self) -> None:
            self.send_response(307)
            self.send_header("Location", f"{target}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = _redirect

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": SERVE_POLL_S}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_redirect_to_the_active_node_is_followed_with_its_body(vault: VaultSetup) -> None:
    with redirecting_to(vault.server.url) as standby:
        transport = VaultTransport()
        try:
            client = hvac.Client(url=standby, token=vault.broker_token, session=transport)
            created = client.write_data(
                "auth/token/create/broker-issuer",
                data={"policies": ["broker-llama-7b-evaluate"], "ttl": "60s", "meta": {"x": "y"}},
            )
            info = vault.server.client(created["auth"]["client_token"]).auth.token.lookup_self()
            assert info["data"]["meta"] == {"x": "y"}  # the POST body survived the redirect
        finally:
            transport.close()


def test_unreachable_names_the_cause() -> None:
    transport = VaultTransport()
    try:
        with pytest.raises(VaultUnreachable, match="NewConnectionError") as caught:
            transport.request("GET", f"http://127.0.0.1:{free_port_pair()}/v1/sys/health")
        assert isinstance(caught.value, OSError)
    finally:
        transport.close()


def test_an_unknown_keyword_is_an_error_not_a_dropped_body(vault: VaultSetup) -> None:
    transport = VaultTransport()
    try:
        with pytest.raises(TypeError, match="data"):
            transport.request("POST", f"{vault.server.url}/v1/sys/health", data=b"x")  # type: ignore[call-arg]
    finally:
        transport.close()
