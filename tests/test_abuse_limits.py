"""Abuse limits: pending uploads per user, upload forms per minute, failed sign-ins."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace

import pytest
from litestar.testing import AsyncTestClient

from gallery.app import create_app
from tests.support import TEST_PASSWORD, make_jpeg


async def test_pending_uploads_over_cap_get_429(make_client, settings, run_worker):
    client = await make_client(app_settings=replace(settings, max_pending_uploads=3))
    for _ in range(3):
        assert (await client.request_form("a.jpg", "image/jpeg", 100)).status_code == 201

    rejected = await client.request_form("a.jpg", "image/jpeg", 100)

    assert rejected.status_code == 429
    assert rejected.json()["error"] == (
        "3 uploads are still being checked. Wait for them to finish, then try again."
    )
    assert int(rejected.headers["retry-after"]) > 0


async def test_finished_upload_frees_pending_slot(make_client, settings, run_worker):
    client = await make_client(app_settings=replace(settings, max_pending_uploads=1))
    await client.upload(make_jpeg())
    assert (await client.request_form("b.jpg", "image/jpeg", 100)).status_code == 429

    await run_worker()

    assert (await client.request_form("b.jpg", "image/jpeg", 100)).status_code == 201


async def test_deleted_upload_frees_pending_slot(make_client, settings):
    client = await make_client(app_settings=replace(settings, max_pending_uploads=1))
    form = (await client.request_form("a.jpg", "image/jpeg", 100)).json()
    await client.complete(form["id"])

    await client.delete(form["id"])

    assert (await client.request_form("b.jpg", "image/jpeg", 100)).status_code == 201


async def test_pending_cap_is_per_user(make_client, settings):
    limited = replace(settings, max_pending_uploads=1)
    alice = await make_client(app_settings=limited)
    bob = await make_client(app_settings=limited)
    assert (await alice.request_form("a.jpg", "image/jpeg", 100)).status_code == 201

    response = await bob.request_form("b.jpg", "image/jpeg", 100)

    assert response.status_code == 201


async def test_form_requests_over_rate_get_429(make_client, settings):
    client = await make_client(app_settings=replace(settings, upload_forms_per_minute=2))
    for _ in range(2):
        assert (await client.request_form("a.jpg", "image/jpeg", 100)).status_code == 201

    rejected = await client.request_form("a.jpg", "image/jpeg", 100)

    assert rejected.status_code == 429
    assert rejected.json()["error"].startswith("Too many uploads at once. Wait ")
    assert 0 < int(rejected.headers["retry-after"]) <= 60


@pytest.fixture
async def signin_client(settings, store, redis):
    """Hand over a factory of anonymous clients on an app with low sign-in limits.

    Every test client has the same address, so the address counts of earlier tests are
    cleared first.
    """
    limited = replace(settings, signin_failures_per_account=3, signin_failures_per_address=5)
    for key in await redis.keys("gallery:limit:signin:*"):
        await redis.delete(key)
    clients = []

    async def make() -> AsyncTestClient:
        client = AsyncTestClient(create_app(limited))
        await client.__aenter__()
        clients.append(client)
        await client.get("/signin")
        return client

    yield make
    for client in clients:
        await client.__aexit__(None, None, None)


async def _sign_in(client, username: str, password: str):
    return await client.post(
        "/signin",
        data={"username": username, "password": password},
        headers={"x-csrftoken": client.cookies["csrftoken"]},
    )


async def test_signin_throttled_per_account(client, signin_client):
    anonymous = await signin_client()
    for _ in range(3):
        assert (await _sign_in(anonymous, client.username, "wrong password")).status_code == 400

    throttled = await _sign_in(anonymous, client.username, TEST_PASSWORD)

    assert throttled.status_code == 429
    assert "Too many failed sign-ins. Try again in 15 minutes." in throttled.text
    assert "session" not in anonymous.cookies


async def test_signin_throttle_counts_username_in_any_case(client, signin_client):
    anonymous = await signin_client()
    for name in (client.username.upper(), client.username.lower(), client.username.title()):
        await _sign_in(anonymous, name, "wrong password")

    throttled = await _sign_in(anonymous, client.username, TEST_PASSWORD)

    assert throttled.status_code == 429


async def test_signin_throttled_per_address(signin_client):
    anonymous = await signin_client()
    for _ in range(5):
        username = f"nobody{secrets.token_hex(4)}"
        assert (await _sign_in(anonymous, username, "wrong password")).status_code == 400

    throttled = await _sign_in(anonymous, f"other{secrets.token_hex(4)}", "wrong password")

    assert throttled.status_code == 429


async def test_successful_signin_resets_account_count(client, signin_client):
    anonymous = await signin_client()
    for _ in range(2):
        await _sign_in(anonymous, client.username, "wrong password")
    assert (await _sign_in(anonymous, client.username, TEST_PASSWORD)).status_code == 200
    fresh = await signin_client()

    for _ in range(2):
        assert (await _sign_in(fresh, client.username, "wrong password")).status_code == 400
    signed_in = await _sign_in(fresh, client.username, TEST_PASSWORD)

    assert signed_in.status_code == 200
    assert client.username in signed_in.text


async def test_expired_unused_form_frees_pending_slot(make_client, settings):
    limited = replace(settings, max_pending_uploads=1, upload_form_seconds=1)
    client = await make_client(app_settings=limited)
    assert (await client.request_form("a.jpg", "image/jpeg", 100)).status_code == 201
    assert (await client.request_form("b.jpg", "image/jpeg", 100)).status_code == 429

    await asyncio.sleep(1.2)

    assert (await client.request_form("c.jpg", "image/jpeg", 100)).status_code == 201
