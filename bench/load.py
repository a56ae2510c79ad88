"""Load the whole gallery with simulated users, then audit that nothing was lost or stuck.

Run by hand from the repository root, never as a test:

    .venv/bin/python bench/load.py [--users 50] [--photos 20] [--workers 2] [--corpus DIR]

The script starts SeaweedFS (weed mini) and Valkey on 127.0.0.1 in a temporary folder,
then `gallery serve` and --workers `gallery worker` processes, as production runs them.
Each simulated user signs up, signs in, and uploads its photos three at a time, as the
upload page does: it requests a form from the app, posts the file straight to S3 and
reports it done. The script then waits until no upload is unfinished and prints the
throughput, the p50 and p95 latency of each step, and an audit of the end state:

- every upload is ready, rejected with a reason, or purged, and none is unfinished;
- the bucket contains exactly the original and three renditions of each ready image, and no
  file under incoming/;
- each user's grid lists exactly their ready images.

The photos are JPEGs generated in 4:3 at --size pixels wide, in as many colours as there
are photos per user, or with --corpus the JPEGs of that folder, taken in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import itertools
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from arq.connections import ArqRedis
from PIL import Image, ImageDraw

from gallery import index, storage
from gallery.embedded import EmbeddedRedis, EmbeddedS3, free_port
from gallery.index import State
from gallery.settings import Settings
from gallery.storage import Storage

REPO_ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "load test password"
# Uploads in flight per user at once, as the upload page sends them.
PARALLEL_UPLOADS = 3
STEPS = ("sign up", "sign in", "form", "S3 post", "complete", "upload to ready")
STARTUP_SECONDS = 60
# How long the audit waits for the workers to finish every upload.
FINISH_SECONDS = 1800
# Tries of a request that fails to connect or loses its connection.
TRIES = 4


@dataclass
class Timings:
    """Latencies in seconds of each step, and what each upload reported."""

    steps: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    completed_at: dict[str, float] = field(default_factory=dict)
    retries: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)


def make_photos(count: int, width: int) -> list[bytes]:
    """Return `count` JPEGs of different colours with a pattern, `width` pixels wide."""
    height = width * 3 // 4
    photos = []
    for number in range(count):
        image = Image.new("RGB", (width, height), (37 * number % 256, 90, 255 - 23 * number % 256))
        draw = ImageDraw.Draw(image)
        for step in range(0, width, 40):
            draw.line([(step, 0), (width - step, height)], fill=(step % 256, 200, 80), width=3)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=88)
        photos.append(buffer.getvalue())
    return photos


def read_corpus(corpus: Path, count: int) -> list[bytes]:
    paths = sorted(corpus.rglob("*.jpg"))
    if not paths:
        raise SystemExit(f"no JPEG files found under {corpus}")
    return [path.read_bytes() for path in itertools.islice(itertools.cycle(paths), count)]


async def timed(timings: Timings, step: str, send: Callable[[], Awaitable[httpx.Response]]):
    """Send a request, again after a connection error as a browser's user would, and time it.

    The time recorded is that of the last try.
    """
    for attempt in range(1, TRIES + 1):
        started = time.perf_counter()
        try:
            response = await send()
        except httpx.TransportError as error:
            timings.retries[step] += 1
            if attempt == TRIES:
                raise RuntimeError(f"{step} failed {TRIES} times, last with {error!r}") from error
            await asyncio.sleep(attempt)
            continue
        timings.steps[step].append(time.perf_counter() - started)
        return response
    raise AssertionError("unreachable")


def check_signed_in(response: httpx.Response, username: str) -> None:
    """Raise unless the app sent the user on to the gallery, as it does after signing in."""
    if response.status_code != 303 or response.headers.get("location") != "/images":
        raise RuntimeError(f"{username}: signing in failed with {response.status_code}")


async def run_user(
    base_url: str, number: int, photos: list[bytes], timings: Timings
) -> tuple[str, list[str]]:
    """Sign up, sign in and upload every photo; return the username and the upload ids."""
    username = f"load{number:03d}{secrets.token_hex(2)}"
    credentials = {"username": username, "password": PASSWORD}
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as app:
        await app.get("/signup")
        csrf = {"x-csrftoken": app.cookies["csrftoken"]}
        signup = await timed(
            timings, "sign up", lambda: app.post("/signup", data=credentials, headers=csrf)
        )
        check_signed_in(signup, username)
        await app.post("/signout", headers={"x-csrftoken": app.cookies["csrftoken"]})
        await app.get("/signin")
        csrf = {"x-csrftoken": app.cookies["csrftoken"]}
        signin = await timed(
            timings, "sign in", lambda: app.post("/signin", data=credentials, headers=csrf)
        )
        check_signed_in(signin, username)
        csrf = {"x-csrftoken": app.cookies["csrftoken"]}

        upload_ids: list[str] = []
        limit = asyncio.Semaphore(PARALLEL_UPLOADS)
        async with httpx.AsyncClient(timeout=120) as s3:

            async def upload(name: str, data: bytes) -> None:
                body = {"filename": name, "content_type": "image/jpeg", "size": len(data)}
                form = await timed(
                    timings, "form", lambda: app.post("/uploads", json=body, headers=csrf)
                )
                if form.status_code != 201:
                    timings.failures.append(f"{username} {name}: form {form.status_code}")
                    return
                fields = form.json()
                files = {"file": (name, data, "application/octet-stream")}
                posted = await timed(
                    timings,
                    "S3 post",
                    lambda: s3.post(fields["url"], data=fields["fields"], files=files),
                )
                if posted.status_code != 201:
                    timings.failures.append(f"{username} {name}: S3 {posted.status_code}")
                    return
                upload_ids.append(fields["id"])
                headers = {**csrf, "HX-Request": "true"}
                done = await timed(
                    timings, "complete", lambda: app.post(fields["complete_url"], headers=headers)
                )
                timings.completed_at[fields["id"]] = time.time()
                if done.status_code != 200:
                    timings.failures.append(f"{username} {name}: complete {done.status_code}")

            async def upload_in_turn(name: str, data: bytes) -> None:
                async with limit:
                    await upload(name, data)

            names = (f"photo-{number:02d}.jpg" for number in range(len(photos)))
            await asyncio.gather(*(upload_in_turn(n, d) for n, d in zip(names, photos)))
    return username, upload_ids


async def wait_until_finished(redis: ArqRedis, upload_ids: list[str], timings: Timings) -> None:
    """Poll the index until no upload is unfinished, recording each one's time to ready."""
    waiting = set(upload_ids)
    deadline = time.monotonic() + FINISH_SECONDS
    while waiting and time.monotonic() < deadline:
        for upload_id in list(waiting):
            upload = await index.get_upload(redis, upload_id)
            if upload is None or not upload.is_processing:
                waiting.discard(upload_id)
                if upload is not None and upload.state == State.READY:
                    started = timings.completed_at.get(upload_id, upload.created_at)
                    timings.steps["upload to ready"].append(upload.updated_at - started)
        await asyncio.sleep(0.5)


@dataclass
class Audit:
    states: collections.Counter[str]
    missing_records: int
    unfinished: int
    grid_mismatches: list[str]
    missing_objects: list[str]
    extra_objects: list[str]

    @property
    def passed(self) -> bool:
        return not (
            self.missing_records
            or self.unfinished
            or self.grid_mismatches
            or self.missing_objects
            or self.extra_objects
        )


async def audit(redis: ArqRedis, store: Storage, users: dict[str, list[str]]) -> Audit:
    """Check that every upload finished and that the bucket and the index agree."""
    states: collections.Counter[str] = collections.Counter()
    missing_records = unfinished = 0
    grid_mismatches: list[str] = []
    expected_keys: set[str] = set()
    for username, upload_ids in users.items():
        user_id = (await redis.get(f"{index.PREFIX}:username:{username.lower()}")).decode()
        ready = []
        for upload_id in upload_ids:
            upload = await index.get_upload(redis, upload_id)
            if upload is None:
                missing_records += 1
                continue
            states[f"{upload.state} {upload.reason}".strip()] += 1
            if upload.is_processing:
                unfinished += 1
            if upload.state == State.READY:
                ready.append(upload_id)
                expected_keys.update(storage.image_keys(user_id, upload_id)[1:])
        grid, _ = await index.list_grid(redis, user_id, before=None, limit=len(upload_ids) + 10)
        if sorted(upload.id for upload in grid if upload.state == State.READY) != sorted(ready):
            grid_mismatches.append(username)
    stored = {key async for key in store.list_keys("")}
    return Audit(
        states=states,
        missing_records=missing_records,
        unfinished=unfinished,
        grid_mismatches=grid_mismatches,
        missing_objects=sorted(expected_keys - stored),
        extra_objects=sorted(stored - expected_keys),
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def start_process(command: str, settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gallery.cli", command],
            cwd=REPO_ROOT,
            env={**os.environ, **settings.to_env()},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def wait_until_serving(base_url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"gallery serve exited with {process.returncode}")
            try:
                if (await http.get(f"{base_url}/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"gallery serve did not respond within {STARTUP_SECONDS} s")


async def run_load(arguments: argparse.Namespace) -> bool:
    count = arguments.photos
    if arguments.corpus:
        photos = read_corpus(arguments.corpus, count)
    else:
        photos = make_photos(count, arguments.size)
    megabytes = sum(len(photo) for photo in photos) * arguments.users / 1e6
    print(
        f"{arguments.users} users x {count} photos ({megabytes:.0f} MB), {arguments.workers} "
        f"workers of {arguments.processes} decoding processes; Python "
        f"{platform.python_version()}, {os.cpu_count()} cores, load average at start "
        f"{os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        s3 = EmbeddedS3(
            root / "s3",
            access_key=secrets.token_hex(10).upper(),
            secret_key=secrets.token_urlsafe(30),
        )
        with s3, EmbeddedRedis(root / "redis") as redis_server:
            port = free_port()
            settings = Settings(
                redis_url=redis_server.url,
                s3_endpoint_url=s3.endpoint_url,
                s3_bucket=f"load-{secrets.token_hex(4)}",
                aws_access_key_id=s3.access_key,
                aws_secret_access_key=s3.secret_key,
                secret_key=secrets.token_urlsafe(32),
                port=port,
                worker_processes=arguments.processes,
            ).validated()
            async with Storage.open(settings) as store:
                await store.ensure_bucket([settings.app_url])
                processes = [start_process("serve", settings, root / "serve.log")]
                processes += [
                    start_process("worker", settings, root / f"worker-{number}.log")
                    for number in range(arguments.workers)
                ]
                redis = ArqRedis.from_url(settings.redis_url)
                try:
                    base_url = f"http://127.0.0.1:{port}"
                    await wait_until_serving(base_url, processes[0])
                    timings = Timings()
                    started = time.perf_counter()
                    results = await asyncio.gather(
                        *(run_user(base_url, n, photos, timings) for n in range(arguments.users))
                    )
                    submitted = time.perf_counter()
                    users = dict(results)
                    upload_ids = [upload_id for ids in users.values() for upload_id in ids]
                    await wait_until_finished(redis, upload_ids, timings)
                    finished = time.perf_counter()
                    result = await audit(redis, store, users)
                finally:
                    await redis.aclose()
                    for process in processes:
                        process.terminate()
                    for process in processes:
                        try:
                            process.wait(timeout=30)
                        except subprocess.TimeoutExpired:
                            process.kill()
                            process.wait()
    report(arguments, timings, result, len(upload_ids), submitted - started, finished - started)
    return result.passed and not timings.failures


def report(
    arguments, timings: Timings, result: Audit, uploads: int, submit_s: float, total_s: float
) -> None:
    planned = arguments.users * arguments.photos
    print(
        f"\n{uploads} of {planned} uploads reached S3; {len(timings.failures)} request "
        f"failures; requests sent again after a connection error: {dict(timings.retries)}"
    )
    for failure in timings.failures[:10]:
        print(f"  {failure}")
    print(
        f"all requests sent in {submit_s:.1f} s; every upload finished {total_s:.1f} s after "
        f"the start: {uploads / total_s:.2f} uploads/s end to end"
    )
    print("\n| step | count | p50 ms | p95 ms | max ms |")
    print("| --- | --- | --- | --- | --- |")
    for step in STEPS:
        values = timings.steps.get(step, [])
        if values:
            print(
                f"| {step} | {len(values)} | {1000 * percentile(values, 0.5):.0f} | "
                f"{1000 * percentile(values, 0.95):.0f} | {1000 * max(values):.0f} |"
            )
    print(f"\nend state: {dict(result.states)}")
    print(
        f"audit: {result.missing_records} records missing, {result.unfinished} unfinished, "
        f"{len(result.grid_mismatches)} grids differing, {len(result.missing_objects)} "
        f"objects missing, {len(result.extra_objects)} objects without a ready image"
    )
    for key in (result.missing_objects + result.extra_objects)[:10]:
        print(f"  {key}")
    print(
        f"audit {'passed' if result.passed else 'FAILED'}; load average at end {os.getloadavg()[0]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--users", type=int, default=50, help="simulated users (default: %(default)s)"
    )
    parser.add_argument(
        "--photos", type=int, default=20, help="photos each user uploads (default: %(default)s)"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="`gallery worker` processes (default: %(default)s)"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="decoding processes in each worker (default: %(default)s)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=2048,
        help="width in pixels of the generated photos, in 4:3 (default: %(default)s)",
    )
    parser.add_argument(
        "--corpus", type=Path, help="upload the JPEGs under this folder instead of generated ones"
    )
    arguments = parser.parse_args()
    for name in ("users", "photos", "workers", "processes", "size"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name} is {getattr(arguments, name)}, expected at least 1")
    sys.exit(0 if asyncio.run(run_load(arguments)) else 1)


if __name__ == "__main__":
    main()
