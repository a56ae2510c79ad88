"""Sign-up, sign-in and sign-out, sessions in Redis, CSRF, and the guard on every page."""

from __future__ import annotations

import secrets
from dataclasses import replace

import pytest
from litestar.testing import AsyncTestClient

from gallery import accounts
from gallery.app import create_app
from tests.support import TEST_PASSWORD


@pytest.fixture
async def anonymous(settings, store):
    """Hand over a test client with a CSRF cookie and no session."""
    async with AsyncTestClient(create_app(settings)) as client:
        await client.get("/signin")
        yield client


def _csrf(client) -> dict[str, str]:
    return {"x-csrftoken": client.cookies["csrftoken"]}


async def _sign_in(client, username: str, password: str = TEST_PASSWORD):
    return await client.post(
        "/signin", data={"username": username, "password": password}, headers=_csrf(client)
    )


async def test_anonymous_visit_stores_no_session(anonymous, redis):
    before = len(await redis.keys("gallery:sessions:*"))

    response = await anonymous.get("/signup")

    assert response.status_code == 200
    assert "session" not in response.cookies
    assert len(await redis.keys("gallery:sessions:*")) == before


async def test_signup_lands_on_empty_gallery(client):
    page = await client.http.get("/images")

    assert page.status_code == 200
    assert client.username in page.text
    assert "No photos yet" in page.text


async def test_password_is_stored_as_argon2id(client, redis):
    user_id = await redis.get(f"gallery:username:{client.username.lower()}")

    stored = await redis.hget(f"gallery:user:{user_id.decode()}", "password_hash")

    assert stored.startswith(b"$argon2id$")
    assert TEST_PASSWORD.encode() not in stored


async def test_signup_with_taken_username_any_case(client, anonymous):
    response = await anonymous.post(
        "/signup",
        data={"username": client.username.upper(), "password": TEST_PASSWORD},
        headers=_csrf(anonymous),
    )

    assert response.status_code == 400
    assert "That username is taken" in response.text


@pytest.mark.parametrize(
    ("username", "password", "message"),
    [
        ("ab", TEST_PASSWORD, "Choose a username of 3 to 32"),
        ("has space", TEST_PASSWORD, "Choose a username of 3 to 32"),
        ("<script>", TEST_PASSWORD, "Choose a username of 3 to 32"),
        ("x" * 33, TEST_PASSWORD, "Choose a username of 3 to 32"),
        ("...", TEST_PASSWORD, "with at least one letter or digit"),
        ("_-.", TEST_PASSWORD, "with at least one letter or digit"),
        ("validname", "short", "Choose a password of 10 to 256"),
        ("validname", "ninechars", "Choose a password of 10 to 256"),
        ("validname", "p" * 257, "Choose a password of 10 to 256"),
    ],
)
async def test_signup_with_invalid_credentials_shows_message(
    anonymous, username, password, message
):
    response = await anonymous.post(
        "/signup", data={"username": username, "password": password}, headers=_csrf(anonymous)
    )

    assert response.status_code == 400
    assert message in response.text
    assert "session" not in response.cookies
    assert "session" not in anonymous.cookies


async def test_signin_with_wrong_password_or_unknown_user(client, anonymous):
    wrong_password = await _sign_in(anonymous, client.username, "not the password")
    unknown_user = await _sign_in(anonymous, f"nobody{secrets.token_hex(4)}")

    for response in (wrong_password, unknown_user):
        assert response.status_code == 400
        assert "Wrong username or password." in response.text
    assert (await anonymous.get("/images", follow_redirects=False)).status_code in (302, 303)


async def test_signin_gives_a_new_session_id(client, anonymous):
    planted = "a" * 64
    anonymous.cookies.set("session", planted, domain="testserver.local")

    response = await _sign_in(anonymous, client.username)

    assert response.status_code == 200
    assert anonymous.cookies["session"] != planted
    assert client.username in (await anonymous.get("/images")).text


async def test_signin_removes_the_previous_session(client, anonymous, redis):
    await _sign_in(anonymous, client.username)
    first = anonymous.cookies["session"]
    assert await redis.exists(f"gallery:sessions:{first}") == 1

    await _sign_in(anonymous, client.username)

    assert anonymous.cookies["session"] != first
    assert await redis.exists(f"gallery:sessions:{first}") == 0


async def test_signout_ends_the_session(client):
    response = await client.http.post("/signout", headers=client.csrf)
    gallery = await client.http.get("/images", follow_redirects=False)

    assert response.status_code == 200
    assert gallery.status_code in (302, 303)
    assert gallery.headers["location"] == "/signin"


async def test_signout_expires_the_session_cookie(client):
    response = await client.http.post("/signout", headers=client.csrf, follow_redirects=False)

    cookie = next(
        header
        for header in response.headers.get_list("set-cookie")
        if header.startswith("session=")
    )
    assert "Max-Age=0" in cookie
    assert "Max-Age=1209600" not in cookie
    assert "session" not in client.http.cookies


async def test_signin_without_csrf_token_returns_403(client, anonymous):
    response = await anonymous.post(
        "/signin", data={"username": client.username, "password": TEST_PASSWORD}
    )

    assert response.status_code == 403


async def test_session_cookie_is_httponly_and_lax(anonymous, client):
    response = await _sign_in(anonymous, client.username)

    cookie = next(
        header
        for header in response.history[0].headers.get_list("set-cookie")
        if header.startswith("session=")
    )
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie or "SameSite=Lax" in cookie


async def test_home_redirects_by_session(client, anonymous):
    visitor = await anonymous.get("/", follow_redirects=False)
    user = await client.http.get("/", follow_redirects=False)

    assert visitor.headers["location"] == "/signin"
    assert user.headers["location"] == "/images"


async def test_closed_signup_refuses_new_accounts(settings, redis):
    app = create_app(replace(settings, open_signup=False))
    async with AsyncTestClient(app) as client:
        page = await client.get("/signup")
        await client.get("/signin")
        posted = await client.post(
            "/signup",
            data={"username": "walkin", "password": TEST_PASSWORD},
            headers={"x-csrftoken": client.cookies["csrftoken"]},
        )

    assert page.status_code == posted.status_code == 403
    assert "Sign-up is closed" in page.text
    assert "Sign-up is closed" in posted.text
    assert await accounts.find_user_id(redis, "walkin") is None


@pytest.mark.parametrize("username", ["a..", "..9", "x_y"])
def test_username_with_one_letter_or_digit_is_valid(username):
    accounts.check_new_credentials(username, TEST_PASSWORD)


async def test_ended_session_signs_in_back_to_page(client, redis):
    await redis.delete(f"gallery:sessions:{client.http.cookies['session']}")

    redirect = await client.http.get("/trash?restored=x", follow_redirects=False)
    page = await client.http.get(redirect.headers["location"])
    signed_in = await client.http.post(
        "/signin",
        data={"username": client.username, "password": TEST_PASSWORD, "next": "/trash?restored=x"},
        headers=client.csrf,
        follow_redirects=False,
    )

    assert redirect.headers["location"] == "/signin?next=%2Ftrash%3Frestored%3Dx&ended=1"
    assert "Your session ended. Sign in again" in page.text
    assert '<input type="hidden" name="next" value="/trash?restored=x">' in page.text
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == "/trash?restored=x"


async def test_htmx_request_after_session_end_names_page(client, redis):
    await redis.delete(f"gallery:sessions:{client.http.cookies['session']}")

    response = await client.http.get(
        "/images/summary",
        headers={"HX-Request": "true", "HX-Current-URL": "http://testserver.local/shares"},
    )

    assert response.status_code == 401
    assert response.headers["hx-redirect"] == "/signin?next=%2Fshares&ended=1"


async def test_first_visit_signin_has_no_ended_note(anonymous):
    redirect = await anonymous.get("/trash", follow_redirects=False)
    page = await anonymous.get(redirect.headers["location"])

    assert redirect.headers["location"] == "/signin?next=%2Ftrash"
    assert "Your session ended" not in page.text
    assert '<input type="hidden" name="next" value="/trash">' in page.text


@pytest.mark.parametrize(
    "next_path",
    [
        "//evil.example/",
        "/\\evil.example/",
        "https://evil.example/",
        "javascript:alert(1)",
        "trash",
        "/trash\r\nSet-Cookie: a=b",
        "",
    ],
)
async def test_signin_ignores_unsafe_next(client, anonymous, next_path):
    page = await anonymous.get("/signin", params={"next": next_path})
    signed_in = await anonymous.post(
        "/signin",
        data={"username": client.username, "password": TEST_PASSWORD, "next": next_path},
        headers=_csrf(anonymous),
        follow_redirects=False,
    )

    assert 'name="next"' not in page.text
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == "/images"
