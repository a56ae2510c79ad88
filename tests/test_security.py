"""Every route's guard and CSRF check, and the security headers on every response."""

from __future__ import annotations

import re
from urllib.parse import urlencode

import pytest
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient

from gallery.accounts import require_user
from gallery.app import create_app
from gallery.settings import Settings
from tests.support import HTMX

# Routes a visitor without a session may use.
PUBLIC_ROUTES = {
    ("GET", "/"),
    ("GET", "/signin"),
    ("POST", "/signin"),
    ("GET", "/signup"),
    ("POST", "/signup"),
    ("POST", "/signout"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    # Shared pages open with a link's token alone; an unknown token gets 404.
    ("GET", "/s/0123abcd"),
    ("GET", "/s/0123abcd/0123abcd"),
    ("GET", "/s/0123abcd/0123abcd/original"),
    ("GET", "/metrics"),
}
SHARED_ROUTES = [route for route in PUBLIC_ROUTES if route[1].startswith("/s/")]
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def _all_routes(app: Litestar) -> list[tuple[str, str]]:
    """Return (method, path) for every route of the app, with path parameters filled in."""
    routes = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or route.path.startswith("/static"):
            continue
        path = re.sub(r"\{[^}]+\}", "0123abcd", route.path)
        routes.extend(
            (method, path) for method in route.methods if method not in {"HEAD", "OPTIONS"}
        )
    return sorted(routes)


def _unguarded_routes(app: Litestar) -> set[tuple[str, str]]:
    """Return (method, path) for every route whose handler has no sign-in guard."""
    routes = set()
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or route.path.startswith("/static"):
            continue
        path = re.sub(r"\{[^}]+\}", "0123abcd", route.path)
        for handler in route.route_handlers:
            # Litestar wraps each guard, keeping the function as `func`.
            guards = [guard.func for guard in handler.resolve_guards()]
            if require_user not in guards:
                methods = handler.http_methods - {"HEAD", "OPTIONS"}
                routes.update((method, path) for method in methods)
    return routes


APP = create_app(Settings(secret_key="x" * 32, redis_url="redis://127.0.0.1:1"))
ROUTES = _all_routes(APP)
PROTECTED_ROUTES = [route for route in ROUTES if route not in PUBLIC_ROUTES]
UNSAFE_ROUTES = [route for route in ROUTES if route[0] in UNSAFE_METHODS]


def test_route_lists_are_not_empty():
    assert len(PROTECTED_ROUTES) >= 6
    assert ("DELETE", "/images/0123abcd") in PROTECTED_ROUTES
    assert ("POST", "/shares/0123abcd/revoke") in PROTECTED_ROUTES
    assert ("POST", "/uploads") in UNSAFE_ROUTES
    assert len(SHARED_ROUTES) == 3


def test_only_listed_routes_lack_the_signin_guard():
    assert _unguarded_routes(APP) == PUBLIC_ROUTES


def test_shared_routes_are_marked_public():
    for route in APP.routes:
        if isinstance(route, HTTPRoute) and route.path.startswith("/s/"):
            for handler in route.route_handlers:
                assert handler.opt.get("public") is True, route.path


@pytest.fixture
async def anonymous(settings, store):
    async with AsyncTestClient(create_app(settings)) as client:
        await client.get("/signin")
        yield client


@pytest.mark.parametrize(("method", "path"), PROTECTED_ROUTES)
async def test_protected_route_refuses_anonymous(anonymous, method, path):
    csrf = {"x-csrftoken": anonymous.cookies["csrftoken"]}

    page = await anonymous.request(method, path, headers=csrf, follow_redirects=False)
    fragment = await anonymous.request(
        method, path, headers={**csrf, **HTMX}, follow_redirects=False
    )

    # Sign-in returns to a page opened by GET. It goes to the gallery by default.
    returns_to_page = method == "GET" and path != "/images"
    expected = f"/signin?{urlencode({'next': path})}" if returns_to_page else "/signin"
    assert page.status_code == 302
    assert page.headers["location"] == expected
    assert fragment.status_code == 401
    assert fragment.headers["hx-redirect"] == "/signin"


@pytest.mark.parametrize(("method", "path"), SHARED_ROUTES)
async def test_shared_route_with_unknown_token_returns_404(anonymous, method, path):
    page = await anonymous.request(method, path, follow_redirects=False)
    fragment = await anonymous.request(method, path, headers=HTMX, follow_redirects=False)

    assert page.status_code == 404
    assert "This link does not exist, has expired or was revoked." in page.text
    assert fragment.status_code == 404
    assert "location" not in page.headers
    assert "hx-redirect" not in fragment.headers


@pytest.mark.parametrize(("method", "path"), UNSAFE_ROUTES)
async def test_unsafe_route_refuses_missing_csrf_token(client, method, path):
    response = await client.http.request(method, path, headers=HTMX, follow_redirects=False)

    assert response.status_code == 403


@pytest.mark.parametrize(("method", "path"), UNSAFE_ROUTES)
async def test_unsafe_route_refuses_wrong_csrf_token(client, method, path):
    forged = {"x-csrftoken": "0" * len(client.csrf["x-csrftoken"]), **HTMX}

    response = await client.http.request(method, path, headers=forged, follow_redirects=False)

    assert response.status_code == 403


@pytest.mark.parametrize(
    "path",
    [
        "/signin",
        "/signup",
        "/images",
        "/images/0123abcd/tile",
        "/s/0123abcd",
        "/static/gallery.css",
    ],
)
async def test_security_headers_on_every_response(client, settings, path):
    response = await client.http.get(path, headers=HTMX if "tile" in path else {})
    policy = response.headers["content-security-policy"]

    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in policy
    assert "script-src 'self';" in policy
    assert "'unsafe-inline'" not in policy
    assert "'unsafe-eval'" not in policy
    assert f"img-src 'self' {settings.s3_endpoint_url} data:;" in policy


@pytest.mark.parametrize("path", ["/images", "/images/0123abcd/tile", "/signin", "/s/0123abcd"])
async def test_pages_are_not_stored_by_browsers(client, path):
    response = await client.http.get(path, headers=HTMX if "tile" in path else {})

    assert response.headers["cache-control"] == "no-store"


async def test_static_files_may_be_cached(client):
    response = await client.http.get("/static/gallery.css")

    assert "no-store" not in response.headers.get("cache-control", "")


async def test_pages_have_no_inline_script_or_style(client):
    page = await client.http.get("/images")

    assert re.search(r"<script(?![^>]*\bsrc=)", page.text) is None
    assert " style=" not in page.text
    assert "<style" not in page.text
    assert re.search(r"\son[a-z]+=", page.text) is None


async def test_secure_cookies_over_https(settings, store):
    https = Settings(**{**settings.__dict__, "public_url": "https://photos.example"})

    async with AsyncTestClient(create_app(https)) as client:
        response = await client.get("/signin")

    cookie = response.headers["set-cookie"]
    assert cookie.startswith("csrftoken=")
    assert "Secure" in cookie
    assert "HttpOnly" in cookie
