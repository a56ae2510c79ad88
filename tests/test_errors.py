"""Error responses: a page for browsers, plain text for htmx, and JSON for upload.js."""

from __future__ import annotations

import logging

import pytest
from litestar import get
from litestar.testing import AsyncTestClient

from gallery.app import create_app
from tests.support import HTMX

# The headers a browser sends when it opens a page or submits a form.
BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


@pytest.fixture
async def anonymous(settings, store):
    """Hand over a test client with a CSRF cookie and no session."""
    async with AsyncTestClient(create_app(settings)) as client:
        await client.get("/signin")
        yield client


@pytest.fixture
async def failing_app_client(settings, store, caplog):
    """Hand over a test client of an app with a `/fail` route that raises RuntimeError."""

    @get("/fail", name="test:fail")
    async def fail() -> str:
        raise RuntimeError("secret detail of the failure")

    app = create_app(settings)
    app.register(fail)
    async with AsyncTestClient(app) as client:
        yield client


async def _get_signout(client, headers):
    return await client.get("/signout", headers=headers)


async def _post_form_without_csrf(client, headers):
    form = {"username": "someone", "password": "a password"}
    return await client.post("/signin", data=form, headers=headers)


async def _post_form_with_repeated_field(client, headers):
    # A form field sent twice fails validation of the str-to-str form body.
    headers = {
        **headers,
        "x-csrftoken": client.cookies["csrftoken"],
        "Content-Type": "application/x-www-form-urlencoded",
    }
    return await client.post("/signin", content="username=a&username=b", headers=headers)


CASES = [
    pytest.param(_get_signout, 405, "This address cannot be opened that way.", id="405"),
    pytest.param(
        _post_form_without_csrf,
        403,
        "The request was rejected, most likely because the page was out of date.",
        id="403",
    ),
    pytest.param(_post_form_with_repeated_field, 400, "The request was invalid.", id="400"),
]


@pytest.mark.parametrize(("send", "status_code", "problem"), CASES)
async def test_browser_error_shows_error_page(anonymous, send, status_code, problem):
    response = await send(anonymous, BROWSER)

    assert response.status_code == status_code
    assert response.headers["content-type"].startswith("text/html")
    assert "<!doctype html>" in response.text
    assert problem in response.text
    assert f"Error {status_code}" in response.text
    assert "Back to your gallery" not in response.text
    assert 'href="/signin">Sign in</a>' in response.text


@pytest.mark.parametrize(("send", "status_code", "problem"), CASES)
async def test_htmx_error_returns_plain_text(anonymous, send, status_code, problem):
    response = await send(anonymous, {**BROWSER, **HTMX})

    assert response.status_code == status_code
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text.startswith(problem)
    assert "<" not in response.text


async def test_method_not_allowed_page_keeps_allow_header(anonymous):
    response = await _get_signout(anonymous, BROWSER)

    assert "POST" in response.headers["allow"]


async def test_unexpected_error_shows_page_and_logs_traceback(failing_app_client, caplog):
    with caplog.at_level(logging.ERROR):
        response = await failing_app_client.get("/fail", headers=BROWSER)

    assert response.status_code == 500
    assert response.headers["content-type"].startswith("text/html")
    assert "Something went wrong on our side." in response.text
    assert "secret detail" not in response.text
    assert "RuntimeError" not in response.text
    assert "Traceback" in caplog.text
    assert "RuntimeError: secret detail of the failure" in caplog.text


async def test_unexpected_error_for_htmx_is_plain_text(failing_app_client):
    response = await failing_app_client.get("/fail", headers={**BROWSER, **HTMX})

    assert response.status_code == 500
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text.startswith("Something went wrong on our side.")
    assert "secret detail" not in response.text


async def test_upload_form_request_keeps_json_errors(client):
    malformed = await client.http.post(
        "/uploads",
        content=b"{not json",
        headers={**client.csrf, **HTMX, "Content-Type": "application/json"},
    )
    without_csrf = await client.http.post(
        "/uploads",
        json={"filename": "photo.jpg", "content_type": "image/jpeg", "size": 100},
        headers={**HTMX, "Accept": "application/json"},
    )
    invalid = await client.request_form("photo.jpg", "image/jpeg", 0)

    assert malformed.status_code == 400
    assert malformed.headers["content-type"].startswith("application/json")
    assert malformed.json()["status_code"] == 400
    assert without_csrf.status_code == 403
    assert without_csrf.headers["content-type"].startswith("application/json")
    assert without_csrf.json()["detail"] == "CSRF token verification failed"
    assert invalid.status_code == 400
    assert invalid.json() == {"error": "Files must be between 1 byte and 5 MiB."}


async def test_missing_share_page_has_no_app_link(anonymous):
    response = await anonymous.get("/s/expired-or-never-issued-token", headers=BROWSER)

    assert response.status_code == 404
    assert "<!doctype html>" in response.text
    assert "Back to your gallery" not in response.text
    assert "/signin" not in response.text
    assert 'href="/"' not in response.text


async def test_error_page_offers_signed_in_user_gallery_link(client):
    missing = await client.http.get("/images/no-such-image/view", headers=BROWSER)
    share_missing = await client.http.get("/s/no-such-token", headers=BROWSER)
    unknown_path = await client.http.get("/no/such/page", headers=BROWSER)
    not_allowed = await _get_signout(client.http, BROWSER)

    assert not_allowed.status_code == 405
    for response in (missing, share_missing, unknown_path, not_allowed):
        assert response.headers["content-type"].startswith("text/html")
        assert 'href="/">Back to your gallery</a>' in response.text
        assert "Sign in</a>" not in response.text
    for response in (missing, share_missing, unknown_path):
        assert response.status_code == 404


async def test_unknown_path_offers_visitor_sign_in(anonymous):
    response = await anonymous.get("/no/such/page", headers=BROWSER)

    assert response.status_code == 404
    assert "Back to your gallery" not in response.text
    assert 'href="/signin">Sign in</a>' in response.text
