"""`gallery dev`: the whole gallery on one machine, with embedded S3 and Redis by default."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from gallery.settings import Settings

logger = logging.getLogger(__name__)


def run_dev(settings: Settings) -> None:
    """Start the servers this machine needs, one worker and the web app; stop all on Ctrl-C."""
    import uvicorn

    from gallery.app import create_app

    # uvicorn raises SIGTERM again after its shutdown. As SystemExit, the signal unwinds the
    # stack below, so the worker and the servers stop before the process ends.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with ExitStack() as stack:
        if settings.uses_embedded_services:
            settings = _start_embedded_services(settings, stack)
        settings = settings.require_services()
        asyncio.run(_prepare_bucket(settings))

        worker = subprocess.Popen(
            [sys.executable, "-m", "gallery.cli", "worker"],
            env={**os.environ, **settings.to_env()},
        )
        stack.callback(_stop_process, worker)

        logger.info("gallery is serving at %s", settings.app_url)
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)


def _exit_on_signal(signum: int, _: object) -> None:
    raise SystemExit(128 + signum)


def _start_embedded_services(settings: Settings, stack: ExitStack) -> Settings:
    from gallery.embedded import EmbeddedRedis, EmbeddedS3

    data_dir = settings.data_dir.resolve()
    secrets_ = _load_or_make_secrets(data_dir / "secrets.json")
    s3 = EmbeddedS3(
        data_dir / "s3",
        secrets_["s3_access_key"],
        secrets_["s3_secret_key"],
        buckets=[settings.s3_bucket],
        allowed_origins=_app_origins(settings),
    )
    stack.enter_context(s3)
    redis = stack.enter_context(EmbeddedRedis(data_dir / "redis"))
    logger.info(
        "embedded S3 at %s and Redis at %s, data in %s", s3.endpoint_url, redis.url, data_dir
    )
    return replace(
        settings,
        s3_endpoint_url=s3.endpoint_url,
        redis_url=redis.url,
        aws_access_key_id=secrets_["s3_access_key"],
        aws_secret_access_key=secrets_["s3_secret_key"],
        secret_key=settings.secret_key or secrets_["app_secret_key"],
    )


def _load_or_make_secrets(path: Path) -> dict[str, str]:
    """Return the embedded services' keys, made once and kept with their data."""
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {
        "s3_access_key": "gallery" + secrets.token_hex(6),
        "s3_secret_key": secrets.token_urlsafe(30),
        "app_secret_key": secrets.token_urlsafe(48),
    }
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(values, file)
    return values


async def _prepare_bucket(settings: Settings) -> None:
    from gallery.storage import Storage

    async with Storage.open(settings) as store:
        await store.ensure_bucket(_app_origins(settings))


def _app_origins(settings: Settings) -> list[str]:
    """Return the origins the gallery's pages load from, which may post to the bucket."""
    origins = {settings.app_url}
    if settings.host == "127.0.0.1" and not settings.public_url:
        origins.add(f"http://localhost:{settings.port}")
    return sorted(origins)


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
