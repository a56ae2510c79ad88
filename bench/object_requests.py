"""Compare the CPU cost of the worker's object requests: aiobotocore against our client.

Run by hand from the repository root, never as a test:

    .venv/bin/python bench/object_requests.py [--count N] [--rounds N]

The script starts SeaweedFS (weed mini) on 127.0.0.1 in a temporary folder and sends
--count requests of each kind the worker makes per upload: a PUT of 516 KB (an original),
a PUT of 30 KB (a rendition), a GET of 516 KB and the delete of one key. Each kind goes
through our object client (`Storage.write`, `read_object` and `delete`) and through the
aiobotocore client that Storage keeps for the rest, in turn, --rounds times. It prints
the CPU ms per request of this process and of SeaweedFS.
"""

import argparse
import asyncio
import os
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from throughput import read_children_cpu

from gallery.embedded import EmbeddedS3
from gallery.settings import Settings
from gallery.storage import Storage

ORIGINAL = os.urandom(516_000)
RENDITION = os.urandom(30_000)


async def cpu_per_request(
    count: int, send: Callable[[int], Awaitable[object]]
) -> tuple[float, float]:
    """Return the CPU ms per request of this process and of SeaweedFS for `count` requests."""
    started, server_started = time.process_time(), read_children_cpu()["SeaweedFS"]
    for number in range(count):
        await send(number)
    own = time.process_time() - started
    server = read_children_cpu()["SeaweedFS"] - server_started
    return 1000 * own / count, 1000 * server / count


def request_kinds(store: Storage) -> dict[str, tuple[Callable, Callable]]:
    """Return, by kind, the request through our client and through aiobotocore."""
    client, bucket = store._client, store.bucket

    async def boto_get(number: int) -> None:
        response = await client.get_object(Bucket=bucket, Key=f"boto/original/{number}")
        async with response["Body"] as body:
            await body.read()

    def boto_put(folder: str, body: bytes, content_type: str) -> Callable:
        return lambda number: client.put_object(
            Bucket=bucket,
            Key=f"boto/{folder}/{number}",
            Body=body,
            ContentType=content_type,
            Metadata={"owner": "bench"},
        )

    def ours_put(folder: str, body: bytes, content_type: str) -> Callable:
        return lambda number: store.write(
            f"ours/{folder}/{number}", body, content_type=content_type, metadata={"owner": "bench"}
        )

    return {
        "PUT 516 KB": (
            ours_put("original", ORIGINAL, "image/jpeg"),
            boto_put("original", ORIGINAL, "image/jpeg"),
        ),
        "PUT 30 KB": (
            ours_put("rendition", RENDITION, "image/webp"),
            boto_put("rendition", RENDITION, "image/webp"),
        ),
        "GET 516 KB": (
            lambda number: store.read_object(f"ours/original/{number}", max_bytes=10**7),
            boto_get,
        ),
        "delete one key": (
            lambda number: store.delete([f"ours/rendition/{number}"]),
            lambda number: client.delete_objects(
                Bucket=bucket,
                Delete={"Objects": [{"Key": f"boto/rendition/{number}"}], "Quiet": True},
            ),
        ),
    }


async def run_benchmark(count: int, rounds: int) -> None:
    print(f"{count} requests of each kind, {rounds} rounds; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as folder:
        s3 = EmbeddedS3(
            Path(folder) / "s3",
            access_key=secrets.token_hex(10).upper(),
            secret_key=secrets.token_urlsafe(30),
        )
        with s3:
            settings = Settings(
                s3_endpoint_url=s3.endpoint_url,
                s3_bucket=f"bench-{secrets.token_hex(4)}",
                aws_access_key_id=s3.access_key,
                aws_secret_access_key=s3.secret_key,
                secret_key=secrets.token_urlsafe(32),
            ).validated()
            async with Storage.open(settings) as store:
                await store.ensure_bucket([settings.app_url])
                print(
                    "| round | request | ours: this process | aiobotocore: this process |", end=""
                )
                print(" ours: SeaweedFS | aiobotocore: SeaweedFS |")
                print("| --- " * 6 + "|")
                for round_number in range(1, rounds + 1):
                    for kind, (ours, boto) in request_kinds(store).items():
                        ours_ms = await cpu_per_request(count, ours)
                        boto_ms = await cpu_per_request(count, boto)
                        print(
                            f"| {round_number} | {kind} | {ours_ms[0]:.2f} | {boto_ms[0]:.2f} |"
                            f" {ours_ms[1]:.2f} | {boto_ms[1]:.2f} |"
                        )
    print(f"load average at end {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--count", type=int, default=200, help="requests of each kind (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of every kind (default: %(default)s)"
    )
    arguments = parser.parse_args()
    if arguments.count < 1 or arguments.rounds < 1:
        parser.error("--count and --rounds must be at least 1")
    asyncio.run(run_benchmark(arguments.count, arguments.rounds))


if __name__ == "__main__":
    main()
