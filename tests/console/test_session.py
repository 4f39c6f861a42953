"""Console sessions over HTTP: cookie attributes, expiry, CSRF, sealed cookies, sign-out."""

from __future__ import annotations

import time
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.responses import Response

from broker.console.session import (
    FORM_COOKIE,
    LOGIN_COOKIE,
    MAX_SESSION_S,
    SESSION_COOKIE,
    Cookies,
    LoginState,
    Sealer,
    cookie_key,
    secure_cookies,
)
from broker.errors import ConfigError
from broker.keys.store import CONSOLE_COOKIE
from broker.runtime import Broker
from broker.store.db import Store, sqlite_url
from broker.store.tables import KeyRow
from tests.console.support import console_of, csrf_of, open_request, sign_in
from tests.keys.support import fresh_kek, key_store


def _set_cookie(response: Response | object, name: str) -> dict[str, str | bool]:
    """The attributes of the Set-Cookie header for ``name`` (lower-case keys)."""
    raw = response.headers  # type: ignore[attr-defined]
    headers = raw.get_list("set-cookie") if hasattr(raw, "get_list") else raw.getlist("set-cookie")
    for header in headers:
        cookie = SimpleCookie()
        cookie.load(header)
        if name in cookie:
            morsel = cookie[name]
            attrs: dict[str, str | bool] = {k: v for k, v in morsel.items() if v}
            attrs["value"] = morsel.value
            return attrs
    raise AssertionError(f"no Set-Cookie for {name} in {headers}")


def test_the_session_cookie_is_httponly_strict_and_bounded(web: TestClient) -> None:
    page = web.get("/console/signin")
    done = web.post(
        "/console/dev/signin",
        data={"name": "bob@example.com", "roles": ["approver"], "csrf": csrf_of(page.text)},
    )
    attrs = _set_cookie(done, SESSION_COOKIE)
    assert attrs["httponly"] is True
    assert str(attrs["samesite"]).lower() == "strict"
    assert attrs["path"] == "/console"
    assert 0 < int(str(attrs["max-age"])) <= MAX_SESSION_S
    # The test broker is http on loopback, where a browser would not send a Secure cookie back.
    assert "secure" not in attrs


def test_cookies_are_secure_except_over_plain_http_on_loopback() -> None:
    assert secure_cookies("https://broker.example.com")
    assert secure_cookies("http://broker.example.com")  # then the browser never sends it
    assert secure_cookies("https://127.0.0.1:8443")
    assert not secure_cookies("http://127.0.0.1:8080")
    assert not secure_cookies("http://localhost:8080")
    response = Response()
    Cookies(b"k" * 32, secure=True).start_session(response, "token", int(time.time()) + 60)
    assert _set_cookie(response, SESSION_COOKIE)["secure"] is True


def test_the_login_state_cookie_is_lax_and_only_for_the_callback() -> None:
    response = Response()
    Cookies(b"k" * 32, secure=True).start_login(response, LoginState("corp", "s", "n", "v"))
    attrs = _set_cookie(response, LOGIN_COOKIE)
    # Lax: the provider's redirect back is a cross-site navigation, which drops Strict cookies.
    assert str(attrs["samesite"]).lower() == "lax"
    assert attrs["path"] == "/console/callback"
    assert attrs["httponly"] is True and attrs["secure"] is True
    assert int(str(attrs["max-age"])) == 600


def test_a_session_ends_at_the_id_tokens_exp_when_that_comes_first() -> None:
    now = 1_000_000.0
    cookies = Cookies(b"k" * 32, secure=False, clock=lambda: now)
    response = Response()
    session = cookies.start_session(response, "the-id-token", int(now) + 120)
    assert session.expires_at == int(now) + 120
    assert _set_cookie(response, SESSION_COOKIE)["max-age"] == "120"
    jar = {SESSION_COOKIE: str(_set_cookie(response, SESSION_COOKIE)["value"])}
    assert cookies.session(jar) == session
    now += 120
    assert cookies.session(jar) is None


def test_a_session_ends_after_the_cap_over_http(app: FastAPI, web: TestClient) -> None:
    sign_in(web, "bob@example.com", "approver")
    assert web.get("/console/approvals").status_code == 200
    cookies = console_of(app).cookies
    start = time.time()
    cookies.clock = lambda: start + MAX_SESSION_S + 1
    # The dev token itself is valid for longer: the session's own bound ends it.
    expired = web.get("/console/approvals")
    assert expired.status_code == 303
    assert expired.headers["location"] == "/console/signin"
    refused = web.post("/console/signout", data={"csrf": "x"})
    assert refused.status_code == 401


def test_a_tampered_or_repurposed_cookie_is_no_session(app: FastAPI, web: TestClient) -> None:
    sign_in(web, "bob@example.com", "approver")
    value = web.cookies.get(SESSION_COOKIE, path="/console")
    assert value
    flipped = value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1]
    web.cookies.set(SESSION_COOKIE, flipped, path="/console")
    assert web.get("/console/approvals").status_code == 303
    # A sealed login state is not a session, even under the same key.
    response = Response()
    console_of(app).cookies.start_login(response, LoginState("dev", "s", "n", "v"))
    login_value = str(_set_cookie(response, LOGIN_COOKIE)["value"])
    web.cookies.set(SESSION_COOKIE, login_value, path="/console")
    assert web.get("/console/approvals").status_code == 303


def test_sealed_values_need_the_key_and_the_purpose() -> None:
    sealer = Sealer(b"k" * 32)
    sealed = sealer.seal(b"a", {"x": 1}, int(time.time()) + 60)
    assert sealer.open(b"a", sealed, time.time()) == {"x": 1, "exp": int(time.time()) + 60}
    assert sealer.open(b"b", sealed, time.time()) is None
    assert Sealer(b"j" * 32).open(b"a", sealed, time.time()) is None
    assert sealer.open(b"a", "not base64 !", time.time()) is None


@pytest.mark.parametrize("token", [None, "", "wrong-token"])
def test_a_review_without_this_sessions_csrf_token_is_refused(
    web: TestClient, broker: Broker, token: str | None
) -> None:
    approval_id = open_request(web, broker)
    good = sign_in(web, "bob@example.com", "approver")
    form = {"reason": "looks fine"} | ({"csrf": token} if token is not None else {})
    refused = web.post(f"/console/approvals/{approval_id}/approve", data=form)
    assert refused.status_code == 403
    assert "CSRF" in refused.text
    assert broker.approvals.get(approval_id)["status"] == "pending"
    done = web.post(
        f"/console/approvals/{approval_id}/approve", data={"reason": "looks fine", "csrf": good}
    )
    assert done.status_code == 303
    assert broker.approvals.get(approval_id)["status"] == "approved"


def test_another_sessions_csrf_token_is_refused(app: FastAPI, broker: Broker) -> None:
    with (
        TestClient(app, follow_redirects=False) as bob,
        TestClient(app, follow_redirects=False) as carol,
    ):
        approval_id = open_request(bob, broker)
        sign_in(bob, "bob@example.com", "approver")
        carols = sign_in(carol, "carol@example.com", "approver")
        refused = bob.post(
            f"/console/approvals/{approval_id}/deny", data={"reason": "no", "csrf": carols}
        )
        assert refused.status_code == 403
        assert broker.approvals.get(approval_id)["status"] == "pending"


def test_csrf_guards_revocation_signout_and_the_dev_form(web: TestClient, broker: Broker) -> None:
    sign_in(web, "dave@example.com", "admin")
    assert (
        web.post("/console/revocations", data={"model": "llama-7b", "reason": "x"}).status_code
        == 403
    )
    assert web.post("/console/grants/g_x/revoke", data={"reason": "x"}).status_code == 403
    assert web.post("/console/signout", data={}).status_code == 403
    assert web.get("/console/approvals").status_code == 200  # still signed in
    web.cookies.delete(FORM_COOKIE, path="/console")
    no_form_cookie = web.post(
        "/console/dev/signin", data={"name": "eve", "roles": ["admin"], "csrf": "guess"}
    )
    assert no_form_cookie.status_code == 403


def test_sign_out_ends_the_session_in_the_browser(web: TestClient) -> None:
    csrf = sign_in(web, "bob@example.com", "approver")
    out = web.post("/console/signout", data={"csrf": csrf})
    assert out.status_code == 303
    attrs = _set_cookie(out, SESSION_COOKIE)
    assert attrs["max-age"] == "0"
    assert web.get("/console/approvals").status_code == 303


def test_the_cookie_key_is_sealed_in_the_store_and_shared_by_every_broker_on_it(
    tmp_path: Path,
) -> None:
    store = Store(sqlite_url(tmp_path))
    store.migrate()
    try:
        kek = fresh_kek()
        first = cookie_key(key_store(store, kek))
        # Another replica (its own KeyStore, the same KEK) finds the same key: sessions sealed
        # on one open on the other.
        assert cookie_key(key_store(store, kek)) == first
        now = time.time()
        sealed = Sealer(first).seal(b"console session", {"sub": "alice"}, int(now) + 60)
        other = Sealer(cookie_key(key_store(store, kek)))
        assert (other.open(b"console session", sealed, now) or {}).get("sub") == "alice"
        with store.read() as session:
            (row,) = session.scalars(select(KeyRow).where(KeyRow.purpose == CONSOLE_COOKIE))
        assert first not in row.sealed  # never in clear
        with pytest.raises(ConfigError, match="does not open"):
            cookie_key(key_store(store, fresh_kek("another KEK")))
        assert not list(tmp_path.glob("console*"))  # no key file in the data dir
    finally:
        store.close()
