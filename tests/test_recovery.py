"""Recovery drills on SeaweedFS and Valkey: the sweep, idempotent jobs, crashes and cron ticks."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import arq.worker
from litestar.testing import AsyncTestClient

from gallery import index, storage
from gallery.app import create_app
from gallery.index import State
from gallery.storage import Storage
from tests.support import HTMX, make_jpeg, post_to_s3, seed_grid
from worker import sweep as sweep_module
from worker.jobs import MAX_ATTEMPTS, REASON_FAILED, verify_upload
from worker.settings import make_worker
from worker.sweep import SweepCounts, scheduled_time, sweep

REPO_ROOT = Path(__file__).resolve().parents[1]
# The crashed worker's job timeout: arq lets another worker run the job again once the
# timeout plus 10 s has passed since the crashed worker started it.
CRASH_JOB_TIMEOUT = 3
WAIT_SECONDS = 60


async def _user_id(client, redis) -> str:
    raw = await redis.get(f"gallery:username:{client.username.lower()}")
    return raw.decode()


async def _expire_form(redis, upload_id: str, *, ago: float = 3600) -> None:
    """Make an upload look as if its form expired `ago` seconds ago and the sweep is due."""
    expired = time.time() - ago
    await redis.hset(f"gallery:upload:{upload_id}", "form_expires_at", expired)
    await redis.zadd(index.PENDING_KEY, {upload_id: expired})


def _ctx(redis, store, settings, **changes) -> dict:
    return {"redis": redis, "store": store, "settings": replace(settings, **changes), "pool": None}


async def test_unreported_upload_becomes_ready(client, run_worker, store, redis, settings):
    data = make_jpeg()
    form = (await client.request_form("unreported.jpg", "image/jpeg", len(data))).json()
    assert (await post_to_s3(form, data)).status_code == 201
    await _expire_form(redis, form["id"])

    counts = await sweep(_ctx(redis, store, settings, purge_grace_seconds=60))
    await run_worker()

    upload = await index.get_upload(redis, form["id"])
    assert counts.promoted >= 1
    assert upload.state == State.READY
    assert await store.head(storage.thumbnail_key(upload.user_id, upload.id)) is not None
    assert await store.head(storage.incoming_key(upload.user_id, upload.id)) is None
    assert "unreported.jpg" in (await client.http.get("/images")).text


async def test_gallery_page_finds_unreported_upload(client, run_worker, redis, forget_uploads):
    # The page was reloaded after the file reached S3 and before it sent "done".
    data = make_jpeg()
    posted = (await client.request_form("posted.jpg", "image/jpeg", len(data))).json()
    unused = (await client.request_form("unused.jpg", "image/jpeg", len(data))).json()
    forget_uploads.append(unused["id"])
    assert (await post_to_s3(posted, data)).status_code == 201

    page = await client.http.get("/images")
    found = await index.get_upload(redis, posted["id"])
    await run_worker()

    assert page.status_code == 200
    assert f'id="tile-{posted["id"]}"' in page.text
    assert f'id="tile-{unused["id"]}"' not in page.text
    assert found.state == State.UPLOADED
    assert (await index.get_upload(redis, posted["id"])).state == State.READY
    assert (await index.get_upload(redis, unused["id"])).state == State.ISSUED


async def test_upload_whose_file_never_arrived_is_purged(client, store, redis, settings):
    form = (await client.request_form("never.jpg", "image/jpeg", 100)).json()
    user_id = await _user_id(client, redis)
    await _expire_form(redis, form["id"])

    counts = await sweep(_ctx(redis, store, settings, purge_grace_seconds=60))

    assert counts.purged >= 1
    assert await index.get_upload(redis, form["id"]) is None
    assert await redis.zscore(index.PENDING_KEY, form["id"]) is None
    assert await redis.zscore(f"gallery:user-pending:{user_id}", form["id"]) is None


async def test_unreported_upload_within_grace_is_kept(
    client, store, redis, settings, forget_uploads
):
    form = (await client.request_form("late.jpg", "image/jpeg", 100)).json()
    forget_uploads.append(form["id"])
    await _expire_form(redis, form["id"], ago=10)

    await sweep(_ctx(redis, store, settings, purge_grace_seconds=600))

    assert (await index.get_upload(redis, form["id"])).state == State.ISSUED
    assert await redis.zscore(index.PENDING_KEY, form["id"]) > time.time() + 500


async def test_concurrent_verify_keeps_one_image(client, store, redis, settings):
    upload_id = await client.upload(make_jpeg(640, 480))
    ctx = {**_ctx(redis, store, settings), "job_try": 1}

    outcomes = await asyncio.gather(verify_upload(ctx, upload_id), verify_upload(ctx, upload_id))

    upload = await index.get_upload(redis, upload_id)
    keys = [key async for key in store.list_keys(f"u/{upload.user_id}/")]
    assert "ready" in outcomes
    assert upload.state == State.READY
    assert await index.count_grid(redis, upload.user_id) == 1
    assert sorted(keys) == sorted(storage.image_keys(upload.user_id, upload_id)[1:])
    assert [key async for key in store.list_keys(f"incoming/{upload.user_id}/")] == []


async def test_stuck_verifying_upload_is_queued_again(client, run_worker, store, redis, settings):
    upload_id = await client.upload(make_jpeg())
    upload = await index.get_upload(redis, upload_id)
    # As after a worker died mid-job and arq dropped the job: verifying, no job, sweep due.
    await index.mark_verifying(redis, upload)
    await redis.delete(f"arq:job:verify:{upload_id}", "arq:queue")
    await redis.zadd(index.PENDING_KEY, {upload_id: time.time() - 1})

    counts = await sweep(_ctx(redis, store, settings))
    await run_worker()

    assert counts.requeued >= 1
    assert (await index.get_upload(redis, upload_id)).state == State.READY


async def test_upload_failing_every_attempt_is_rejected(client, store, redis, settings):
    upload_id = await client.upload(make_jpeg())
    upload = await index.get_upload(redis, upload_id)
    await redis.hset(f"gallery:upload:{upload_id}", "attempts", MAX_ATTEMPTS)
    await index.mark_verifying(redis, upload)
    await redis.delete(f"arq:job:verify:{upload_id}")
    await redis.zadd(index.PENDING_KEY, {upload_id: time.time() - 1})

    counts = await sweep(_ctx(redis, store, settings))

    upload = await index.get_upload(redis, upload_id)
    assert counts.failed >= 1
    assert upload.state == State.REJECTED
    assert upload.reason == REASON_FAILED
    assert [key async for key in store.list_keys(f"incoming/{upload.user_id}/")] == []
    assert await redis.zscore(index.PENDING_KEY, upload_id) is None


async def test_worker_killed_mid_thumbnail_is_finished_by_another(
    client, store, redis, settings, tmp_path
):
    upload_id = await client.upload(make_jpeg(800, 600), "crash.jpg")
    user_id = await _user_id(client, redis)
    marker = tmp_path / "thumbnail-written"
    log_path = tmp_path / "crashing-worker.log"

    with log_path.open("wb") as log:
        crashing = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.pausing_worker",
            str(marker),
            str(CRASH_JOB_TIMEOUT),
            cwd=REPO_ROOT,
            env={**os.environ, **settings.to_env()},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        await _wait_for_file(marker, crashing, log_path)
        state_at_kill = (await index.get_upload(redis, upload_id)).state
        # The whole process group, with the decoding pool, as a container's end kills it.
        os.killpg(crashing.pid, signal.SIGKILL)
        await asyncio.wait_for(crashing.wait(), timeout=10)
    finally:
        if crashing.returncode is None:
            os.killpg(crashing.pid, signal.SIGKILL)
            await crashing.wait()
    renditions_at_kill = [key async for key in store.list_keys(f"u/{user_id}/")]
    worker = make_worker(settings, burst=True, poll_delay=0.2, handle_signals=False)
    try:
        await asyncio.wait_for(worker.main(), timeout=WAIT_SECONDS)
    finally:
        await worker.close()

    upload = await index.get_upload(redis, upload_id)
    grid, _ = await index.list_grid(redis, user_id, before=None, limit=10)
    thumbnails = [key async for key in store.list_keys(f"u/{user_id}/t/")]
    assert state_at_kill == State.VERIFYING
    assert storage.display_key(user_id, upload_id) not in renditions_at_kill
    assert upload.state == State.READY
    assert upload.attempts == 2
    assert [item.id for item in grid] == [upload_id]
    assert thumbnails == [storage.thumbnail_key(user_id, upload_id)]
    assert sorted([key async for key in store.list_keys(f"u/{user_id}/")]) == sorted(
        storage.image_keys(user_id, upload_id)[1:]
    )
    assert await redis.zscore(index.PENDING_KEY, upload_id) is None
    assert await redis.zcard(f"gallery:user-pending:{user_id}") == 0


async def _wait_for_file(path: Path, process: asyncio.subprocess.Process, log_path: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not path.exists():
        if process.returncode is not None:
            raise RuntimeError(f"worker exited with {process.returncode}: {log_path.read_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no thumbnail written in {WAIT_SECONDS} s, see {log_path}")
        await asyncio.sleep(0.05)


async def test_three_workers_run_sweep_once_per_tick(settings, monkeypatch):
    ticks: list[float] = []

    async def record_tick(ctx) -> SweepCounts:
        ticks.append(scheduled_time(ctx))
        return SweepCounts()

    monkeypatch.setattr(sweep_module, "sweep", record_tick)
    # arq keeps a finished cron job's in-progress key 60 s so that a late copy of the job
    # waits; shortened, the late copy runs within the test, as it would after 60 s.
    monkeypatch.setattr(arq.worker, "keep_cronjob_progress", 0.3)
    every_second = replace(settings, sweep_interval_seconds=1)
    workers = [make_worker(every_second, poll_delay=0.05, handle_signals=False) for _ in range(3)]
    # The third worker's clock is 0.6 s behind, as another host's may be, so it enqueues each
    # tick after the first run has ended and arq has dropped the job id.
    on_time_cron = workers[2].run_cron

    async def late_cron(now: datetime, delay: float, num_windows: int = 2) -> None:
        await on_time_cron(now - timedelta(seconds=0.6), delay, num_windows)

    workers[2].run_cron = late_cron
    tasks = [asyncio.create_task(worker.main()) for worker in workers]
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while len(set(ticks)) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # A second run of the fifth tick would come within 0.7 s of the first.
        await asyncio.sleep(0.8)
        observed = list(ticks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in workers:
            await worker.close()

    assert len(set(observed)) == 5
    assert len(observed) == 5
    assert sorted(observed) == observed


async def test_sweep_deletes_2500_abandoned_objects_in_batches(
    client, redis, settings, forget_uploads
):
    own_bucket = replace(settings, s3_bucket=f"test-sweep-{secrets.token_hex(4)}")
    user_id = await _user_id(client, redis)
    fresh = []
    for _ in range(10):
        form = (await client.request_form("fresh.jpg", "image/jpeg", 10)).json()
        fresh.append(storage.incoming_key(user_id, form["id"]))
        forget_uploads.append(form["id"])
    abandoned = [storage.incoming_key(user_id, index.new_upload_id()) for _ in range(2500)]
    batches: list[int] = []

    async with Storage.open(own_bucket) as store:
        await store.ensure_bucket([own_bucket.app_url])
        limit = asyncio.Semaphore(32)

        async def put(key: str) -> None:
            async with limit:
                await store.write(key, b"x", content_type="image/jpeg", metadata={"owner": user_id})

        await asyncio.gather(*(put(key) for key in [*abandoned, *fresh]))
        delete_objects = store._client.delete_objects

        async def record_batch(**kwargs):
            batches.append(len(kwargs["Delete"]["Objects"]))
            return await delete_objects(**kwargs)

        store._client.delete_objects = record_batch
        counts = await sweep(_ctx(redis, store, own_bucket, purge_grace_seconds=0))
        left = sorted([key async for key in store.list_keys(storage.INCOMING_LIFECYCLE_PREFIX)])

    assert counts.stray == 2500
    assert left == sorted(fresh)
    assert sum(batches) == 2500
    assert max(batches) <= 1000


async def test_1200_ready_images_page_through_grid(client, redis, settings):
    user_id = await _user_id(client, redis)
    created = await seed_grid(redis, user_id, 1200, ready=True)
    tile_id = re.compile(r'id="tile-([0-9a-f]+)"')
    cursor = re.compile(r'hx-get="/images\?before=([0-9a-f]+)"')

    page = (await client.http.get("/images")).text
    seen = tile_id.findall(page)
    pages = 1
    while match := cursor.search(page):
        response = await client.http.get(f"/images?before={match.group(1)}", headers=HTMX)
        assert response.status_code == 200
        page = response.text
        seen.extend(tile_id.findall(page))
        pages += 1

    assert seen == sorted(created, reverse=True)
    assert pages == -(-1200 // settings.page_size)


async def test_gallery_page_answers_while_s3_hangs(make_client, settings, forget_uploads, caplog):
    # S3 takes connections and never replies, as a paused or overloaded server does: the
    # kernel queues them on a socket that listens and never accepts.
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    client = await make_client()
    form = (await client.request_form("waiting.jpg", "image/jpeg", 100)).json()
    forget_uploads.append(form["id"])
    hung = replace(settings, s3_endpoint_url=f"http://127.0.0.1:{port}")

    try:
        async with AsyncTestClient(create_app(hung)) as offline:
            offline.cookies = client.http.cookies
            started = time.monotonic()
            page = await offline.get("/images")
            seconds = time.monotonic() - started
    finally:
        listener.close()

    skipped = [r.getMessage() for r in caplog.records if "skipped the check" in r.getMessage()]
    assert page.status_code == 200
    assert len(skipped) == 1
    assert "TimeoutError" in skipped[0]
    # The page gives up on S3 after ARRIVAL_CHECK_SECONDS; botocore alone waits 60 s per try.
    assert seconds < 10
