"""The worker's jobs on SeaweedFS: checks against the upload record, races, and purging."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from io import BytesIO

import httpx
from PIL import Image

from gallery import index, storage
from gallery.images import format_mib
from gallery.index import State
from gallery.storage import Storage
from tests.support import make_jpeg, post_to_s3
from worker.settings import make_worker
from worker.sweep import sweep


async def _issue_form(client, data: bytes, name: str = "photo.jpg") -> dict:
    response = await client.request_form(name, "image/jpeg", len(data))
    assert response.status_code == 201, response.text
    return response.json()


async def test_object_with_other_owner_is_rejected(client, run_worker, store, redis):
    data = make_jpeg()
    form = await _issue_form(client, data)
    key = form["fields"]["key"]
    # Written with the server's own keys, as only a holder of them could: S3 would reject a
    # form whose owner field differs from the signed one.
    await store.write(key, data, content_type="image/jpeg", metadata={"owner": "someone-else"})

    await client.complete(form["id"])
    await run_worker()
    tile = await client.tile(form["id"])

    assert "Rejected: not uploaded with this account" in tile.text
    assert await store.head(key) is None


async def test_object_with_other_type_is_rejected(client, run_worker, store, redis):
    data = make_jpeg()
    form = await _issue_form(client, data)
    owner = form["fields"]["x-amz-meta-owner"]
    await store.write(
        form["fields"]["key"], data, content_type="image/png", metadata={"owner": owner}
    )

    await client.complete(form["id"])
    await run_worker()

    assert (
        "Rejected: stored as PNG, not the JPEG its form allowed"
        in (await client.tile(form["id"])).text
    )


async def test_object_over_signed_size_is_rejected(client, run_worker, store):
    data = make_jpeg()
    form = await _issue_form(client, data)
    owner = form["fields"]["x-amz-meta-owner"]
    # A form enforces the signed size, so only a holder of the server's keys can write this.
    larger = data + bytes(100)
    key = form["fields"]["key"]
    await store.write(key, larger, content_type="image/jpeg", metadata={"owner": owner})

    await client.complete(form["id"])
    await run_worker()

    limit = format_mib(len(data))
    assert (
        f"Rejected: file over the {limit} MiB its form allowed"
        in (await client.tile(form["id"])).text
    )
    assert await store.head(key) is None


async def test_read_object_skips_body_over_limit(store):
    key = "u/nobody/o/read-object"
    await store.write(key, b"12345", content_type="image/jpeg", metadata={"owner": "nobody"})

    within = await store.read_object(key, max_bytes=5)
    over = await store.read_object(key, max_bytes=4)
    missing = await store.read_object("u/nobody/o/missing", max_bytes=5)

    assert within.body == b"12345"
    assert within.info == storage.ObjectInfo(5, "image/jpeg", {"owner": "nobody"})
    assert over.body is None
    assert over.info.size == 5
    assert missing is None


async def test_complete_without_object_is_rejected_once_form_expires(
    make_client, settings, run_worker, redis
):
    client = await make_client(app_settings=replace(settings, upload_form_seconds=2))
    form = await _issue_form(client, make_jpeg())

    await client.complete(form["id"])
    await run_worker()

    upload = await index.get_upload(redis, form["id"])
    assert time.time() >= upload.form_expires_at
    assert "Rejected: the file never arrived" in (await client.tile(form["id"])).text


async def test_file_sent_after_done_message_becomes_ready(make_client, settings, run_worker, redis):
    client = await make_client(app_settings=replace(settings, upload_form_seconds=3))
    data = make_jpeg()
    form = await _issue_form(client, data)

    await client.complete(form["id"])
    worker = asyncio.create_task(run_worker())
    await asyncio.sleep(1)
    await post_to_s3(form, data)
    await worker

    assert (await index.get_upload(redis, form["id"])).state == index.State.READY


async def test_delete_while_processing_leaves_nothing(client, run_worker, store, redis):
    upload_id = await client.upload(make_jpeg())
    user_id = (await index.get_upload(redis, upload_id)).user_id

    deleted = await client.delete(upload_id)
    await run_worker()

    assert deleted.status_code == 200
    assert await index.get_upload(redis, upload_id) is None
    assert [key async for key in store.list_keys(f"u/{user_id}/")] == []
    assert [key async for key in store.list_keys(f"incoming/{user_id}/")] == []


async def test_complete_of_other_users_upload_returns_404(make_client, run_worker, redis):
    alice = await make_client()
    bob = await make_client()
    data = make_jpeg()
    form = await _issue_form(alice, data)
    assert (await post_to_s3(form, data)).status_code == 201

    response = await bob.complete(form["id"])

    assert response.status_code == 404
    assert (await index.get_upload(redis, form["id"])).state == State.ISSUED


async def test_sweep_requeues_upload_whose_job_went_missing(
    client, run_worker, store, redis, settings
):
    data = make_jpeg()
    form = await _issue_form(client, data)
    assert (await post_to_s3(form, data)).status_code == 201
    upload = await index.get_upload(redis, form["id"])
    await index.mark_uploaded(redis, upload)
    await redis.zadd(index.PENDING_KEY, {upload.id: time.time() - 3600})
    ctx = {"redis": redis, "store": store, "settings": replace(settings, purge_grace_seconds=60)}

    counts = await sweep(ctx)
    await run_worker()

    assert counts.requeued >= 1
    assert (await index.get_upload(redis, upload.id)).state == State.READY


async def test_delete_sends_batches_of_at_most_1000(settings):
    calls: list[int] = []
    async with Storage.open(settings) as store:
        original = store._client.delete_objects

        async def record(**kwargs):
            calls.append(len(kwargs["Delete"]["Objects"]))
            return await original(**kwargs)

        store._client.delete_objects = record
        sent = await store.delete(f"incoming/nobody/{number:05d}" for number in range(2001))

    assert sent == 2001
    assert calls == [1000, 1000, 1]


async def test_public_endpoint_names_the_browsers_host(s3_server, settings, store):
    key = "u/nobody/t/public.webp"
    await store.write(key, b"thumbnail", content_type="image/webp", metadata={})
    port = s3_server.endpoint_url.rsplit(":", 1)[1]
    public = replace(settings, s3_public_endpoint_url=f"http://localhost:{port}")

    async with Storage.open(public) as public_store:
        url = await public_store.presign_get(key, content_type="image/webp")
        form = await public_store.presign_upload(
            "u/nobody/incoming/public",
            content_type="image/jpeg",
            owner="nobody",
            max_bytes=100,
            expires_in=60,
        )
    async with httpx.AsyncClient() as http:
        response = await http.get(url)

    assert url.startswith(f"http://localhost:{port}/")
    assert form.url.startswith(f"http://localhost:{port}/")
    assert response.status_code == 200
    assert response.content == b"thumbnail"


async def test_animation_over_pixel_budget_is_rejected(client, settings, store, redis):
    # 3 frames of 8x8 are 192 frame pixels, over a budget of 2 frames.
    frames = [Image.new("RGB", (8, 8), (40 * number, 0, 0)) for number in range(3)]
    buffer = BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    upload_id = await client.upload(buffer.getvalue(), "moving.gif", "image/gif")
    worker = make_worker(
        replace(settings, max_animation_pixels=2 * 8 * 8),
        burst=True,
        poll_delay=0.05,
        handle_signals=False,
    )

    try:
        await worker.main()
    finally:
        await worker.close()

    tile = (await client.tile(upload_id)).text
    assert "Rejected: animation over the frame limit (2 frames at this size)" in tile


async def test_image_over_pixel_limit_names_limit_in_megapixels(client, settings):
    upload_id = await client.upload(make_jpeg(1200, 1000), "wide.jpg")
    worker = make_worker(
        replace(settings, max_pixels=1_000_000), burst=True, poll_delay=0.05, handle_signals=False
    )

    try:
        await worker.main()
    finally:
        await worker.close()

    tile = (await client.tile(upload_id)).text
    assert "Rejected: 1200x1000 pixels, over the 1-megapixel limit" in tile


async def _purge_now(redis, store, settings) -> None:
    ctx = {"redis": redis, "store": store, "settings": replace(settings, purge_grace_seconds=0)}
    await sweep(ctx)


async def test_purge_deletes_file_posted_again_after_ready(
    client, run_worker, store, redis, settings
):
    data = make_jpeg()
    form = await _issue_form(client, data)
    assert (await post_to_s3(form, data)).status_code == 201
    await client.complete(form["id"])
    await run_worker()
    assert (await post_to_s3(form, data)).status_code == 201

    await _purge_now(redis, store, settings)

    upload = await index.get_upload(redis, form["id"])
    assert upload.state == State.READY
    assert await store.head(form["fields"]["key"]) is None
    assert await store.head(storage.original_key(upload.user_id, upload.id)) is not None


async def test_purge_deletes_file_posted_after_delete(client, store, redis, settings):
    data = make_jpeg()
    form = await _issue_form(client, data)
    await client.complete(form["id"])
    await client.delete(form["id"])
    assert (await post_to_s3(form, data)).status_code == 201

    await _purge_now(redis, store, settings)

    assert await store.head(form["fields"]["key"]) is None


async def test_purge_keeps_file_of_waiting_upload(client, store, redis, settings):
    data = make_jpeg()
    form = await _issue_form(client, data)
    assert (await post_to_s3(form, data)).status_code == 201

    await _purge_now(redis, store, settings)

    assert await store.head(form["fields"]["key"]) is not None
    assert (await index.get_upload(redis, form["id"])).state == State.ISSUED
