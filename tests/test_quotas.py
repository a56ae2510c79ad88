"""Quotas: usage counts originals and renditions, forms reserve space, deletes free it."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from gallery import index, quotas, storage
from gallery.quotas import Quota, Usage
from tests.support import HTMX, make_jpeg


async def _user_id(redis, upload_id: str) -> str:
    return (await index.get_upload(redis, upload_id)).user_id


async def _stored_bytes(store, user_id: str, image_id: str) -> int:
    keys = [storage.original_key(user_id, image_id), *storage.rendition_keys(user_id, image_id)]
    return sum([(await store.head(key)).size for key in keys])


async def test_usage_counts_original_and_every_rendition(client, run_worker, redis, store):
    data = make_jpeg(900, 600)

    upload_id = await client.upload(data)
    await run_worker()
    user_id = await _user_id(redis, upload_id)
    usage = await quotas.get_usage(redis, user_id)

    stored = await _stored_bytes(store, user_id, upload_id)
    assert stored > len(data)
    assert usage.bytes == stored
    assert usage.images == 1
    assert usage.reserved_images == 0


async def test_form_over_byte_quota_is_refused_with_quota_and_usage(
    make_client, settings, run_worker, redis, store
):
    client = await make_client(app_settings=replace(settings, quota_bytes=20_000))
    upload_id = await client.upload(make_jpeg(300, 200))
    await run_worker()
    used = await _stored_bytes(store, await _user_id(redis, upload_id), upload_id)

    response = await client.request_form("big.jpg", "image/jpeg", 20_000 - used + 1)

    assert response.status_code == 403
    message = response.json()["error"]
    assert "does not fit in your quota" in message
    assert f"You use {quotas.format_bytes(used)} of 19.5 KiB" in message
    assert "1 of 100000 images" in message


async def test_form_that_fits_the_space_left_is_signed(make_client, settings, run_worker):
    client = await make_client(app_settings=replace(settings, quota_bytes=20_000))
    await client.upload(make_jpeg(64, 48))
    await run_worker()

    response = await client.request_form("small.jpg", "image/jpeg", 1000)

    assert response.status_code == 201, response.text


async def test_image_count_quota_refuses_next_form(make_client, settings, run_worker):
    client = await make_client(app_settings=replace(settings, quota_images=1))
    await client.upload(make_jpeg())
    await run_worker()

    response = await client.request_form("second.jpg", "image/jpeg", 100)

    assert response.status_code == 403
    assert "1 of 1 images" in response.json()["error"]


async def test_deleting_image_frees_its_space(make_client, settings, run_worker, redis):
    client = await make_client(app_settings=replace(settings, quota_images=1))
    upload_id = await client.upload(make_jpeg())
    await run_worker()
    user_id = await _user_id(redis, upload_id)
    await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})

    deleted = await client.delete(upload_id)
    usage = await quotas.get_usage(redis, user_id)
    response = await client.request_form("next.jpg", "image/jpeg", 100)

    assert deleted.status_code == 200
    assert usage == Usage(bytes=0, images=0)
    assert response.status_code == 201, response.text


async def test_outstanding_form_reserves_its_size(make_client, settings, redis):
    client = await make_client(app_settings=replace(settings, quota_bytes=1000))

    first = await client.request_form("a.jpg", "image/jpeg", 600)
    second = await client.request_form("b.jpg", "image/jpeg", 600)
    third = await client.request_form("c.jpg", "image/jpeg", 400)

    assert first.status_code == 201
    assert second.status_code == 403
    assert "plus 1 upload in progress (600 bytes)" in second.json()["error"]
    assert third.status_code == 201
    usage = await quotas.get_usage(redis, await _user_id(redis, first.json()["id"]))
    assert (usage.reserved_bytes, usage.reserved_images) == (1000, 2)


async def test_expired_form_releases_its_reservation(make_client, settings):
    app_settings = replace(settings, quota_bytes=1000, upload_form_seconds=1)
    client = await make_client(app_settings=app_settings)
    first = await client.request_form("a.jpg", "image/jpeg", 900)

    await asyncio.sleep(1.2)
    second = await client.request_form("b.jpg", "image/jpeg", 900)

    assert first.status_code == 201
    assert second.status_code == 201, second.text


async def test_completed_upload_keeps_reservation_past_form_expiry(make_client, settings, redis):
    # The form must outlive the post to S3 on a loaded machine, then expire.
    app_settings = replace(settings, quota_bytes=1000, upload_form_seconds=3)
    client = await make_client(app_settings=app_settings)
    data = make_jpeg()
    upload_id = await client.upload(data)

    await asyncio.sleep(3.2)
    usage = await quotas.get_usage(redis, await _user_id(redis, upload_id))

    assert (usage.reserved_bytes, usage.reserved_images) == (len(data), 1)


async def test_rejected_upload_ends_its_reservation(client, run_worker, redis):
    upload_id = await client.upload(b"not a jpeg at all" * 10)

    await run_worker()
    usage = await quotas.get_usage(redis, await _user_id(redis, upload_id))

    assert (await index.get_upload(redis, upload_id)).state == index.State.REJECTED
    assert usage == Usage(bytes=0, images=0)


async def test_commit_and_release_count_once(redis):
    await quotas.commit(redis, "quota-once", "image-1", 500)
    await quotas.commit(redis, "quota-once", "image-1", 500)
    counted = await quotas.get_usage(redis, "quota-once")
    await quotas.release(redis, "quota-once", "image-1")
    await quotas.release(redis, "quota-once", "image-1")

    assert counted == Usage(bytes=500, images=1)
    assert await quotas.get_usage(redis, "quota-once") == Usage(bytes=0, images=0)


async def test_set_quota_overrides_then_restores_default(redis, settings):
    await quotas.set_quota(redis, "quota-own", max_bytes=123, max_images=None)
    own = await quotas.get_quota(redis, "quota-own", settings)
    await quotas.set_quota(redis, "quota-own", max_bytes=None, max_images=None)
    default = await quotas.get_quota(redis, "quota-own", settings)

    assert own == Quota(max_bytes=123, max_images=settings.quota_images)
    assert default == Quota(max_bytes=settings.quota_bytes, max_images=settings.quota_images)


async def test_upload_page_shows_quota_and_largest_file(make_client, settings):
    client = await make_client(app_settings=replace(settings, quota_bytes=2 * 1024 * 1024))

    page = await client.http.get("/images")

    assert "You use 0 bytes of 2.0 MiB and 0 of 100000 images." in page.text
    assert f'data-max-bytes="{2 * 1024 * 1024}"' in page.text
