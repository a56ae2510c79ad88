"""Time a burst of corpus photos through the real worker, with one pool process and the default.

Run by hand from the repository root, never as a test:

    .venv/bin/python bench/throughput.py [--corpus DIR] [--count N] [--rounds N]

The script starts SeaweedFS (weed mini) and Valkey on 127.0.0.1 in a temporary folder, with
a generated key pair, and creates the bucket with Storage.ensure_bucket. For each pool size
it records --count uploads for one user, posts each photo to S3 with the real presigned
form, marks it uploaded and queues its verify job, as the web app does. Then it runs
make_worker(settings, burst=True) until the queue is empty and checks that every upload
is ready. The photos cycle through the corpus folders mobile/, cameras/, gps/ and
orientation/.

The rate counts from the end of the worker's start-up, once every pool process has imported
the imaging modules, to the return of Worker.main(), so it leaves out process start-up. Over
the same span the script sums the CPU time of the pool processes, of the worker's own
process (event loop, S3 client) and of the two servers, which share the machine's cores.
From those it prints the largest speed-up that the CPU time of the other processes allows.
With --rounds N the script runs N bursts of each pool size, in turn, and prints the median
of the N speed-ups, because the load from other programs changes between bursts.
"""

import argparse
import asyncio
import collections
import importlib
import itertools
import logging
import os
import platform
import secrets
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import PIL
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings

import worker.settings as worker_settings
from gallery import index, jobs, storage
from gallery.embedded import EmbeddedRedis, EmbeddedS3
from gallery.settings import Settings
from gallery.storage import Storage
from worker.settings import make_worker

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO_ROOT.parent / "shared" / "corpus"
CORPUS_FOLDERS = ("mobile", "cameras", "gps", "orientation")

# Each warm-up task keeps its pool process busy this long, so the next task goes to another.
WARM_UP_SECONDS = 0.5
WARM_UP_ROUNDS = 10


# Substrings of the command lines of this process's children, by the name reported for them.
CHILD_KINDS = {
    "pool": b"multiprocessing.spawn",
    "SeaweedFS": b"weed",
    "Valkey": b"valkey-server",
}


@dataclass
class Snapshot:
    """Wall-clock seconds and the CPU seconds of this process and of its children by kind."""

    wall: float
    worker_cpu: float
    children_cpu: dict[str, float]

    @classmethod
    def take(cls) -> "Snapshot":
        return cls(time.perf_counter(), time.process_time(), read_children_cpu())

    def minus(self, earlier: "Snapshot") -> "Snapshot":
        children_cpu = {
            kind: seconds - earlier.children_cpu[kind]
            for kind, seconds in self.children_cpu.items()
        }
        return Snapshot(
            self.wall - earlier.wall, self.worker_cpu - earlier.worker_cpu, children_cpu
        )


def read_children_cpu() -> dict[str, float]:
    """Return the CPU seconds of this process's live children, summed by CHILD_KINDS."""
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    totals = dict.fromkeys(CHILD_KINDS, 0.0)
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_path.read_text()
            command_line = (stat_path.parent / "cmdline").read_bytes()
        except OSError:
            # The process exited between the listing and the read.
            continue
        # The command name in parentheses may contain spaces, so fields count from its end.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) != os.getpid():
            continue
        for kind, marker in CHILD_KINDS.items():
            if marker in command_line:
                totals[kind] += (int(fields[11]) + int(fields[12])) / ticks_per_second
                break
    return totals


def load_imaging_and_wait(seconds: float) -> int:
    """Import the imaging modules in a pool process, hold it, and return its process id."""
    importlib.import_module("gallery.imaging")
    time.sleep(seconds)
    return os.getpid()


def list_photos(corpus: Path, count: int) -> list[tuple[str, bytes]]:
    """Return `count` photos as (name, bytes), taking one from each folder in turn."""
    folders = []
    for folder in CORPUS_FOLDERS:
        paths = sorted((corpus / folder).glob("*.jpg"))
        if not paths:
            raise SystemExit(f"no JPEG files found in {corpus / folder}; check --corpus")
        folders.append(itertools.cycle(paths))
    paths = [next(folders[index % len(folders)]) for index in range(count)]
    return [(f"{path.parent.name}/{path.name}", path.read_bytes()) for path in paths]


async def post_uploads(
    settings: Settings, store: Storage, redis: ArqRedis, photos: list[tuple[str, bytes]]
) -> list[str]:
    """Record, post and queue one upload per photo for a new user; return the upload ids."""
    user_id = secrets.token_hex(8)
    upload_ids = []
    async with httpx.AsyncClient(timeout=60) as http:
        for name, data in photos:
            upload = await index.create_upload(
                redis,
                user_id=user_id,
                filename=name,
                content_type="image/jpeg",
                max_bytes=settings.max_upload_bytes,
                form_seconds=settings.upload_form_seconds,
                max_pending=len(photos),
            )
            form = await store.presign_upload(
                storage.incoming_key(user_id, upload.id),
                content_type=upload.content_type,
                owner=user_id,
                max_bytes=upload.max_bytes,
                expires_in=settings.upload_form_seconds,
            )
            files = {"file": (name, data, "application/octet-stream")}
            response = await http.post(form.url, data=form.fields, files=files)
            if response.status_code != 201:
                raise RuntimeError(f"posting {name} failed: {response.status_code} {response.text}")
            await index.mark_uploaded(redis, upload)
            upload_ids.append(upload.id)

    for upload_id in upload_ids:
        await jobs.enqueue_verify(redis, upload_id)
    return upload_ids


async def warm_up_pool(pool: ProcessPoolExecutor, pool_size: int) -> None:
    """Run warm-up tasks until each of the `pool_size` processes has run one."""
    loop = asyncio.get_running_loop()
    warm_process_ids: set[int] = set()
    for _ in range(WARM_UP_ROUNDS):
        warm_ups = [
            loop.run_in_executor(pool, load_imaging_and_wait, WARM_UP_SECONDS)
            for _ in range(pool_size)
        ]
        warm_process_ids.update(await asyncio.gather(*warm_ups))
        if len(warm_process_ids) >= pool_size:
            return
    raise RuntimeError(
        f"only {len(warm_process_ids)} of {pool_size} pool processes ran a warm-up task"
        f" in {WARM_UP_ROUNDS} rounds"
    )


async def run_worker(settings: Settings, processes: int | None) -> "Snapshot":
    """Run the worker in burst mode and return the times from its warm pool to its end.

    `processes` None keeps the default pool size, one process per core.
    """
    pool_size = processes or os.cpu_count() or 1
    started: list[Snapshot] = []

    async def start_and_warm_up(ctx: dict[str, Any]) -> None:
        await worker_settings.startup(ctx)
        await warm_up_pool(ctx["pool"], pool_size)
        started.append(Snapshot.take())

    overrides = {"burst": True, "poll_delay": 0.05, "handle_signals": False}
    pool_settings = replace(settings, worker_processes=processes or 0)
    worker = make_worker(pool_settings, on_startup=start_and_warm_up, **overrides)
    try:
        await worker.main()
        # The pool processes exit in close(), so their CPU time is read before it.
        finished = Snapshot.take()
    finally:
        await worker.close()
    return finished.minus(started[0])


async def count_states(redis: ArqRedis, upload_ids: list[str]) -> collections.Counter[str]:
    states: collections.Counter[str] = collections.Counter()
    for upload_id in upload_ids:
        upload = await index.get_upload(redis, upload_id)
        states["missing" if upload is None else f"{upload.state} {upload.reason}".strip()] += 1
    return states


@dataclass
class Burst:
    """One burst through the worker: its pool size, image count and times."""

    pool_size: int
    image_count: int
    times: Snapshot

    @property
    def images_per_second(self) -> float:
        return self.image_count / self.times.wall


async def measure_pool_size(
    settings: Settings,
    store: Storage,
    redis: ArqRedis,
    photos: list[tuple[str, bytes]],
    processes: int | None,
) -> Burst:
    """Run one burst with `processes` pool processes, or the default number for None."""
    upload_ids = await post_uploads(settings, store, redis, photos)
    times = await run_worker(settings, processes)

    states = await count_states(redis, upload_ids)
    if states != {"ready": len(upload_ids)}:
        raise RuntimeError(f"expected {len(upload_ids)} ready uploads, found {dict(states)}")
    burst = Burst(processes or os.cpu_count() or 1, len(upload_ids), times)
    print(f"{burst.pool_size} pool processes: {burst.image_count} images in {times.wall:.1f} s")
    return burst


def print_bursts(bursts: list[Burst]) -> None:
    kinds = list(CHILD_KINDS)
    print("\n| pool processes | images/s | seconds | CPU s: worker process |", end="")
    print("".join(f" {kind} |" for kind in kinds))
    print("| --- " * (4 + len(kinds)) + "|")
    for burst in bursts:
        times = burst.times
        cells = [
            str(burst.pool_size),
            f"{burst.images_per_second:.2f}",
            f"{times.wall:.1f}",
            f"{times.worker_cpu:.1f}",
            *(f"{times.children_cpu[kind]:.1f}" for kind in kinds),
        ]
        print("| " + " | ".join(cells) + " |")


def print_cpu_bound(burst: Burst) -> None:
    """Print the speed-up over one pool process that the burst's CPU seconds allow.

    With one pool process a burst takes at least the pool's CPU time P. With every core
    busy it takes at least (P + R) / cores, where R is the CPU time of the worker's own
    process and the servers, so the speed-up is at most cores * P / (P + R).
    """
    times = burst.times
    pool = times.children_cpu["pool"]
    rest = times.worker_cpu + sum(
        seconds for kind, seconds in times.children_cpu.items() if kind != "pool"
    )
    cores = os.cpu_count() or 1
    bound = min(burst.pool_size, cores * pool / (pool + rest))
    print(
        f"CPU per image: pool {1000 * pool / burst.image_count:.1f} ms, worker process and"
        f" servers {1000 * rest / burst.image_count:.1f} ms; speed-up bound on {cores} cores:"
        f" {bound:.2f}x"
    )


def describe_machine() -> str:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    return (
        f"CPU: {cpu_model}, {os.cpu_count()} cores; Python {platform.python_version()},"
        f" Pillow {PIL.__version__}"
    )


async def run_benchmark(corpus: Path, count: int, rounds: int) -> None:
    photos = list_photos(corpus, count)
    megabytes = sum(len(data) for _, data in photos) / 1e6
    print(describe_machine())
    print(f"{count} photos, {megabytes:.1f} MB; load average at start {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        s3 = EmbeddedS3(
            root / "s3",
            access_key=secrets.token_hex(10).upper(),
            secret_key=secrets.token_urlsafe(30),
        )
        with s3, EmbeddedRedis(root / "redis") as redis_server:
            settings = Settings(
                redis_url=redis_server.url,
                s3_endpoint_url=s3.endpoint_url,
                s3_bucket=f"bench-{secrets.token_hex(4)}",
                aws_access_key_id=s3.access_key,
                aws_secret_access_key=s3.secret_key,
                secret_key=secrets.token_urlsafe(32),
            ).validated()
            redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
            try:
                async with Storage.open(settings) as store:
                    await store.ensure_bucket([settings.app_url])
                    pairs = []
                    for round_number in range(rounds):
                        # Odd rounds start with the default pool, so that neither pool size
                        # always runs first while the machine's load changes.
                        sizes = (1, None) if round_number % 2 == 0 else (None, 1)
                        bursts = {
                            processes: await measure_pool_size(
                                settings, store, redis, photos, processes
                            )
                            for processes in sizes
                        }
                        pairs.append((bursts[1], bursts[None]))
            finally:
                await redis.aclose()

    print_bursts([burst for pair in pairs for burst in pair])
    ratios = []
    for single, default in pairs:
        ratios.append(default.images_per_second / single.images_per_second)
        print(f"\n{default.pool_size} pool processes vs 1: {ratios[-1]:.2f}x")
        print_cpu_bound(default)
    print(f"\nmedian of {len(ratios)} rounds: {statistics.median(ratios):.2f}x")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus",
        type=Path,
        default=DEFAULT_CORPUS,
        help="folder of the photo corpus, with mobile/, cameras/, gps/ and orientation/"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "--count", type=int, default=200, help="photos in each burst (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="bursts of each pool size, taken in turn (default: %(default)s)",
    )
    arguments = parser.parse_args()
    if arguments.count < 1:
        parser.error(f"--count is {arguments.count}, expected at least 1")
    if arguments.rounds < 1:
        parser.error(f"--rounds is {arguments.rounds}, expected at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(run_benchmark(arguments.corpus, arguments.count, arguments.rounds))


if __name__ == "__main__":
    main()
