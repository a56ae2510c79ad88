"""Outage drills: Redis restarted under load, S3 unreachable, and the health endpoints."""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from arq import Retry, func
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from litestar.testing import AsyncTestClient
from redis.exceptions import WatchError

from gallery import index
from gallery.app import create_app
from gallery.embedded import EmbeddedRedis, free_port
from gallery.health import WORKER_HEARTBEAT_KEY
from gallery.index import State
from gallery.storage import Storage
from tests.support import HTMX, gallery_process, make_jpeg, post_to_s3
from worker.jobs import DEFERRED, MAX_TRIES, verify_upload
from worker.settings import ReconnectingWorker, make_worker

REPO_ROOT = Path(__file__).resolve().parents[1]
BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
WAIT_SECONDS = 90


async def _wait_until(check, what: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not await check():
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}: {log_path.read_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {WAIT_SECONDS} s, see {log_path}")
        await asyncio.sleep(0.2)


@pytest.fixture
def own_redis(tmp_path):
    """Hand over a Valkey server of this test alone, which the test may stop and start."""
    server = EmbeddedRedis(tmp_path / "valkey")
    server.start()
    yield server
    server.stop()


async def test_redis_restart_loses_no_upload(own_redis, settings, store, make_client, tmp_path):
    # Forms live 3 s and the sweep runs every second, so unreported uploads are found soon.
    drill = replace(
        settings, redis_url=own_redis.url, upload_form_seconds=3, sweep_interval_seconds=1
    )
    redis = ArqRedis.from_url(own_redis.url)
    log_path = tmp_path / "worker.log"
    try:
        with gallery_process("worker", drill, log_path) as worker:
            await _wait_until(
                lambda: redis.exists(WORKER_HEARTBEAT_KEY), "worker heartbeat", worker, log_path
            )
            client = await make_client(app_settings=drill)
            forms = []
            for number in range(6):
                data = make_jpeg(640, 480, (40 * number, 90, 160))
                form = (
                    await client.request_form(f"drill-{number}.jpg", "image/jpeg", len(data))
                ).json()
                assert (await post_to_s3(form, data)).status_code == 201
                forms.append(form)
            for form in forms[:3]:
                assert (await client.complete(form["id"])).status_code == 200

            await asyncio.to_thread(own_redis.stop)
            page = await client.http.get("/images", headers=BROWSER)
            fragment = await client.complete(forms[3]["id"])
            ready = await client.http.get("/readyz")
            await asyncio.sleep(2)
            worker_survived_outage = worker.poll() is None
            await asyncio.to_thread(own_redis.start)

            async def all_ready() -> bool:
                uploads = [await index.get_upload(redis, form["id"]) for form in forms]
                return all(upload is not None and upload.state == State.READY for upload in uploads)

            await _wait_until(all_ready, "every upload ready", worker, log_path)
            page_after = await client.http.get("/images", headers=BROWSER)
    finally:
        await redis.aclose()

    assert page.status_code == 503
    assert page.headers["retry-after"] == "30"
    assert "cannot reach its database or file storage" in page.text
    assert "Traceback" not in page.text
    assert fragment.status_code == 503
    assert fragment.headers["content-type"].startswith("text/plain")
    assert ready.status_code == 503
    assert ready.json()["checks"]["redis"]["ok"] is False
    assert worker_survived_outage
    assert page_after.status_code == 200
    for form in forms:
        assert f'id="tile-{form["id"]}"' in page_after.text


async def test_s3_down_gives_503_and_keeps_image(client, run_worker, settings, redis):
    upload_id = await client.upload(make_jpeg())
    await run_worker()
    # Only an image in the trash can be deleted forever.
    await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})
    closed = replace(settings, s3_endpoint_url=f"http://127.0.0.1:{free_port()}")

    async with AsyncTestClient(create_app(closed)) as offline:
        offline.cookies = client.http.cookies
        deleted = await offline.delete(f"/images/{upload_id}", headers={**client.csrf, **HTMX})
        page = await offline.delete(f"/images/{upload_id}", headers={**client.csrf, **BROWSER})
        ready = await offline.get("/readyz")

    assert deleted.status_code == 503
    assert deleted.headers["retry-after"] == "30"
    assert "Wait 30 seconds" in deleted.text
    assert page.status_code == 503
    assert "cannot reach its database or file storage" in page.text
    assert ready.status_code == 503
    assert ready.json()["checks"]["s3"]["ok"] is False
    assert (await index.get_upload(redis, upload_id)).state == State.TRASHED


async def test_verify_retries_while_s3_is_down(client, settings, redis, forget_uploads):
    upload_id = await client.upload(make_jpeg())
    forget_uploads.append(upload_id)
    closed = replace(settings, s3_endpoint_url=f"http://127.0.0.1:{free_port()}")

    async with Storage.open(closed) as offline:
        ctx = {"redis": redis, "store": offline, "settings": closed, "job_try": 1, "pool": None}
        with pytest.raises(Retry) as retry:
            await verify_upload(ctx, upload_id)

    upload = await index.get_upload(redis, upload_id)
    assert retry.value.defer_score == 2000
    assert upload.state == State.VERIFYING
    assert upload.attempts == 0


async def test_verify_waits_out_long_s3_outage(client, settings, redis, forget_uploads):
    upload_id = await client.upload(make_jpeg())
    forget_uploads.append(upload_id)
    closed = replace(settings, s3_endpoint_url=f"http://127.0.0.1:{free_port()}")

    async with Storage.open(closed) as offline:
        ctx = {
            "redis": redis,
            "store": offline,
            "settings": closed,
            "job_try": MAX_TRIES,
            "pool": None,
        }
        outcome = await verify_upload(ctx, upload_id)

    upload = await index.get_upload(redis, upload_id)
    assert outcome == DEFERRED
    assert upload.state == State.VERIFYING
    assert upload.attempts == 0
    assert await redis.zscore(index.PENDING_KEY, upload_id) is not None


async def test_health_endpoints_answer_json(client, redis):
    alive = await client.http.get("/healthz")
    await redis.set(WORKER_HEARTBEAT_KEY, "test", px=5000)
    ready = await client.http.get("/readyz")
    await redis.delete(WORKER_HEARTBEAT_KEY)
    no_worker = await client.http.get("/readyz")

    assert alive.status_code == 200
    assert alive.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert set(ready.json()["checks"]) == {"redis", "s3", "worker"}
    assert no_worker.status_code == 503
    assert no_worker.json()["checks"]["worker"] == {
        "ok": False,
        "error": "no worker has reported itself in the last 31 s",
    }


def _bare_worker(settings, functions, **options) -> ReconnectingWorker:
    """Build a worker that runs only `functions`: no cron jobs, no S3, no process pool."""
    return make_worker(
        settings,
        functions=functions,
        **options,
        cron_jobs=[],
        on_startup=None,
        on_shutdown=None,
        poll_delay=0.05,
        handle_signals=False,
    )


async def test_retry_during_outage_runs_soon(own_redis, settings):
    # arq records a job's end, and its next run, in Redis; the job ends while it is down.
    drill = replace(settings, redis_url=own_redis.url)
    runs = []

    async def flaky(ctx):
        runs.append(time.monotonic())
        if len(runs) == 1:
            await asyncio.to_thread(own_redis.stop)
            raise Retry(defer=1)
        return "done"

    worker = _bare_worker(drill, [func(flaky, name="flaky")])
    redis = ArqRedis.from_url(own_redis.url)
    await redis.enqueue_job("flaky", _job_id="flaky-1")
    await redis.aclose()
    running = asyncio.create_task(worker.main())
    try:
        deadline = time.monotonic() + 30
        while not runs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)
        await asyncio.to_thread(own_redis.start)
        back = time.monotonic()
        # Without the recorded end, arq runs the job again only when its in-progress key
        # expires, job_timeout + 10 s = 310 s after the first run started.
        while len(runs) < 2 and time.monotonic() < back + 20:
            await asyncio.sleep(0.1)
    finally:
        running.cancel()
        await worker.close()
    assert len(runs) == 2, "the job did not run again within 20 s of Redis coming back"


async def test_unstarted_job_runs_after_outage(own_redis, settings):
    # arq marks a job in progress, then reads it to run it: Redis is gone in between.
    drill = replace(settings, redis_url=own_redis.url)
    runs = []

    async def job(ctx):
        runs.append(ctx["job_try"])

    redis = ArqRedis.from_url(own_redis.url)
    worker = _bare_worker(
        drill, [func(job, name="job")], redis_pool=ArqRedis.from_url(own_redis.url)
    )
    await redis.enqueue_job("job", _job_id="job-1")
    await redis.psetex(in_progress_key_prefix + "job-1", 310_000, b"1")
    score = int(await redis.zscore("arq:queue", "job-1"))
    await asyncio.to_thread(own_redis.stop)
    await worker.run_job("job-1", score)
    await asyncio.to_thread(own_redis.start)
    try:
        # The first poll once Redis is back frees the job, and a later one starts it.
        deadline = time.monotonic() + 10
        while not runs and time.monotonic() < deadline:
            await worker._poll_iteration()
            await asyncio.sleep(0.05)
    finally:
        await worker.close()
        await redis.aclose()
    assert runs == [1]


async def test_watch_error_keeps_worker_polling(own_redis, settings, monkeypatch):
    async def job(ctx):
        pass

    pool = ArqRedis.from_url(own_redis.url)
    worker = _bare_worker(
        replace(settings, redis_url=own_redis.url), [func(job, name="job")], redis_pool=pool
    )

    async def lost(self):
        raise WatchError("A ConnectionError occurred on while watching one or more keys")

    monkeypatch.setattr(ReconnectingWorker, "heart_beat", lost)
    monkeypatch.setattr("worker.settings.MAX_RECONNECT_DELAY", 0)
    try:
        await worker._poll_iteration()
    finally:
        await worker.close()
    assert worker._outage_started is not None


async def test_verify_retries_while_redis_is_down(settings):
    closed = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    offline = ArqRedis.from_url(closed.redis_url)
    ctx = {"redis": offline, "store": None, "settings": closed, "job_try": 1, "pool": None}
    try:
        with pytest.raises(Retry) as retry:
            await verify_upload(ctx, "01a2438f00000000000000000000")
        last = {**ctx, "job_try": MAX_TRIES}
        outcome = await verify_upload(last, "01a2438f00000000000000000000")
    finally:
        await offline.aclose()
    assert retry.value.defer_score == 2000
    assert outcome == DEFERRED
