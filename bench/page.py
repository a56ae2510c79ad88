"""Time the grid page against a naive page that lists and presigns a user's whole folder.

Run by hand from the repository root, never as a test:

    .venv/bin/python bench/page.py [--sizes 100,1000,10000] [--requests 100]
        [--naive-requests 20] [--clients 20] [--load-seconds 10]

The script starts SeaweedFS (`weed mini`) and Valkey in a temporary folder, and one uvicorn
process that serves the gallery app plus one page of its own. For each size N it signs up
a new user, writes N ready records to the Redis index with the index functions, and puts N
small WebP objects under the user's thumbnail folder in the bucket. Then it requests, one
at a time after a warm-up:

- ours: GET /images, the grid page of the newest 60 tiles. It reads the page's records
  from the index and signs each tile's two thumbnail URLs in process.
- naive: GET /naive, which lists the user's thumbnail folder with ListObjectsV2 (1,000 keys
  per call, so N/1,000 calls), sorts the objects newest first, presigns every one with
  aiobotocore's generate_presigned_url and renders one <img> per object.

A time is the server's own: the app is wrapped so that each response carries a
Server-Timing header with the time from the request's arrival to the start of the
response, which Litestar sends once the page is rendered.

Last, --clients httpx clients, each with its own connection, request the grid fragment
(GET /images?before=... with HX-Request: 60 tiles from the middle of the grid) as fast as
they can for --load-seconds, and the script reports completed requests per second. The
clients run in this process, so on a small machine they take CPU from the server.

It also times presigning one thumbnail URL 2,000 times with our signer (through
Storage.presign_get) and with botocore's and aiobotocore's generate_presigned_url.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import aioboto3
import boto3
import httpx
from botocore.config import Config
from litestar import Litestar, Request, get
from litestar.di import NamedDependency
from litestar.exceptions import NotAuthorizedException
from litestar.response import Template
from PIL import Image
from redis.asyncio import Redis

from gallery import index, storage
from gallery.accounts import current_user
from gallery.app import create_app
from gallery.embedded import EmbeddedRedis, EmbeddedS3, free_port
from gallery.settings import Settings
from gallery.storage import Storage

DEFAULT_SIZES = (100, 1_000, 10_000)
BENCH_PASSWORD = "bench password, not a secret"
HTMX = {"HX-Request": "true"}

# Requests of our page for each user before the timed ones, so that imports, template
# compilation and connection pools are warm. The naive page gets one.
WARMUP_REQUESTS = 10

# Seeding tasks in flight at once. The S3 client's pool allows 10 connections.
SEED_CONCURRENCY = 32

NAIVE_TEMPLATE = """<!doctype html>
<title>All photos</title>
{% for url in urls %}<img src="{{ url }}" alt="" loading="lazy">
{% endfor %}"""


@get("/naive", name="bench:naive")
async def show_naive_gallery(
    request: Request[Any, Any, Any],
    store: NamedDependency[Storage],
    settings: NamedDependency[Settings],
) -> Template:
    """Render every thumbnail of the user, listed from the bucket and presigned by botocore."""
    user = current_user(request)
    if user is None:
        raise NotAuthorizedException("Sign in to continue.")
    # The folder that storage.thumbnail_key puts a user's thumbnails in.
    objects = [item async for item in store.list_objects(f"u/{user.id}/t/")]
    objects.sort(key=lambda item: (item[1], item[0]), reverse=True)
    client = request.app.state.naive_presign_client
    urls = []
    for key, _ in objects:
        params = {
            "Bucket": settings.s3_bucket,
            "Key": key,
            "ResponseContentType": "image/webp",
            "ResponseContentDisposition": "inline",
        }
        urls.append(
            await client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=settings.url_expiry_seconds
            )
        )
    return Template(template_str=NAIVE_TEMPLATE, context={"urls": urls})


def add_naive_gallery(app: Litestar, settings: Settings) -> None:
    """Register the naive page, and a presigning client like the one Storage.open makes."""
    stack = AsyncExitStack()

    async def open_presign_client(app: Litestar) -> None:
        session = aioboto3.Session(
            aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=settings.aws_secret_access_key,
            region_name=settings.s3_region,
        )
        config = Config(signature_version="s3v4", s3={"addressing_style": "path"})
        client = session.client("s3", endpoint_url=settings.presign_endpoint_url, config=config)
        app.state.naive_presign_client = await stack.enter_async_context(client)

    async def close_presign_client(app: Litestar) -> None:
        await stack.aclose()

    app.register(show_naive_gallery)
    app.on_startup.append(open_presign_client)
    app.on_shutdown.append(close_presign_client)


ASGIApp = Callable[..., Awaitable[None]]


def with_server_timing(app: ASGIApp) -> ASGIApp:
    """Wrap an ASGI app so each response reports in Server-Timing how long it took to start."""

    async def timed_app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_with_timing(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                duration_ms = (time.perf_counter() - started) * 1000
                timing = (b"server-timing", f"app;dur={duration_ms:.3f}".encode())
                message = {**message, "headers": [*message.get("headers", []), timing]}
            await send(message)

        await app(scope, receive, send_with_timing)

    return timed_app


def serve() -> None:
    """Serve the gallery app with the naive page on GALLERY_HOST:GALLERY_PORT."""
    import uvicorn

    settings = Settings.from_env().require_services()
    app = create_app(settings)
    add_naive_gallery(app, settings)
    # No access log: one log line per request would be part of every timing.
    uvicorn.run(
        with_server_timing(app),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
    )


def describe_machine() -> list[str]:
    """Return lines naming the CPU, core count, memory and software versions."""
    cpu_model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    machine = (
        f"machine: {os.cpu_count()} cores (nproc), {cpu_model}, "
        f"{memory_kib / 1024 / 1024:.1f} GiB RAM"
    )
    packages = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("litestar", "uvicorn", "botocore", "redis")
    )
    software = f"software: Python {platform.python_version()}, {packages}"
    return [machine, software]


def cpu_seconds(pid: int) -> float:
    """Return the user and system CPU time a process has used, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of proc(5), after the pid and the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def bench_services(folder: Path) -> Any:
    """Start SeaweedFS and Valkey in a folder; hand over settings for an app on a free port."""
    s3_server = EmbeddedS3(
        folder / "s3",
        access_key=secrets.token_hex(10).upper(),
        secret_key=secrets.token_urlsafe(30),
    )
    with s3_server, EmbeddedRedis(folder / "redis") as redis_server:
        yield Settings(
            redis_url=redis_server.url,
            s3_endpoint_url=s3_server.endpoint_url,
            s3_bucket="bench",
            aws_access_key_id=s3_server.access_key,
            aws_secret_access_key=s3_server.secret_key,
            secret_key=secrets.token_urlsafe(32),
            port=free_port(),
            data_dir=folder / "data",
        ).validated()


@contextmanager
def child_process(command: list[str], settings: Settings, log_path: Path) -> Any:
    """Run a command with the settings in its environment; stop it with SIGINT on exit."""
    environment = {**os.environ, **settings.to_env()}
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, env=environment, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_until_serving(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the app exited with code {process.returncode}; see {log_path}")
            try:
                if (await http.get(f"{url}/signin")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the app did not respond at {url} within 60 s; see {log_path}")


async def sign_up(http: httpx.AsyncClient, username: str) -> None:
    """Sign a new user up through the app's form; the client keeps the session cookie."""
    await http.get("/signup")
    response = await http.post(
        "/signup",
        data={"username": username, "password": BENCH_PASSWORD},
        headers={"x-csrftoken": http.cookies["csrftoken"]},
    )
    if response.status_code not in (200, 303):
        raise RuntimeError(f"sign-up of {username} failed with {response.status_code}")


def percentile(samples: list[float], fraction: float) -> float:
    """Return a percentile by linear interpolation between the closest ranks."""
    ordered = sorted(samples)
    position = (len(ordered) - 1) * fraction
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def small_webp(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 160)).save(buffer, "WEBP", quality=80)
    return buffer.getvalue()


async def seed_images(redis: Redis, store: Storage, user_id: str, count: int) -> list[str]:
    """Write `count` ready records and thumbnail objects for a user; return the ids."""
    thumbnail = small_webp(256, 192)
    placeholder = "data:image/webp;base64," + base64.b64encode(small_webp(16, 12)).decode()
    semaphore = asyncio.Semaphore(SEED_CONCURRENCY)

    async def seed_one() -> str:
        async with semaphore:
            upload = await index.create_upload(
                redis,
                user_id=user_id,
                filename="IMG_0001.jpg",
                content_type="image/jpeg",
                max_bytes=3_000_000,
                form_seconds=60,
                max_pending=count + 1,
            )
            await index.mark_uploaded(redis, upload)
            await index.mark_ready(
                redis,
                upload,
                content_type="image/jpeg",
                width=4000,
                height=3000,
                size=2_500_000,
                placeholder=placeholder,
            )
            await store.write(
                storage.thumbnail_key(user_id, upload.id),
                thumbnail,
                content_type="image/webp",
                metadata={"owner": user_id},
                cache_control=storage.RENDITION_CACHE_CONTROL,
            )
            return upload.id

    return await asyncio.gather(*(seed_one() for _ in range(count)))


def server_time_ms(response: httpx.Response) -> float:
    return float(response.headers["server-timing"].split("dur=")[1])


@dataclass
class PageTimes:
    """Server times of one page at one size, in milliseconds, and the page's size in bytes."""

    samples: list[float]
    page_bytes: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        return percentile(self.samples, 0.95)


async def request_page(http: httpx.AsyncClient, path: str, expected_images: int) -> httpx.Response:
    """Request a page and check that it shows the expected number of images."""
    response = await http.get(path)
    response.raise_for_status()
    images = response.text.count("<img src=")
    if images != expected_images:
        raise RuntimeError(f"GET {path} showed {images} images, expected {expected_images}")
    return response


async def time_ours_round_robin(
    users: list[SeededUser], requests: int, page_size: int
) -> dict[int, PageTimes]:
    """Time our grid page for every size in turn, so that a change in load hits all sizes."""
    for user in users:
        for _ in range(WARMUP_REQUESTS):
            await request_page(user.http, "/images", page_size)
    samples: dict[int, list[float]] = {user.size: [] for user in users}
    page_bytes = {}
    for _ in range(requests):
        for user in users:
            response = await request_page(user.http, "/images", page_size)
            samples[user.size].append(server_time_ms(response))
            page_bytes[user.size] = len(response.content)
    return {size: PageTimes(samples[size], page_bytes[size]) for size in samples}


async def time_naive(user: SeededUser, requests: int) -> PageTimes:
    await request_page(user.http, "/naive", user.size)
    samples = []
    for _ in range(requests):
        response = await request_page(user.http, "/naive", user.size)
        samples.append(server_time_ms(response))
    return PageTimes(samples, len(response.content))


@dataclass
class Throughput:
    """Fragment requests completed per second under load, and the server's CPU use meanwhile."""

    requests_per_second: float
    errors: int
    # CPU seconds the server process used per second of load: 1.0 is one core kept busy.
    server_cores: float


async def measure_throughput(
    base_url: str, cookies: httpx.Cookies, path: str, server_pid: int, clients: int, seconds: float
) -> Throughput:
    """Request a fragment from `clients` clients at once, each on its own connection."""
    completed = 0
    errors = 0
    ready = asyncio.Barrier(clients + 1)
    deadline = 0.0

    async def run_client() -> None:
        nonlocal completed, errors
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(
            base_url=base_url, cookies=cookies, headers=HTMX, limits=limits, timeout=30
        ) as http:
            # One request first, so that connecting is not part of the measured time.
            (await http.get(path)).raise_for_status()
            await ready.wait()
            while time.monotonic() < deadline:
                response = await http.get(path)
                if response.status_code == 200:
                    completed += 1
                else:
                    errors += 1

    tasks = [asyncio.create_task(run_client()) for _ in range(clients)]
    await ready.wait()
    started = time.monotonic()
    cpu_at_start = cpu_seconds(server_pid)
    deadline = started + seconds
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    server_cores = (cpu_seconds(server_pid) - cpu_at_start) / elapsed
    return Throughput(completed / elapsed, errors, server_cores)


@dataclass
class SizeResult:
    size: int
    ours: PageTimes
    naive: PageTimes
    throughput: Throughput


@dataclass
class SeededUser:
    """A signed-in client of a user with `size` images, and a fragment URL deep in its grid."""

    size: int
    http: httpx.AsyncClient
    fragment_path: str


async def seed_user(
    settings: Settings, redis: Redis, store: Storage, size: int, http: httpx.AsyncClient
) -> SeededUser:
    username = f"bench{size}x{secrets.token_hex(3)}"
    await sign_up(http, username)
    user_id = (await redis.get(f"gallery:username:{username}")).decode()
    started = time.monotonic()
    ids = await seed_images(redis, store, user_id, size)
    print(f"N={size}: seeded in {time.monotonic() - started:.1f} s", file=sys.stderr)

    # A cursor with a full page after it, from the middle of the grid.
    newest_first = sorted(ids, reverse=True)
    cursor = newest_first[min(size // 2, size - settings.page_size) - 1]
    fragment_path = f"/images?before={cursor}"
    fragment = await http.get(fragment_path, headers=HTMX)
    tiles = fragment.text.count('class="tile ')
    if tiles != settings.page_size:
        raise RuntimeError(f"the fragment had {tiles} tiles, expected {settings.page_size}")
    return SeededUser(size, http, fragment_path)


async def measure_all(
    settings: Settings, redis: Redis, store: Storage, server_pid: int, arguments: Any
) -> list[SizeResult]:
    async with AsyncExitStack() as stack:
        users = []
        for size in arguments.sizes:
            http = httpx.AsyncClient(base_url=settings.app_url, timeout=120)
            await stack.enter_async_context(http)
            users.append(await seed_user(settings, redis, store, size, http))

        ours = await time_ours_round_robin(users, arguments.requests, settings.page_size)
        results = []
        for user in users:
            naive = await time_naive(user, arguments.naive_requests)
            throughput = await measure_throughput(
                settings.app_url,
                user.http.cookies,
                user.fragment_path,
                server_pid,
                arguments.clients,
                arguments.load_seconds,
            )
            results.append(SizeResult(user.size, ours[user.size], naive, throughput))
    return results


async def measure_signing(settings: Settings, count: int = 2000) -> dict[str, float]:
    """Return microseconds per thumbnail URL for our signer, botocore and aiobotocore.

    Presigning sends no request, so this needs no server.
    """
    key = "u/0123456789abcdef/t/0190a1b2c3d4e5f60123456789abcdef.webp"
    params = {
        "Bucket": settings.s3_bucket,
        "Key": key,
        "ResponseContentType": "image/webp",
        "ResponseContentDisposition": "inline",
    }
    credentials = {
        "aws_access_key_id": settings.aws_access_key_id,
        "aws_secret_access_key": settings.aws_secret_access_key,
        "region_name": settings.s3_region,
    }
    config = Config(signature_version="s3v4", s3={"addressing_style": "path"})
    endpoint = settings.presign_endpoint_url
    timings = {}

    store = Storage(None, None, settings)
    started = time.perf_counter()
    for _ in range(count):
        await store.presign_get(key, content_type="image/webp")
    timings["ours (Storage.presign_get)"] = time.perf_counter() - started

    client = boto3.client("s3", endpoint_url=endpoint, config=config, **credentials)
    started = time.perf_counter()
    for _ in range(count):
        client.generate_presigned_url("get_object", Params=params, ExpiresIn=600)
    timings[f"botocore {metadata.version('botocore')}"] = time.perf_counter() - started

    session = aioboto3.Session(**credentials)
    async with session.client("s3", endpoint_url=endpoint, config=config) as async_client:
        started = time.perf_counter()
        for _ in range(count):
            await async_client.generate_presigned_url("get_object", Params=params, ExpiresIn=600)
    timings[f"aiobotocore {metadata.version('aiobotocore')}"] = time.perf_counter() - started
    return {name: seconds / count * 1e6 for name, seconds in timings.items()}


def print_results(results: list[SizeResult], arguments: argparse.Namespace) -> None:
    print(
        f"\nserver time per page in ms; ours {arguments.requests} requests, "
        f"naive {arguments.naive_requests} requests at each size\n"
    )
    print(
        "| N | ours median | ours p95 | naive median | naive p95 | naive / ours (median) "
        "| ours page | naive page | fragment req/s | server CPU under load |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for result in results:
        ratio = result.naive.median / result.ours.median
        throughput = result.throughput
        errors = f" ({throughput.errors} errors)" if throughput.errors else ""
        print(
            f"| {result.size:,} | {result.ours.median:.1f} | {result.ours.p95:.1f} "
            f"| {result.naive.median:.1f} | {result.naive.p95:.1f} | {ratio:.0f}x "
            f"| {result.ours.page_bytes / 1024:.0f} KiB | {result.naive.page_bytes / 1024:.0f} KiB "
            f"| {throughput.requests_per_second:.0f}{errors} | {throughput.server_cores:.2f} cores |"
        )
    smallest, largest = results[0], results[-1]
    print(
        f"\nfragment req/s: {arguments.clients} httpx clients for {arguments.load_seconds:g} s "
        "against one uvicorn process"
    )
    print(
        f"naive / ours at N={largest.size:,}: "
        f"{largest.naive.median / largest.ours.median:.1f}x (target: at least 10x)"
    )
    print(
        f"ours at N={largest.size:,} / ours at N={smallest.size:,}: "
        f"{largest.ours.median / smallest.ours.median:.2f}x (target: at most 1.5x)"
    )


async def run_benchmark(arguments: argparse.Namespace) -> None:
    for line in describe_machine():
        print(line)
    print(f"load average at start: {os.getloadavg()[0]:.2f}")

    with (
        tempfile.TemporaryDirectory(prefix="gallery-bench-page-") as folder,
        bench_services(Path(folder)) as settings,
    ):
        log_path = Path(folder) / "app.log"
        command = [sys.executable, str(Path(__file__).resolve()), "--serve"]
        async with AsyncExitStack() as stack:
            store = await stack.enter_async_context(Storage.open(settings))
            await store.ensure_bucket([settings.app_url])
            redis = Redis.from_url(settings.redis_url)
            stack.push_async_callback(redis.aclose)
            with child_process(command, settings, log_path) as server:
                await wait_until_serving(server, settings.app_url, log_path)
                results = await measure_all(settings, redis, store, server.pid, arguments)
        signing = await measure_signing(settings)

    print_results(results, arguments)
    print("\npresigning one thumbnail URL, in microseconds (mean of 2,000)\n")
    for name, microseconds in signing.items():
        print(f"- {name}: {microseconds:.1f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


def parse_sizes(text: str) -> list[int]:
    sizes = sorted(int(part) for part in text.split(","))
    if sizes[0] <= Settings().page_size:
        raise argparse.ArgumentTypeError(
            f"size {sizes[0]} is too small: each size needs more than one page "
            f"({Settings().page_size}) of images"
        )
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=list(DEFAULT_SIZES),
        help="comma-separated numbers of images to seed, one user each (default: 100,1000,10000)",
    )
    parser.add_argument(
        "--requests", type=int, default=100, help="timed requests of our page (default: 100)"
    )
    parser.add_argument(
        "--naive-requests",
        type=int,
        default=20,
        help="timed requests of the naive page (default: 20)",
    )
    parser.add_argument(
        "--clients", type=int, default=20, help="concurrent clients for req/s (default: 20)"
    )
    parser.add_argument(
        "--load-seconds",
        type=float,
        default=10,
        help="how long the clients request the fragment, in seconds (default: 10)",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serve:
        serve()
        return
    for name in ("requests", "naive_requests", "clients"):
        if getattr(arguments, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} is {getattr(arguments, name)}, expected 1 or more"
            )

    asyncio.run(run_benchmark(arguments))


if __name__ == "__main__":
    main()
