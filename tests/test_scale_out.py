"""Scale-out: two web processes and three workers share one Valkey and one SeaweedFS.

The processes are real `gallery serve` and `gallery worker` commands. A photo's form
comes from one web process and its "done" request goes to the other, so sessions, CSRF
tokens, records and jobs must all live in the shared services.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from arq import create_pool
from arq.connections import RedisSettings

from gallery import index, storage
from gallery.embedded import free_port
from gallery.index import State
from tests.support import HTMX, TEST_PASSWORD, make_jpeg, post_to_s3

PHOTOS = 100
ABANDONED = 5
# Uploads in flight at once, across both web processes.
CONCURRENCY = 10
WEB_PROCESSES = 2
WORKER_PROCESSES = 3
# The Valkey database of this test's processes; the other tests use database 0.
SCALE_DATABASE = 15
SWEEP_SECONDS = 5
READY_TIMEOUT_SECONDS = 240
START_TIMEOUT_SECONDS = 60


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Path]]]:
    """Hand over a function that starts `gallery <args>` with a log file, stopped at the end.

    Each process leads its own process group, so a worker's decoding processes stop with it.
    """
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, environ: dict[str, str], *args: str) -> tuple[subprocess.Popen, Path]:
        log_path = tmp_path / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "gallery.cli", *args],
                env={**os.environ, **environ},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(process)
        return process, log_path

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in started:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _json_lines(path: Path) -> list[dict]:
    lines = []
    for raw in path.read_text().splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))
    return lines


async def _wait_until_serving(http: httpx.AsyncClient, url: str, process) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, f"web process for {url} exited with {process.returncode}"
        try:
            if (await http.get(f"{url}/signin")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url} did not serve within {START_TIMEOUT_SECONDS} s")


async def _upload(http: httpx.AsyncClient, form_url: str, done_url: str, number: int) -> str:
    """Upload one photo: the form from one web process, the done request to the other."""
    data = make_jpeg(64 + number % 7, 48, (number * 2 % 256, 90, 255 - number * 2 % 256))
    csrf = {"x-csrftoken": http.cookies["csrftoken"]}
    body = {"filename": f"photo-{number}.jpg", "content_type": "image/jpeg", "size": len(data)}
    response = await http.post(f"{form_url}/uploads", json=body, headers=csrf)
    assert response.status_code == 201, response.text
    form = response.json()
    posted = await post_to_s3(form, data)
    assert posted.status_code == 201, posted.text
    done = await http.post(f"{done_url}{form['complete_url']}", headers={**csrf, **HTMX})
    assert done.status_code == 200, done.text
    return form["id"]


async def _wait_until_finished(redis, upload_ids: list[str]) -> dict[str, State]:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        states = {i: (await index.get_upload(redis, i)).state for i in upload_ids}
        if all(state in (State.READY, State.REJECTED) for state in states.values()):
            return states
        if time.monotonic() > deadline:
            waiting = Counter(states.values())
            raise AssertionError(f"uploads unfinished after {READY_TIMEOUT_SECONDS} s: {waiting}")
        await asyncio.sleep(0.5)


async def _seed_abandoned(redis) -> list[str]:
    """Record uploads whose 1 s form expires unused, for the sweeps to purge."""
    created = []
    for _ in range(ABANDONED):
        upload = await index.create_upload(
            redis,
            user_id="scale-abandoned",
            filename="never.jpg",
            content_type="image/jpeg",
            max_bytes=10,
            form_seconds=1,
            max_pending=10**6,
        )
        created.append(upload.id)
    return created


async def _wait_for_sweep_ticks(worker_logs: list[Path], ticks: int) -> None:
    deadline = time.monotonic() + SWEEP_SECONDS * (ticks + 4)
    while time.monotonic() < deadline:
        runs = [line for path in worker_logs for line in _sweep_runs(path)]
        if len({run["job_id"] for run in runs}) >= ticks:
            return
        await asyncio.sleep(1)
    raise AssertionError(f"fewer than {ticks} sweep ticks ran")


def _sweep_runs(path: Path) -> list[dict]:
    return [line for line in _json_lines(path) if line.get("function") == "sweep_uploads"]


@pytest.fixture
async def scale_redis_url(settings) -> AsyncIterator[str]:
    """Hand over a URL of the session's Valkey with its own, emptied database.

    The processes' sweeps purge every expired upload form they find, so the records that
    other tests leave in database 0 would count as theirs.
    """
    url = urlunsplit(urlsplit(settings.redis_url)._replace(path=f"/{SCALE_DATABASE}"))
    client = await create_pool(RedisSettings.from_dsn(url))
    await client.flushdb()
    yield url
    await client.flushdb()
    await client.aclose()


async def test_two_web_three_workers_share_one_valkey_and_one_s3(spawn, settings, scale_redis_url):
    web_ports = [free_port() for _ in range(WEB_PROCESSES)]
    shared = replace(
        settings,
        redis_url=scale_redis_url,
        s3_bucket=f"scale-{secrets.token_hex(4)}",
        log_format="json",
        sweep_interval_seconds=SWEEP_SECONDS,
        purge_grace_seconds=0,
        worker_processes=1,
        upload_forms_per_minute=10 * PHOTOS,
        # CORS must allow both web origins; the test posts without a browser, so any works.
        public_url=f"http://127.0.0.1:{web_ports[0]}",
    )
    environ = shared.to_env()
    redis = await create_pool(RedisSettings.from_dsn(scale_redis_url))
    init, init_log = spawn("init-bucket", environ, "init-bucket")
    assert init.wait(timeout=60) == 0, init_log.read_text()

    webs = [
        spawn(f"web-{n}", {**environ, "GALLERY_PORT": str(port)}, "serve")
        for n, port in enumerate(web_ports)
    ]
    workers = [spawn(f"worker-{n}", environ, "worker") for n in range(WORKER_PROCESSES)]
    web_urls = [f"http://127.0.0.1:{port}" for port in web_ports]
    username = f"scale{secrets.token_hex(3)}"

    # A fresh connection per request: uvicorn closes idle ones after 5 s, and a request
    # sent on a connection as it closes fails with ReadError.
    fresh_connections = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30, limits=fresh_connections) as http:
        for url, (process, _) in zip(web_urls, webs, strict=True):
            await _wait_until_serving(http, url, process)
        await http.get(f"{web_urls[0]}/signup")
        signed_up = await http.post(
            f"{web_urls[0]}/signup",
            data={"username": username, "password": TEST_PASSWORD},
            headers={"x-csrftoken": http.cookies["csrftoken"]},
        )
        assert signed_up.status_code == 303, signed_up.text
        abandoned = await _seed_abandoned(redis)

        upload_ids: list[str] = []
        for start in range(0, PHOTOS, CONCURRENCY):
            batch = range(start, min(start + CONCURRENCY, PHOTOS))
            upload_ids += await asyncio.gather(
                *(_upload(http, web_urls[n % 2], web_urls[(n + 1) % 2], n) for n in batch)
            )
        states = await _wait_until_finished(redis, upload_ids)
        grid = await http.get(f"{web_urls[1]}/images")
    worker_logs = [path for _, path in workers]
    await _wait_for_sweep_ticks(worker_logs, ticks=2)

    # Every photo is ready, with exactly one thumbnail object in the bucket.
    assert Counter(states.values()) == {State.READY: PHOTOS}
    assert grid.status_code == 200
    assert f"{PHOTOS} images" in grid.text
    user_id = (await index.get_upload(redis, upload_ids[0])).user_id
    async with _bucket(shared) as bucket:
        thumbnails = [key async for key in bucket.list_keys(f"u/{user_id}/t/")]
        incoming = [key async for key in bucket.list_keys(storage.INCOMING_LIFECYCLE_PREFIX)]
    expected = sorted(storage.thumbnail_key(user_id, upload_id) for upload_id in upload_ids)
    assert sorted(thumbnails) == expected
    assert incoming == []

    # Each photo's job finished once as ready, and more than one worker took jobs.
    job_lines = {path.name: _json_lines(path) for path in worker_logs}
    ready_runs = Counter(
        line["message"].split("verify_upload(")[1].split(")")[0]
        for lines in job_lines.values()
        for line in lines
        if line.get("function") == "verify_upload" and line.get("outcome") == "ready"
    )
    assert ready_runs == dict.fromkeys(upload_ids, 1)
    busy = [
        name
        for name, lines in job_lines.items()
        if any(line.get("function") == "verify_upload" for line in lines)
    ]
    assert len(busy) >= 2, f"only {busy} ran verify jobs"

    # One sweep per tick across the three workers, and each abandoned upload purged once.
    sweep_runs = [run for path in worker_logs for run in _sweep_runs(path)]
    assert max(Counter(run["job_id"] for run in sweep_runs).values()) == 1
    purge_lines = [
        line["message"]
        for lines in job_lines.values()
        for line in lines
        if line["logger"] == "worker.sweep" and "abandoned uploads" in line["message"]
    ]
    purged = sum(
        int(message.split("failed, ")[1].split(" abandoned")[0]) for message in purge_lines
    )
    # The session's Redis is shared, and with no grace period the sweep also purges expired
    # forms that earlier tests left issued, so the log may count more than this test's own.
    assert purged >= ABANDONED
    for upload_id in abandoned:
        assert await index.get_upload(redis, upload_id) is None
    await redis.aclose()

    # Both web processes served uploads, one log line per request, and no line contains a secret.
    web_lines = {path.name: _json_lines(path) for _, path in webs}
    form_requests = {
        name: sum(1 for line in lines if line.get("path") == "/uploads")
        for name, lines in web_lines.items()
    }
    assert sum(form_requests.values()) == PHOTOS
    assert all(count > 0 for count in form_requests.values()), form_requests
    all_text = "".join(path.read_text() for _, path in [*webs, *workers])
    for secret in (shared.aws_secret_access_key, shared.secret_key, TEST_PASSWORD):
        assert secret not in all_text
    assert "X-Amz-Signature" not in all_text
    assert "Traceback" not in all_text


def _bucket(settings):
    return storage.Storage.open(settings)
