"""The `gallery` command: serve the web app, run a worker, or run everything for development."""

from __future__ import annotations

import asyncio
import logging
import sys

import click

from gallery.logs import configure_logging
from gallery.settings import Settings, SettingsError

logger = logging.getLogger(__name__)


def _load_settings() -> Settings:
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        raise click.ClickException(str(error)) from None
    configure_logging(settings)
    return settings


@click.group()
def main() -> None:
    """Run the gallery: a self-hosted, multi-user private image gallery."""
    # Until a command has read its settings, lines are text at INFO.
    configure_logging(Settings())


@main.command()
def serve() -> None:
    """Serve the web app on GALLERY_HOST:GALLERY_PORT with the configured S3 and Redis."""
    import uvicorn

    from gallery.app import create_app

    settings = _require_services(_load_settings())
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        # The app logs each request itself, with its id and duration.
        access_log=False,
    )


@main.command()
@click.option(
    "--check",
    is_flag=True,
    help="Exit with 0 when a worker has reported itself healthy in the last 30 s, else 1.",
)
def worker(check: bool) -> None:
    """Run one arq worker: it verifies uploads, makes thumbnails and purges abandoned uploads."""
    from arq.connections import RedisSettings
    from arq.worker import async_check_health

    from worker.settings import make_worker

    settings = _require_services(_load_settings())
    if check:
        sys.exit(asyncio.run(async_check_health(RedisSettings.from_dsn(settings.redis_url))))
    make_worker(settings).run()


@main.command("init-bucket")
def init_bucket() -> None:
    """Create the bucket if it is missing and set its access block, CORS and lifecycle rules."""
    from gallery.storage import Storage

    settings = _require_services(_load_settings())

    async def run() -> None:
        async with Storage.open(settings) as store:
            await store.ensure_bucket([settings.app_url])

    asyncio.run(run())
    click.echo(f"bucket {settings.s3_bucket} is ready for uploads from {settings.app_url}")


@main.command()
def doctor() -> None:
    """Check that the bucket is private and enforces upload forms; exit 1 if a check fails.

    A WARN line reports a gap that the gallery covers another way and does not fail.

    Sends requests to GALLERY_S3_PUBLIC_ENDPOINT_URL as a browser would, so run it where that
    address is reachable. Objects it writes under doctor/ are deleted afterwards.
    """
    from gallery.doctor import run_checks

    settings = _require_services(_load_settings())
    results = asyncio.run(run_checks(settings))
    for result in results:
        click.echo(result.line())
    if any(result.failed for result in results):
        sys.exit(1)


@main.command()
def dev() -> None:
    """Run everything on this machine: S3, Redis, the web app and one worker (Ctrl-C stops)."""
    from gallery.dev import run_dev
    from gallery.embedded import EmbeddedServerError

    try:
        run_dev(_load_settings())
    except (SettingsError, EmbeddedServerError) as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        logger.info("stopped")


def _require_services(settings: Settings) -> Settings:
    try:
        return settings.require_services()
    except SettingsError as error:
        raise click.ClickException(f"{error}; see .env.example, or run `gallery dev`") from None


if __name__ == "__main__":
    sys.exit(main())
