"""Share links: making, opening, revoking, extending and purging them, on SeaweedFS and Valkey."""

from __future__ import annotations

import asyncio
import html
import io
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from gallery import index, limits, shares, storage
from gallery.app import create_app
from gallery.logs import configure_logging
from gallery.settings import Settings
from gallery.share_pages import format_duration
from tests.support import HTMX, UserClient, make_jpeg
from worker.share_purge import purge_shares

# The address Litestar's test client sends requests from, for the view rate limit.
TEST_CLIENT_ADDRESS = "testclient"

LINK = re.compile(r'id="share-link" value="([^"]+)"')
IMAGE_SRC = re.compile(r'<img[^>]*\bsrc="([^"]+)"')
SRCSET = re.compile(r'srcset="([^"]+)"')

Visitor = AsyncTestClient[Any]


@pytest.fixture(autouse=True)
async def _reset_view_limit(redis) -> AsyncIterator[None]:
    """Start each test with the test client's address under its view limit."""
    await limits.reset(redis, f"share-views:{TEST_CLIENT_ADDRESS}")
    yield
    await limits.reset(redis, f"share-views:{TEST_CLIENT_ADDRESS}")


@pytest.fixture
async def make_visitor(
    settings: Settings, store
) -> AsyncIterator[Callable[..., Awaitable[Visitor]]]:
    """Hand over a factory of test clients that never signed in, each with its own app."""
    async with AsyncExitStack() as stack:

        async def make(app_settings: Settings | None = None) -> Visitor:
            app = create_app(app_settings or settings)
            return await stack.enter_async_context(AsyncTestClient(app))

        yield make


@pytest.fixture
async def visitor(make_visitor) -> Visitor:
    return await make_visitor()


async def fetch(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.get(url)


async def upload_ready(client: UserClient, run_worker, count: int) -> list[str]:
    """Upload `count` small photos of different colours and run the worker; return their ids."""
    ids = [
        await client.upload(make_jpeg(color=(60 * i % 256, 90, 200 - 40 * i)), f"photo{i}.jpg")
        for i in range(count)
    ]
    await run_worker()
    return ids


async def create_share(client: UserClient, image_ids: list[str], **fields: str) -> httpx.Response:
    form: dict[str, Any] = {
        "title": "Holiday",
        "expires_in": str(shares.DEFAULT_EXPIRY_SECONDS),
        "image_id": image_ids,
        **fields,
    }
    return await client.http.post("/shares", data=form, headers=client.csrf)


async def share_path(client: UserClient, image_ids: list[str], **fields: str) -> str:
    """Make a link to these images and return its path, /s/<token>."""
    response = await create_share(client, image_ids, **fields)
    assert response.status_code == 201, response.text
    link = html.unescape(LINK.search(response.text).group(1))
    return httpx.URL(link).path


def image_urls(page: str) -> list[str]:
    """Return every image URL on a page: each src and each srcset candidate."""
    urls = [html.unescape(url) for url in IMAGE_SRC.findall(page) if not url.startswith("data:")]
    for srcset in SRCSET.findall(page):
        urls.extend(html.unescape(part.strip().split(" ")[0]) for part in srcset.split(","))
    return urls


async def share_id_of(redis, user_id: str) -> str:
    shares_of_user = await shares.list_user_shares(redis, user_id)
    return shares_of_user[0].id


async def test_share_of_three_images_opens_without_session(client, run_worker, visitor, redis):
    image_ids = await upload_ready(client, run_worker, 4)
    shared = image_ids[:3]

    path = await share_path(client, shared)
    page = await visitor.get(path)
    urls = image_urls(page.text)
    responses = [await fetch(url) for url in urls]

    assert page.status_code == 200
    assert "session" not in visitor.cookies
    assert page.headers["x-robots-tag"] == "noindex, nofollow"
    assert len(urls) == 3 * 3  # a src and two srcset candidates per tile
    for image_id in shared:
        assert sum(f"/t/{image_id}.webp" in url for url in urls) == 2
        assert sum(f"/t2/{image_id}.webp" in url for url in urls) == 1
    assert [response.status_code for response in responses] == [200] * len(urls)
    assert {response.headers["content-type"] for response in responses} == {"image/webp"}


async def test_token_is_random_and_stored_hashed(client, run_worker, redis):
    image_ids = await upload_ready(client, run_worker, 1)

    path = await share_path(client, image_ids)
    token = path.removeprefix("/s/")
    user_id = (await index.get_upload(redis, image_ids[0])).user_id
    share = (await shares.list_user_shares(redis, user_id))[0]
    stored = await redis.hgetall(f"gallery:share:{share.id}")

    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
    assert share.token_hash == shares.hash_token(token)
    assert all(token.encode() not in value for value in stored.values())
    assert await redis.get(f"gallery:share-token:{share.token_hash}") == share.id.encode()


async def test_shared_viewer_shows_display_image_and_neighbours(client, run_worker, visitor, redis):
    image_ids = await upload_ready(client, run_worker, 3)
    path = await share_path(client, image_ids)
    newest, middle, oldest = reversed(image_ids)

    page = await visitor.get(f"{path}/{middle}")
    display = [url for url in image_urls(page.text) if "/d/" in url]

    assert page.status_code == 200
    assert "2 of 3" in page.text
    assert f'href="{path}/{newest}"' in page.text
    assert f'href="{path}/{oldest}"' in page.text
    assert len(display) == 1
    assert (await fetch(display[0])).status_code == 200


async def test_revoked_share_404_and_its_urls_expire(
    make_client, make_visitor, run_worker, settings, redis
):
    expiry = 3
    short = replace(settings, share_url_expiry_seconds=expiry)
    client = await make_client(app_settings=short)
    visitor = await make_visitor(short)
    image_ids = await upload_ready(client, run_worker, 3)
    path = await share_path(client, image_ids)
    user_id = (await index.get_upload(redis, image_ids[0])).user_id
    share_id = await share_id_of(redis, user_id)

    signed_at = time.time()
    page = await visitor.get(path)
    viewer = await visitor.get(f"{path}/{image_ids[0]}")
    viewer_signed_by = time.time()
    urls = image_urls(page.text) + image_urls(viewer.text)
    revoked = await client.http.post(
        f"/shares/{share_id}/revoke", headers=client.csrf, follow_redirects=False
    )
    after_revoke = await visitor.get(path)
    viewer_after_revoke = await visitor.get(f"{path}/{image_ids[0]}")
    first_check = await fetch(urls[0])
    first_checked_at = time.time()
    # Poll one URL until S3 rejects it, to measure when a revoked link's images stop.
    while (await fetch(urls[0])).status_code == 200 and time.time() < signed_at + 30:
        await asyncio.sleep(0.2)
    stopped_after = time.time() - signed_at
    # The viewer's URL may be signed in the second after the page's, so it can outlive
    # urls[0] by up to a second: wait until the last URL's own expiry has passed too.
    await asyncio.sleep(max(0.0, viewer_signed_by + expiry + 0.2 - time.time()))
    expired = [await fetch(url) for url in urls]

    assert revoked.status_code == 303
    assert after_revoke.status_code == 404
    assert viewer_after_revoke.status_code == 404
    assert len(urls) == 3 * 3 + 1
    assert all(f"X-Amz-Expires={expiry}&" in url for url in urls)
    # The URLs handed out before the revoke live on until their own expiry, which is the
    # bound the setting documents. They are signed at a whole second, up to 1 s early.
    if first_checked_at < signed_at + expiry - 1:
        assert first_check.status_code == 200
    assert expiry - 1 <= stopped_after <= expiry + 2, stopped_after
    assert [response.status_code for response in expired] == [403] * len(urls)
    assert all("AccessDenied" in response.text for response in expired)


async def test_share_page_holds_nothing_outside_the_share(make_client, visitor, run_worker, redis):
    client = await make_client(username=f"secretname{time.time_ns() % 10**6}")
    image_ids = await upload_ready(client, run_worker, 5)
    shared, others = image_ids[:3], image_ids[3:]
    path = await share_path(client, shared, allow_originals="on")
    user_id = (await index.get_upload(redis, shared[0])).user_id
    share_id = await share_id_of(redis, user_id)

    pages = [await visitor.get(path)]
    pages += [await visitor.get(f"{path}/{image_id}") for image_id in shared]
    text = "\n".join(page.text for page in pages)

    assert [page.status_code for page in pages] == [200] * 4
    for image_id in others:
        assert image_id not in text
        for key in storage.image_keys(user_id, image_id):
            assert key not in text
    for image_id in shared:
        assert storage.original_key(user_id, image_id) not in text
        assert storage.incoming_key(user_id, image_id) not in text
    assert client.username not in text
    assert share_id not in text
    assert "/images" not in text
    assert "/shares" not in text


async def test_owner_name_shows_only_when_chosen(client, visitor, run_worker):
    image_ids = await upload_ready(client, run_worker, 1)

    hidden = await visitor.get(await share_path(client, image_ids))
    shown = await visitor.get(await share_path(client, image_ids, show_name="on"))

    assert client.username not in hidden.text
    assert f"Shared by {client.username}" in shown.text


async def test_wrong_token_follows_the_revoked_path(client, visitor, run_worker, redis, settings):
    image_ids = await upload_ready(client, run_worker, 1)
    revoked_path = await share_path(client, image_ids)
    expired_path = await share_path(client, image_ids)
    user_id = (await index.get_upload(redis, image_ids[0])).user_id
    revoked_share, expired_share = (await shares.list_user_shares(redis, user_id))[::-1]
    await client.http.post(f"/shares/{revoked_share.id}/revoke", headers=client.csrf)
    # Expire the second link as Redis does at its expiry, without waiting an hour.
    await redis.delete(f"gallery:share-token:{expired_share.token_hash}")
    wrong_path = "/s/" + shares.new_token()
    # The first request opens the app's Redis connection, which sends commands of its own.
    await visitor.get(wrong_path)

    observed = {}
    for name, path in (("wrong", wrong_path), ("revoked", revoked_path), ("expired", expired_path)):
        commands, response = await commands_during(redis, settings, visitor.get(path))
        observed[name] = (response.status_code, response.text, commands)

    assert observed["wrong"][0] == 404
    assert observed["wrong"][1] == observed["revoked"][1] == observed["expired"][1]
    assert observed["wrong"] == observed["revoked"] == observed["expired"]
    assert [command[0] for command in observed["wrong"][2]] == [
        "GET",
        "MULTI",
        "INCRBY",
        "EXPIRE",
        "EXEC",
        "GET",
    ]


async def commands_during(redis, settings: Settings, request: Awaitable[httpx.Response]):
    """Run a request and return the Redis commands it sent, with token hashes masked."""
    monitor_client = redis.__class__.from_url(settings.redis_url)
    commands: list[tuple[str, ...]] = []
    async with monitor_client.monitor() as monitor:

        async def collect() -> None:
            async for event in monitor.listen():
                commands.append(tuple(event["command"].split(" ")))

        collector = asyncio.create_task(collect())
        response = await request
        await asyncio.sleep(0.2)
        collector.cancel()
    await monitor_client.aclose()
    masked = [
        tuple(re.sub(r"share-token:[0-9a-f]{64}", "share-token:<hash>", part) for part in command)
        for command in commands
        if "MONITOR" not in command
    ]
    return masked, response


async def test_deleted_image_leaves_every_share(client, visitor, run_worker, redis):
    image_ids = await upload_ready(client, run_worker, 2)
    kept, deleted = image_ids
    first = await share_path(client, image_ids)
    second = await share_path(client, [deleted])
    user_id = (await index.get_upload(redis, deleted)).user_id
    await client.http.post(f"/images/{deleted}/trash", headers={**client.csrf, **HTMX})

    response = await client.delete(deleted)
    first_page = await visitor.get(first)
    second_page = await visitor.get(second)
    viewer = await visitor.get(f"{first}/{deleted}")

    assert response.status_code == 200
    assert kept in first_page.text
    assert deleted not in first_page.text
    assert deleted not in second_page.text
    assert "This link has no photos any more." in second_page.text
    assert viewer.status_code == 404
    assert not await redis.exists(f"gallery:image-shares:{deleted}")
    for share in await shares.list_user_shares(redis, user_id):
        assert deleted not in await shares.list_image_ids(redis, share.id)


async def test_share_hides_unready_and_foreign_images(client, visitor, run_worker, redis):
    image_ids = await upload_ready(client, run_worker, 3)
    path = await share_path(client, image_ids)
    hidden, foreign, kept = image_ids
    # A state other than ready, as the trash leaves an image, and a record of another user.
    await redis.hset(f"gallery:upload:{hidden}", "state", "rejected")
    await redis.hset(f"gallery:upload:{foreign}", "user_id", "someoneelse")

    page = await visitor.get(path)
    viewers = [await visitor.get(f"{path}/{image_id}") for image_id in (hidden, foreign)]

    assert kept in page.text
    assert hidden not in page.text
    assert foreign not in page.text
    assert [viewer.status_code for viewer in viewers] == [404, 404]


async def test_viewer_of_image_outside_share_returns_404(client, visitor, run_worker):
    shared, other = await upload_ready(client, run_worker, 2)
    path = await share_path(client, [shared])

    viewer = await visitor.get(f"{path}/{other}")
    original = await visitor.get(f"{path}/{other}/original", follow_redirects=False)

    assert viewer.status_code == 404
    assert original.status_code == 404


async def test_original_download_only_when_allowed(client, visitor, run_worker):
    data = make_jpeg(color=(10, 200, 30))
    image_id = await client.upload(data, "family.jpg")
    await run_worker()
    allowed = await share_path(client, [image_id], allow_originals="on")
    refused = await share_path(client, [image_id])

    download = await visitor.get(f"{allowed}/{image_id}/original", follow_redirects=False)
    original = await fetch(download.headers["location"])
    refused_download = await visitor.get(f"{refused}/{image_id}/original", follow_redirects=False)
    refused_page = await visitor.get(refused)

    assert download.status_code == 302
    assert original.status_code == 200
    assert original.content == data
    assert "attachment" in original.headers["content-disposition"]
    assert refused_download.status_code == 404
    assert "/original" not in refused_page.text


async def test_views_are_counted_on_manage_page(client, visitor, run_worker, redis):
    image_ids = await upload_ready(client, run_worker, 1)
    path = await share_path(client, image_ids)

    before = await client.http.get("/shares")
    for _ in range(3):
        await visitor.get(path)
    after = await client.http.get("/shares")
    user_id = (await index.get_upload(redis, image_ids[0])).user_id
    share = (await shares.list_user_shares(redis, user_id))[0]

    assert "0 views" in before.text
    assert "3 views, last" in after.text
    assert share.views == 3
    assert time.time() - share.last_view_at < 30
    assert "Holiday" in after.text
    assert after.text.count('<img src="') == 1


async def test_extend_moves_expiry_and_caps_it(client, run_worker, redis):
    image_ids = await upload_ready(client, run_worker, 1)
    await share_path(client, image_ids, expires_in=str(shares.HOUR))
    user_id = (await index.get_upload(redis, image_ids[0])).user_id
    share = (await shares.list_user_shares(redis, user_id))[0]
    ttl_before = await redis.ttl(f"gallery:share-token:{share.token_hash}")

    extended = await client.http.post(
        f"/shares/{share.id}/extend",
        data={"seconds": str(shares.DAY)},
        headers=client.csrf,
        follow_redirects=False,
    )
    after_day = await shares.get_share(redis, share.id)
    ttl_after = await redis.ttl(f"gallery:share-token:{share.token_hash}")
    for _ in range(2):
        await client.http.post(
            f"/shares/{share.id}/extend",
            data={"seconds": str(shares.MAX_EXPIRY_SECONDS)},
            headers=client.csrf,
        )
    capped = await shares.get_share(redis, share.id)
    too_long = await client.http.post(
        f"/shares/{share.id}/extend", data={"seconds": "99999999"}, headers=client.csrf
    )

    assert extended.status_code == 303
    assert after_day.expires_at == share.expires_at + shares.DAY
    assert ttl_before <= shares.HOUR
    assert shares.HOUR + shares.DAY - 5 <= ttl_after <= shares.HOUR + shares.DAY
    assert capped.expires_at <= time.time() + shares.MAX_EXPIRY_SECONDS
    assert capped.expires_at >= time.time() + shares.MAX_EXPIRY_SECONDS - 5
    assert too_long.status_code == 400


async def test_extend_at_limit_shows_note(client, run_worker, redis):
    image_ids = await upload_ready(client, run_worker, 1)
    await share_path(client, image_ids, expires_in=str(shares.MAX_EXPIRY_SECONDS))
    user_id = (await index.get_upload(redis, image_ids[0])).user_id
    share = (await shares.list_user_shares(redis, user_id))[0]

    extended = await client.http.post(
        f"/shares/{share.id}/extend", data={"seconds": str(shares.DAY)}, headers=client.csrf
    )
    later = await client.http.get("/shares")

    assert extended.status_code == 200
    assert str(extended.url).endswith(f"/shares?capped={share.id}")
    assert "A link lasts at most 30 days, so “Holiday” now expires" in extended.text
    assert "cannot be extended further" in extended.text
    assert "at most 30 days" not in later.text


async def test_revoked_share_cannot_be_extended(client, visitor, run_worker, redis):
    image_ids = await upload_ready(client, run_worker, 1)
    path = await share_path(client, image_ids)
    user_id = (await index.get_upload(redis, image_ids[0])).user_id
    share = (await shares.list_user_shares(redis, user_id))[0]
    await client.http.post(f"/shares/{share.id}/revoke", headers=client.csrf)

    extended = await client.http.post(
        f"/shares/{share.id}/extend", data={"seconds": str(shares.DAY)}, headers=client.csrf
    )
    page = await visitor.get(path)
    manage = await client.http.get("/shares")

    assert extended.status_code == 400
    assert "revoked or has expired" in extended.text
    assert page.status_code == 404
    assert "Revoked" in manage.text
    assert f"/shares/{share.id}/revoke" not in manage.text


async def test_other_users_share_cannot_be_revoked_or_extended(
    make_client, visitor, run_worker, redis
):
    owner = await make_client()
    other = await make_client()
    image_ids = await upload_ready(owner, run_worker, 1)
    path = await share_path(owner, image_ids)
    user_id = (await index.get_upload(redis, image_ids[0])).user_id
    share_id = await share_id_of(redis, user_id)

    revoke = await other.http.post(f"/shares/{share_id}/revoke", headers=other.csrf)
    extend = await other.http.post(
        f"/shares/{share_id}/extend", data={"seconds": str(shares.DAY)}, headers=other.csrf
    )
    page = await visitor.get(path)

    assert revoke.status_code == 404
    assert extend.status_code == 404
    assert page.status_code == 200
    assert (await shares.get_share(redis, share_id)).expires_at < time.time() + 8 * shares.DAY


async def test_share_of_other_users_image_returns_404(make_client, run_worker, redis):
    owner = await make_client()
    other = await make_client()
    image_ids = await upload_ready(owner, run_worker, 1)

    form = await other.http.get(f"/shares/new?image_id={image_ids[0]}")
    created = await create_share(other, image_ids)

    assert form.status_code == 404
    assert created.status_code == 404
    other_id = await redis.get(f"gallery:username:{other.username.lower()}")
    assert await shares.list_user_shares(redis, other_id.decode()) == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"title": "   "}, "Give the link a title."),
        ({"expires_in": "60"}, "Choose an expiry from 1 hour to 30 days."),
        ({"expires_in": str(31 * shares.DAY)}, "Choose an expiry from 1 hour to 30 days."),
        ({"expires_in": "soon"}, "Choose an expiry from 1 hour to 30 days."),
    ],
)
async def test_invalid_share_form_keeps_selection(client, run_worker, fields, message):
    image_ids = await upload_ready(client, run_worker, 1)

    response = await create_share(client, image_ids, **fields)

    assert response.status_code == 400
    assert message in response.text
    assert f'name="image_id" value="{image_ids[0]}"' in response.text


async def test_empty_or_oversized_selection_is_rejected(client):
    too_many = "&".join(f"image_id=id{number}" for number in range(shares.MAX_IMAGES + 1))

    empty = await client.http.get("/shares/new")
    oversized = await client.http.get(f"/shares/new?{too_many}")
    posted = await create_share(client, [])

    assert empty.status_code == 400
    assert "Select at least one photo" in empty.text
    assert "Share 0 photos" not in empty.text
    assert "<h1>No photos selected</h1>" in empty.text
    assert oversized.status_code == 400
    assert f"at most {shares.MAX_IMAGES} photos, and {shares.MAX_IMAGES + 1} were" in oversized.text
    assert "Share 0 photos" not in oversized.text
    assert "<h1>Too many photos selected</h1>" in oversized.text
    assert posted.status_code == 400
    assert "Share 0 photos" not in posted.text


async def test_new_share_form_lists_selected_images(client, run_worker):
    image_ids = await upload_ready(client, run_worker, 2)

    response = await client.http.get(f"/shares/new?image_id={image_ids[0]}&image_id={image_ids[1]}")

    assert response.status_code == 200
    assert "Share 2 photos" in response.text
    assert f'<span class="who">{client.username}</span>' in response.text
    assert '<option value="604800" selected>7 days</option>' in response.text
    for image_id in image_ids:
        assert f'name="image_id" value="{image_id}"' in response.text


async def test_grid_and_viewer_offer_sharing(client, run_worker):
    image_id = (await upload_ready(client, run_worker, 1))[0]

    grid = await client.http.get("/images")
    tile = await client.tile(image_id)
    viewer = await client.http.get(f"/images/{image_id}/view")

    assert '<form id="share-form"' in grid.text
    assert f"Up to {shares.MAX_IMAGES} photos per link" in grid.text
    assert 'action="/shares/new"' in grid.text
    checkbox = f'name="image_id" value="{image_id}" form="share-form"'
    assert checkbox in grid.text
    assert checkbox in tile.text
    assert f'href="/shares/new?image_id={image_id}"' in viewer.text


async def test_active_shares_over_cap_get_409(make_client, run_worker, settings, redis):
    capped = replace(settings, max_active_shares=2)
    client = await make_client(app_settings=capped)
    image_ids = await upload_ready(client, run_worker, 1)
    for _ in range(2):
        await share_path(client, image_ids)

    refused = await create_share(client, image_ids)
    user_id = (await index.get_upload(redis, image_ids[0])).user_id
    first = (await shares.list_user_shares(redis, user_id))[-1]
    await client.http.post(f"/shares/{first.id}/revoke", headers=client.csrf)
    after_revoke = await create_share(client, image_ids)

    assert refused.status_code == 409
    assert "You already have 2 active links." in refused.text
    assert after_revoke.status_code == 201
    assert await shares.count_open_shares(redis, user_id) == 2


async def test_share_views_over_rate_get_429(make_client, make_visitor, run_worker, settings):
    limited = replace(settings, share_views_per_minute=3)
    client = await make_client(app_settings=limited)
    visitor = await make_visitor(limited)
    image_ids = await upload_ready(client, run_worker, 1)
    path = await share_path(client, image_ids)

    allowed = [await visitor.get(path) for _ in range(3)]
    refused = await visitor.get(path)
    guessed = await visitor.get("/s/" + shares.new_token())

    assert [response.status_code for response in allowed] == [200, 200, 200]
    assert refused.status_code == 429
    assert "Too many requests came from your address" in refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert guessed.status_code == 429


async def test_purge_removes_expired_and_revoked_shares(client, run_worker, redis, settings):
    image_ids = await upload_ready(client, run_worker, 1)
    for _ in range(3):
        await share_path(client, image_ids)
    user_id = (await index.get_upload(redis, image_ids[0])).user_id
    kept, expired, revoked = await shares.list_user_shares(redis, user_id)
    await redis.hset(f"gallery:share:{expired.id}", "expires_at", int(time.time()) - 1)
    await redis.zadd(shares.ENDED_KEY, {expired.id: time.time() - 1})
    await client.http.post(f"/shares/{revoked.id}/revoke", headers=client.csrf)
    await redis.delete(f"gallery:lock:purge-shares:{int(time.time() // 60)}")

    purged = await purge_shares({"redis": redis, "settings": settings})
    same_tick = await purge_shares({"redis": redis, "settings": settings})
    again = await shares.purge_ended(redis, time.time())

    assert purged >= 2
    assert same_tick == 0
    assert again == 0
    assert [share.id for share in await shares.list_user_shares(redis, user_id)] == [kept.id]
    for share in (expired, revoked):
        assert not await redis.exists(f"gallery:share:{share.id}")
        assert not await redis.exists(f"gallery:share-images:{share.id}")
        assert not await redis.exists(f"gallery:share-token:{share.token_hash}")
        assert await redis.zscore(shares.ENDED_KEY, share.id) is None
    members = await redis.smembers(f"gallery:image-shares:{image_ids[0]}")
    assert members == {kept.id.encode()}


async def test_shared_page_fragment_request_gets_same_page(client, visitor, run_worker):
    image_ids = await upload_ready(client, run_worker, 1)
    path = await share_path(client, image_ids)

    page = await visitor.get(path)
    fragment = await visitor.get(path, headers=HTMX)
    missing = await visitor.get("/s/" + shares.new_token(), headers=HTMX)

    assert fragment.status_code == page.status_code == 200
    assert image_ids[0] in fragment.text
    assert missing.status_code == 404
    assert missing.text == "This link does not exist, has expired or was revoked."


async def test_request_log_hides_share_token(client, visitor, run_worker, settings):
    image_ids = await upload_ready(client, run_worker, 1)
    path = await share_path(client, image_ids)
    token = path.removeprefix("/s/")
    buffer = io.StringIO()
    # configure_logging sets the levels of the root logger and of some libraries' loggers.
    loggers = [logging.getLogger(), *map(logging.getLogger, logging.root.manager.loggerDict)]
    levels = {logger: logger.level for logger in loggers}
    handler = configure_logging(replace(settings, log_level="DEBUG"), stream=buffer)

    try:
        await visitor.get(path)
        await visitor.get(f"{path}/{image_ids[0]}")
    finally:
        logging.getLogger().removeHandler(handler)
        for logger, level in levels.items():
            logger.setLevel(level)

    assert token not in buffer.getvalue()
    assert "GET /s/<token> 200" in buffer.getvalue()
    assert f"GET /s/<token>/{image_ids[0]} 200" in buffer.getvalue()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (3 * shares.DAY - 5, "3 days"),
        (shares.DAY, "1 day"),
        (shares.DAY - 1, "24 hours"),
        (90 * 60, "2 hours"),
        (59 * 60 + 20, "59 minutes"),
        (30, "less than a minute"),
    ],
)
def test_duration_rounds_to_largest_unit(seconds, text):
    assert format_duration(seconds) == text


async def test_trashed_image_leaves_share_until_restored(client, visitor, run_worker):
    kept, trashed = await upload_ready(client, run_worker, 2)
    path = await share_path(client, [kept, trashed])

    moved = await client.http.post(f"/images/{trashed}/trash", headers={**client.csrf, **HTMX})
    while_trashed = await visitor.get(path)
    viewer_while_trashed = await visitor.get(f"{path}/{trashed}")
    restored = await client.http.post(f"/images/{trashed}/restore", headers={**client.csrf, **HTMX})
    after_restore = await visitor.get(path)

    assert moved.status_code == 200
    assert kept in while_trashed.text
    assert trashed not in while_trashed.text
    assert viewer_while_trashed.status_code == 404
    assert restored.status_code == 200
    assert trashed in after_restore.text
