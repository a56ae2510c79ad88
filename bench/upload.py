"""Time an upload from S3's response to the form post until its tile is ready.

Run by hand from the repository root, never as a test:

    .venv/bin/python bench/upload.py [--corpus DIR] [--rounds 10]

The script starts SeaweedFS (`weed mini`) and Valkey in a temporary folder, then
`gallery serve` and `gallery worker` as child processes with their default settings. It
signs up one user and uploads each photo --rounds times, one upload at a time, as the page
does: it requests a form from POST /uploads, posts the file to S3 with that presigned form,
and reports it done with POST /uploads/<id>/complete. The time runs from S3's 201 response to
the moment the upload's index record reads "ready", which the script polls every 10 ms.
It includes the request that reports the upload done, the wait for the worker to take the
job (arq polls its queue every 0.5 s by default), and the worker's checks and renditions.

The photos are the JPEGs in the corpus folder mobile/ and a generated 12 MP JPEG.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from page import (
    bench_services,
    child_process,
    describe_machine,
    percentile,
    sign_up,
    wait_until_serving,
)
from PIL import Image, ImageFilter
from redis.asyncio import Redis

from gallery import index
from gallery.index import State
from gallery.settings import Settings
from gallery.storage import Storage

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "corpus"
HTMX = {"HX-Request": "true"}

POLL_SECONDS = 0.01
READY_TIMEOUT_SECONDS = 120
WORKER_START_TIMEOUT_SECONDS = 60


def photo_like_jpeg(width: int, height: int, seed: int = 12) -> bytes:
    """Return a JPEG with smooth shapes and fine noise, about as hard to code as a photo."""
    generator = random.Random(seed)
    small = Image.new("RGB", (width // 40, height // 40))
    small.putdata(
        [
            (generator.randrange(256), generator.randrange(256), generator.randrange(256))
            for _ in range(small.width * small.height)
        ]
    )
    image = small.resize((width, height), Image.Resampling.BICUBIC)
    noise = Image.effect_noise((width, height), 24).convert("RGB")
    image = Image.blend(image, noise, 0.15).filter(ImageFilter.SMOOTH)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@dataclass
class Photo:
    name: str
    data: bytes
    megapixels: float
    ready_ms: list[float] = field(default_factory=list)


def load_photos(corpus: Path) -> list[Photo]:
    photos = []
    for path in sorted((corpus / "mobile").glob("*.jpg")):
        with Image.open(path) as image:
            megapixels = image.width * image.height / 1e6
        photos.append(Photo(f"mobile/{path.name}", path.read_bytes(), megapixels))
    if not photos:
        raise SystemExit(f"no JPEGs found in {corpus / 'mobile'}; set --corpus to the corpus")
    photos.append(Photo("generated 4000x3000", photo_like_jpeg(4000, 3000), 12.0))
    return photos


async def wait_for_log_line(log_path: Path, line: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.exists() and line in log_path.read_text(errors="replace"):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{log_path} did not show {line!r} within {timeout:g} s")


async def upload_once(
    http: httpx.AsyncClient, s3_http: httpx.AsyncClient, redis: Redis, photo: Photo
) -> float:
    """Upload a photo through the presigned form; return ms from S3's response to ready."""
    csrf = {"x-csrftoken": http.cookies["csrftoken"]}
    body = {"filename": photo.name.rsplit("/", 1)[-1], "content_type": "image/jpeg"}
    response = await http.post("/uploads", json={**body, "size": len(photo.data)}, headers=csrf)
    response.raise_for_status()
    form = response.json()

    posted = await s3_http.post(
        form["url"],
        data=form["fields"],
        files={"file": ("upload", photo.data, "application/octet-stream")},
    )
    answered = time.perf_counter()
    if posted.status_code != 201:
        raise RuntimeError(
            f"S3 rejected the form post with status {posted.status_code}: {posted.text}"
        )
    completed = await http.post(form["complete_url"], headers={**csrf, **HTMX})
    completed.raise_for_status()

    deadline = answered + READY_TIMEOUT_SECONDS
    while time.perf_counter() < deadline:
        upload = await index.get_upload(redis, form["id"])
        if upload is not None and upload.state == State.READY:
            ready = time.perf_counter()
            break
        if upload is not None and upload.state == State.REJECTED:
            raise RuntimeError(f"{photo.name} was rejected: {upload.reason}")
        await asyncio.sleep(POLL_SECONDS)
    else:
        raise RuntimeError(f"{photo.name} was not ready {READY_TIMEOUT_SECONDS} s after upload")

    tile = await http.get(f"/images/{form['id']}/tile", headers=HTMX)
    if "<img src=" not in tile.text:
        raise RuntimeError(f"the tile of ready upload {form['id']} shows no thumbnail")
    return (ready - answered) * 1000


async def run_benchmark(corpus: Path, rounds: int) -> None:
    for line in describe_machine():
        print(line)
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    photos = load_photos(corpus)

    with (
        tempfile.TemporaryDirectory(prefix="gallery-bench-upload-") as folder,
        bench_services(Path(folder)) as settings,
    ):
        await prepare_bucket(settings)
        serve = [sys.executable, "-m", "gallery.cli", "serve"]
        work = [sys.executable, "-m", "gallery.cli", "worker"]
        app_log, worker_log = Path(folder) / "app.log", Path(folder) / "worker.log"
        with (
            child_process(serve, settings, app_log) as app,
            child_process(work, settings, worker_log),
        ):
            await wait_until_serving(app, settings.app_url, app_log)
            await wait_for_log_line(worker_log, "worker started", WORKER_START_TIMEOUT_SECONDS)
            redis = Redis.from_url(settings.redis_url)
            async with (
                httpx.AsyncClient(base_url=settings.app_url, timeout=60) as http,
                httpx.AsyncClient(timeout=60) as s3_http,
            ):
                await sign_up(http, "benchuploads")
                for round_number in range(rounds):
                    for photo in photos:
                        photo.ready_ms.append(await upload_once(http, s3_http, redis, photo))
                    print(f"round {round_number + 1} of {rounds} done", file=sys.stderr)
            await redis.aclose()
        job_timings = read_job_timings(worker_log)

    print_results(photos, rounds)
    print_job_timings(job_timings)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


async def prepare_bucket(settings: Settings) -> None:
    async with Storage.open(settings) as store:
        await store.ensure_bucket([settings.app_url])


def read_job_timings(worker_log: Path) -> dict[str, list[float]]:
    """Read from arq's log lines how long each verify job waited in the queue and ran, in ms.

    arq 0.28 logs "<seconds>s → <job>" when a job starts, with the time since it was queued,
    and "<seconds>s ← <job> ●" when it ends, with the time it ran.
    """
    text = worker_log.read_text(errors="replace")
    waited = re.findall(r"([\d.]+)s → \S+:verify_upload\(", text)
    ran = re.findall(r"([\d.]+)s ← \S+:verify_upload ●", text)
    return {
        "waited in the queue": [float(seconds) * 1000 for seconds in waited],
        "ran in the worker": [float(seconds) * 1000 for seconds in ran],
    }


def print_job_timings(job_timings: dict[str, list[float]]) -> None:
    print("\nof which, from the worker's log, in ms\n")
    print("| verify job | jobs | p50 | p95 | max |")
    print("| --- | --- | --- | --- | --- |")
    for name, samples in job_timings.items():
        if not samples:
            print(f"| {name} | 0 | | | |")
            continue
        print(
            f"| {name} | {len(samples)} | {percentile(samples, 0.5):.0f} "
            f"| {percentile(samples, 0.95):.0f} | {max(samples):.0f} |"
        )


def print_results(photos: list[Photo], rounds: int) -> None:
    print(f"\ntime from S3's response to a ready tile, in ms; {rounds} uploads of each photo\n")
    print("| photo | MP | size | p50 | p95 | max |")
    print("| --- | --- | --- | --- | --- | --- |")
    every = []
    for photo in photos:
        every.extend(photo.ready_ms)
        print(
            f"| {photo.name} | {photo.megapixels:.1f} | {len(photo.data) / 1e6:.1f} MB "
            f"| {percentile(photo.ready_ms, 0.5):.0f} | {percentile(photo.ready_ms, 0.95):.0f} "
            f"| {max(photo.ready_ms):.0f} |"
        )
    print(
        f"| all | | | {percentile(every, 0.5):.0f} | {percentile(every, 0.95):.0f} "
        f"| {max(every):.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus",
        type=Path,
        default=DEFAULT_CORPUS,
        help="folder of the photo corpus, with mobile/ (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds", type=int, default=10, help="uploads of each photo (default: 10)"
    )
    arguments = parser.parse_args()
    if arguments.rounds < 1:
        parser.error(f"--rounds is {arguments.rounds}, expected 1 or more")

    asyncio.run(run_benchmark(arguments.corpus, arguments.rounds))


if __name__ == "__main__":
    main()
