"""`gallery reindex` on SeaweedFS and Valkey: the index comes back from the bucket alone."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import replace

import pytest
from arq.connections import ArqRedis
from click.testing import CliRunner

from gallery import index, quotas, storage
from gallery.cli import main
from gallery.embedded import EmbeddedRedis
from gallery.index import State
from gallery.storage import Storage
from tests.support import HTMX, make_jpeg
from worker.settings import make_worker

# Names with characters that S3 metadata cannot hold as they are.
NAMES = ["beach.jpg", "été au lac 🌅.jpg", 'quote "and" slash \\ name.jpg']


@pytest.fixture
async def isolated(tmp_path, settings):
    """Hand over settings on a Valkey server and a bucket of this test alone."""
    with EmbeddedRedis(tmp_path / "valkey") as server:
        own = replace(settings, redis_url=server.url, s3_bucket=f"test-{secrets.token_hex(4)}")
        async with Storage.open(own) as store:
            await store.ensure_bucket([own.app_url])
        yield own


async def _run_worker(settings) -> None:
    worker = make_worker(settings, burst=True, poll_delay=0.05, handle_signals=False)
    try:
        await worker.main()
    finally:
        await worker.close()


def _snapshot(uploads):
    return [
        (u.id, u.filename, u.created_at, u.width, u.height, u.size, u.content_type, u.placeholder)
        for u in uploads
    ]


async def test_reindex_restores_two_users_after_flush(isolated, make_client):
    users = [await make_client(app_settings=isolated) for _ in range(2)]
    for number, client in enumerate(users):
        for name in NAMES:
            await client.upload(make_jpeg(300 + number, 200, (number * 90, 60, 30)), name)
    await _run_worker(isolated)
    redis = ArqRedis.from_url(isolated.redis_url)
    try:
        user_ids = [
            (await redis.get(f"gallery:username:{client.username.lower()}")).decode()
            for client in users
        ]
        before = {}
        usage_before = {}
        for user_id in user_ids:
            grid, _ = await index.list_grid(redis, user_id, before=None, limit=100)
            before[user_id] = _snapshot(grid)
            usage_before[user_id] = await quotas.get_usage(redis, user_id)
        await redis.flushall()

        result = await asyncio.to_thread(
            CliRunner().invoke, main, ["reindex"], env=isolated.to_env()
        )
        again = await asyncio.to_thread(
            CliRunner().invoke, main, ["reindex"], env=isolated.to_env()
        )

        after = {}
        states = []
        usage_after = {}
        for user_id in user_ids:
            grid, _ = await index.list_grid(redis, user_id, before=None, limit=100)
            after[user_id] = _snapshot(grid)
            states.extend(upload.state for upload in grid)
            usage_after[user_id] = await quotas.get_usage(redis, user_id)
    finally:
        await redis.aclose()

    assert result.exit_code == 0, result.output
    assert "restored 6 images of 2 users (0 queued" in result.output
    assert "restored 0 images" in again.output
    assert "6 were already indexed" in again.output
    for user_id in user_ids:
        assert len(before[user_id]) == 3
        assert after[user_id] == before[user_id]
        assert usage_after[user_id] == usage_before[user_id]
    assert sorted(name for _, name, *_ in after[user_ids[0]]) == sorted(NAMES)
    assert states == [State.READY] * 6


async def test_reindex_queues_image_missing_a_rendition(isolated, make_client):
    client = await make_client(app_settings=isolated)
    upload_id = await client.upload(make_jpeg(), "half.jpg")
    await _run_worker(isolated)
    redis = ArqRedis.from_url(isolated.redis_url)
    try:
        user_id = (await index.get_upload(redis, upload_id)).user_id
        async with Storage.open(isolated) as store:
            await store.delete([storage.display_key(user_id, upload_id)])
        await redis.flushall()

        result = await asyncio.to_thread(
            CliRunner().invoke, main, ["reindex"], env=isolated.to_env()
        )
        restored = await index.get_upload(redis, upload_id)
        await _run_worker(isolated)
        finished = await index.get_upload(redis, upload_id)
        async with Storage.open(isolated) as store:
            display = await store.head(storage.display_key(user_id, upload_id))
    finally:
        await redis.aclose()

    assert "(1 queued for a worker to finish, 0 back in the trash)" in result.output
    assert restored.state == State.UPLOADED
    assert finished.state == State.READY
    assert finished.filename == "half.jpg"
    assert display is not None


async def test_reindex_puts_trashed_image_back_in_trash(isolated, make_client):
    client = await make_client(app_settings=isolated)
    untouched, trashed, restored = [
        await client.upload(make_jpeg(320, 240, (40 * number, 90, 60)), f"{number}.jpg")
        for number in range(3)
    ]
    await _run_worker(isolated)
    headers = {**client.csrf, **HTMX}
    for image_id in (trashed, restored):
        response = await client.http.post(f"/images/{image_id}/trash", headers=headers)
        assert response.status_code == 200
    response = await client.http.post(f"/images/{restored}/restore", headers=headers)
    assert response.status_code == 200
    redis = ArqRedis.from_url(isolated.redis_url)
    try:
        trashed_before = await index.get_upload(redis, trashed)
        user_id = trashed_before.user_id
        await redis.flushall()

        result = await asyncio.to_thread(
            CliRunner().invoke, main, ["reindex"], env=isolated.to_env()
        )

        grid, _ = await index.list_grid(redis, user_id, before=None, limit=10)
        trash = await index.list_trash(redis, user_id, limit=10)
    finally:
        await redis.aclose()

    assert result.exit_code == 0, result.output
    assert "1 back in the trash" in result.output
    assert sorted(upload.id for upload in grid) == sorted([untouched, restored])
    assert [upload.id for upload in trash] == [trashed]
    assert trash[0].state == State.TRASHED
    assert trash[0].trashed_at == trashed_before.trashed_at
