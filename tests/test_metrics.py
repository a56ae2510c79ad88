"""/metrics on Valkey: totals counted by the web app and a worker process, in Prometheus text."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from gallery import index
from gallery.app import create_app
from gallery.index import State
from tests.support import gallery_process, make_jpeg

REPO_ROOT = Path(__file__).resolve().parents[1]
WAIT_SECONDS = 90
MISMATCH = "type does not match"
DURATIONS = "gallery_job_duration_seconds_count"


async def _samples(http) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _delta(before, after, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


async def test_metrics_count_web_and_worker_events(client, settings, redis, tmp_path):
    before = await _samples(client.http)
    good = [await client.upload(make_jpeg(), f"good-{number}.jpg") for number in range(2)]
    # A JPEG signed as PNG: the worker rejects it as a type mismatch.
    bad = await client.upload(make_jpeg(), "bad.png", "image/png")
    log_path = tmp_path / "worker.log"
    with gallery_process("worker", settings, log_path) as worker:
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            states = [
                (await index.get_upload(redis, upload_id)).state for upload_id in [*good, bad]
            ]
            if all(state in (State.READY, State.REJECTED) for state in states):
                break
            assert worker.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"jobs unfinished, see {log_path}"
            await asyncio.sleep(0.2)
        # The duration is recorded after the job's last index change.
        await asyncio.sleep(0.5)
    after = await _samples(client.http)

    assert _delta(before, after, "gallery_upload_forms_issued_total") == 3
    assert _delta(before, after, "gallery_uploads_completed_total", source="browser") == 3
    assert _delta(before, after, "gallery_uploads_verified_total") == 2
    assert _delta(before, after, "gallery_thumbnails_made_total") == 2
    assert _delta(before, after, "gallery_uploads_rejected_total", reason=MISMATCH) == 1
    assert _delta(before, after, DURATIONS, function="verify_upload", outcome="ready") == 2
    assert _delta(before, after, DURATIONS, function="verify_upload", outcome="rejected") == 1
    assert ("gallery_queue_depth", ()) in after
    assert ("gallery_uploads_unfinished", ()) in after


async def test_metrics_served_without_signin(settings, store):
    async with AsyncTestClient(create_app(settings)) as anonymous:
        samples = await _samples(anonymous)

    assert ("gallery_sweeps_total", ()) in samples
