"""The trash: moving images there, Undo and Restore, deleting forever, and the purge job."""

from __future__ import annotations

import json
import time

from botocore.exceptions import EndpointConnectionError
from redis.asyncio import Redis

from gallery import index, quotas, storage, trash
from gallery.index import State
from gallery.storage import Storage
from tests.support import HTMX, make_jpeg
from worker.jobs import DELETED, purge_trash, verify_upload


async def ready_image(client, run_worker, redis) -> tuple[str, str]:
    """Upload one image, run the worker, and return the image id and its owner's id."""
    upload_id = await client.upload(make_jpeg(), "beach.jpg")
    await run_worker()
    return upload_id, (await index.get_upload(redis, upload_id)).user_id


async def keys_present(store, user_id: str, upload_id: str) -> list[str]:
    return [
        key for key in storage.image_keys(user_id, upload_id) if await store.head(key) is not None
    ]


async def test_trash_leaves_grid_keeps_objects(client, run_worker, store, redis):
    upload_id, user_id = await ready_image(client, run_worker, redis)

    response = await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})

    assert response.status_code == 200
    assert response.headers["hx-trigger"] == "galleryChanged"
    assert f'id="trashed-{upload_id}"' in response.text
    assert "Moved beach.jpg to the trash." in response.text
    assert 'hx-swap-oob="innerHTML:#messages"' in response.text
    assert f'hx-post="/images/{upload_id}/restore"' in response.text
    upload = await index.get_upload(redis, upload_id)
    assert upload.state == State.TRASHED
    assert upload.trashed_at > 0
    assert await index.count_grid(redis, user_id) == 0
    assert [u.id for u in await index.list_trash(redis, user_id, limit=10)] == [upload_id]
    assert len(await keys_present(store, user_id, upload_id)) == 4
    gallery = await client.http.get("/images")
    assert f"tile-{upload_id}" not in gallery.text
    trash_page = await client.http.get("/trash")
    assert f"tile-{upload_id}" in trash_page.text
    assert "1 photo in the trash" in trash_page.text
    assert (await client.http.get(f"/images/{upload_id}/original")).status_code == 404


async def test_undo_returns_tile_to_its_place(client, run_worker, redis):
    upload_id, user_id = await ready_image(client, run_worker, redis)
    await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})

    response = await client.http.post(
        f"/images/{upload_id}/restore",
        headers={**client.csrf, **HTMX, "HX-Target": f"trashed-{upload_id}"},
    )

    assert response.status_code == 200
    assert response.headers["hx-trigger"] == "galleryChanged"
    assert 'class="tile tile-ready"' in response.text
    assert (await index.get_upload(redis, upload_id)).state == State.READY
    assert await index.count_grid(redis, user_id) == 1
    assert await index.count_trash(redis, user_id) == 0
    assert await redis.zscore(index.TRASHED_KEY, upload_id) is None


async def test_restore_from_trash_page_removes_entry(client, run_worker, redis):
    upload_id, _ = await ready_image(client, run_worker, redis)
    await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})

    response = await client.http.post(
        f"/images/{upload_id}/restore", headers={**client.csrf, **HTMX}
    )
    again = await client.http.post(f"/images/{upload_id}/restore", headers={**client.csrf, **HTMX})

    assert response.status_code == 200
    assert "tile-ready" not in response.text
    assert "Restored beach.jpg." in response.text
    assert again.status_code == 404


async def test_trash_and_restore_without_htmx_redirect(client, run_worker, redis):
    upload_id, _ = await ready_image(client, run_worker, redis)

    trashed = await client.http.post(
        f"/images/{upload_id}/trash", headers=client.csrf, follow_redirects=False
    )
    gallery = await client.http.get(trashed.headers["location"])
    restored = await client.http.post(
        f"/images/{upload_id}/restore?back_to=gallery", headers=client.csrf, follow_redirects=False
    )

    assert trashed.status_code == 303
    assert trashed.headers["location"] == f"/images?trashed={upload_id}"
    assert "Moved beach.jpg to the trash." in gallery.text
    assert f'action="/images/{upload_id}/restore?back_to=gallery"' in gallery.text
    assert restored.status_code == 303
    assert restored.headers["location"] == "/images"
    assert (await index.get_upload(redis, upload_id)).state == State.READY


async def test_trashed_query_of_other_users_image_shows_nothing(make_client, run_worker, redis):
    alice = await make_client()
    bob = await make_client()
    upload_id, _ = await ready_image(alice, run_worker, redis)
    await alice.http.post(f"/images/{upload_id}/trash", headers={**alice.csrf, **HTMX})

    page = await bob.http.get(f"/images?trashed={upload_id}")
    trash_attempt = await bob.http.post(
        f"/images/{upload_id}/restore", headers={**bob.csrf, **HTMX}
    )

    assert page.status_code == 200
    assert "beach.jpg" not in page.text
    assert trash_attempt.status_code == 404
    assert (await index.get_upload(redis, upload_id)).state == State.TRASHED


async def test_delete_forever_from_trash_removes_everything(client, run_worker, store, redis):
    upload_id, user_id = await ready_image(client, run_worker, redis)
    await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})
    usage_in_trash = await quotas.get_usage(redis, user_id)

    response = await client.delete(upload_id)

    assert usage_in_trash.images == 1
    assert (await quotas.get_usage(redis, user_id)).images == 0
    assert response.status_code == 200
    assert json.loads(response.headers["hx-trigger"]) == {"countChanged": -1}
    assert await keys_present(store, user_id, upload_id) == []
    assert await index.get_upload(redis, upload_id) is None
    assert await index.count_trash(redis, user_id) == 0
    assert await redis.zscore(index.TRASHED_KEY, upload_id) is None


async def test_delete_forever_form_without_htmx(client, run_worker, store, redis):
    upload_id, user_id = await ready_image(client, run_worker, redis)
    await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})

    response = await client.http.post(
        f"/images/{upload_id}", headers=client.csrf, follow_redirects=False
    )

    assert response.status_code == 303
    assert response.headers["location"] == "/trash"
    assert await keys_present(store, user_id, upload_id) == []


async def test_purge_deletes_only_expired_trash(client, run_worker, store, redis, settings):
    old_id, user_id = await ready_image(client, run_worker, redis)
    recent_id, _ = await ready_image(client, run_worker, redis)
    kept_days = settings.trash_retention_days
    old_upload = await index.get_upload(redis, old_id)
    recent_upload = await index.get_upload(redis, recent_id)
    await index.trash_upload(redis, old_upload, now=time.time() - (kept_days + 1) * 86400)
    await index.trash_upload(redis, recent_upload, now=time.time() - (kept_days - 1) * 86400)
    await redis.delete(f"gallery:lock:purge-trash:{int(time.time() // 3600)}")
    ctx = {"redis": redis, "store": store, "settings": settings}

    first = await purge_trash(ctx)
    second = await purge_trash(ctx)

    assert first >= 1
    assert second == 0
    assert await index.get_upload(redis, old_id) is None
    assert await keys_present(store, user_id, old_id) == []
    assert (await index.get_upload(redis, recent_id)).state == State.TRASHED
    assert len(await keys_present(store, user_id, recent_id)) == 4
    assert [u.id for u in await index.list_trash(redis, user_id, limit=10)] == [recent_id]


async def test_purge_skips_image_restored_meanwhile(client, run_worker, store, redis):
    upload_id, user_id = await ready_image(client, run_worker, redis)
    upload = await index.get_upload(redis, upload_id)
    await index.trash_upload(redis, upload, now=time.time() - 90 * 86400)
    await index.untrash_upload(redis, upload)
    # A purge that listed the image before the restore still finds it in its list.
    await redis.zadd(index.TRASHED_KEY, {upload_id: 1.0})

    await trash.purge_expired(redis, store, retention_days=30)

    assert (await index.get_upload(redis, upload_id)).state == State.READY
    assert len(await keys_present(store, user_id, upload_id)) == 4


async def test_only_ready_images_go_to_trash(client, redis):
    response = await client.request_form("photo.jpg", "image/jpeg", 10)
    upload_id = response.json()["id"]

    trashed = await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})

    assert trashed.status_code == 404
    assert (await index.get_upload(redis, upload_id)).state == State.ISSUED


async def test_delete_forever_of_ready_image_returns_409(client, run_worker, store, redis):
    upload_id, user_id = await ready_image(client, run_worker, redis)
    usage = await quotas.get_usage(redis, user_id)
    stored_keys = await keys_present(store, user_id, upload_id)

    response = await client.delete(upload_id)

    assert response.status_code == 409
    assert response.text == "beach.jpg is in your gallery, not in the trash, so it was not deleted."
    assert (await index.get_upload(redis, upload_id)).state == State.READY
    assert stored_keys
    assert await keys_present(store, user_id, upload_id) == stored_keys
    assert await quotas.get_usage(redis, user_id) == usage


async def test_delete_forever_after_restore_elsewhere_keeps_image(client, run_worker, store, redis):
    upload_id, user_id = await ready_image(client, run_worker, redis)
    await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})
    await client.http.post(f"/images/{upload_id}/restore", headers={**client.csrf, **HTMX})
    stored_keys = await keys_present(store, user_id, upload_id)

    stale_tab = await client.delete(upload_id)
    form_without_js = await client.http.post(
        f"/images/{upload_id}", headers=client.csrf, follow_redirects=False
    )

    assert stale_tab.status_code == 409
    assert form_without_js.status_code == 409
    assert "nothing was deleted" in form_without_js.text
    assert (await index.get_upload(redis, upload_id)).state == State.READY
    assert await index.count_grid(redis, user_id) == 1
    assert stored_keys
    assert await keys_present(store, user_id, upload_id) == stored_keys


async def test_delete_forever_sends_note_and_count(client, run_worker, redis):
    upload_id, _ = await ready_image(client, run_worker, redis)
    await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})

    response = await client.delete(upload_id)

    assert response.status_code == 200
    assert json.loads(response.headers["hx-trigger"]) == {"countChanged": -1}
    assert 'hx-swap-oob="innerHTML:#messages"' in response.text
    assert "Deleted beach.jpg forever." in response.text


async def test_delete_forever_after_stale_read_keeps_image(client, run_worker, store, redis):
    upload_id, user_id = await ready_image(client, run_worker, redis)
    await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})
    # The delete request read the image in the trash; a restore in another tab came next.
    stale = await index.get_upload(redis, upload_id)
    await client.http.post(f"/images/{upload_id}/restore", headers={**client.csrf, **HTMX})

    deleted = await trash.delete_forever(redis, store, stale)

    assert stale.state == State.TRASHED
    assert deleted is False
    assert (await index.get_upload(redis, upload_id)).state == State.READY
    assert len(await keys_present(store, user_id, upload_id)) == 4


async def test_restore_during_delete_forever_fails(
    client, run_worker, store, redis, settings, monkeypatch
):
    upload_id, user_id = await ready_image(client, run_worker, redis)
    await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})
    upload = await index.get_upload(redis, upload_id)
    delete_objects = Storage.delete
    restores = []

    async def restore_then_delete(self, keys):
        # A restore reaches Redis while the delete's requests to S3 are on their way. The
        # app runs on the test client's own event loop, so it needs a client of its own.
        async with Redis.from_url(settings.redis_url) as own_redis:
            restores.append(await index.untrash_upload(own_redis, upload))
        await delete_objects(self, keys)

    monkeypatch.setattr(Storage, "delete", restore_then_delete)
    response = await client.delete(upload_id)

    assert response.status_code == 200
    assert restores == [False]
    assert await index.get_upload(redis, upload_id) is None
    assert await index.count_grid(redis, user_id) == 0
    assert await keys_present(store, user_id, upload_id) == []


async def test_failed_delete_forever_leaves_image_restorable(
    client, run_worker, store, redis, monkeypatch
):
    upload_id, user_id = await ready_image(client, run_worker, redis)
    await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})

    async def unreachable(self, keys):
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    with monkeypatch.context() as patch:
        patch.setattr(Storage, "delete", unreachable)
        failed = await client.delete(upload_id)
    restored = await client.http.post(
        f"/images/{upload_id}/restore", headers={**client.csrf, **HTMX}
    )

    assert failed.status_code == 503
    assert restored.status_code == 200
    assert (await index.get_upload(redis, upload_id)).state == State.READY
    assert len(await keys_present(store, user_id, upload_id)) == 4


async def test_verify_of_upload_being_deleted_stores_nothing(
    client, store, redis, settings, forget_uploads, monkeypatch
):
    upload_id = await client.upload(make_jpeg(), "beach.jpg")
    # Its queued job, run by a later test's worker, then finds no record and ends at once.
    forget_uploads.append(upload_id)
    upload = await index.get_upload(redis, upload_id)
    ctx = {"redis": redis, "store": store, "settings": settings, "job_try": 1, "pool": None}
    mark_ready = index.mark_ready

    async def claim_then_mark_ready(redis, upload, **values):
        # The owner deletes the processing tile while its job is about to finish.
        assert await index.claim_delete(redis, upload)
        return await mark_ready(redis, upload, **values)

    monkeypatch.setattr(index, "mark_ready", claim_then_mark_ready)
    outcome = await verify_upload(ctx, upload_id)

    assert outcome == DELETED
    assert (await index.get_upload(redis, upload_id)).state != State.READY
    assert await index.count_grid(redis, upload.user_id) == 1
    assert await keys_present(store, upload.user_id, upload_id) == []


async def test_verify_of_claimed_upload_is_skipped(client, store, redis, settings, forget_uploads):
    upload_id = await client.upload(make_jpeg(), "beach.jpg")
    forget_uploads.append(upload_id)
    upload = await index.get_upload(redis, upload_id)
    assert await index.claim_delete(redis, upload)
    ctx = {"redis": redis, "store": store, "settings": settings, "job_try": 1, "pool": None}

    outcome = await verify_upload(ctx, upload_id)

    assert outcome == "skipped"
    assert await store.head(storage.incoming_key(upload.user_id, upload_id)) is not None
