"""The `gallery` command: run the web app or a worker, set up the bucket, and administer users."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

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
    """Run the gallery: a self-hosted, multi-user private image gallery.

    Every command reads its settings from GALLERY_* and AWS_* environment variables,
    listed with their defaults and units in .env.example, and stops with the variable's
    name when one is invalid.
    """
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
        # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default; the app decides instead,
        # from GALLERY_TRUSTED_PROXIES.
        proxy_headers=False,
    )


@main.command()
@click.option(
    "--check",
    is_flag=True,
    help="Exit with 0 when a worker on this host, found by its hostname, wrote its heartbeat "
    "to Redis in the last 31 seconds, else with 1. In a container that is the container's "
    "own worker. Workers on other hosts do not count.",
)
def worker(check: bool) -> None:
    """Run one arq worker: it verifies uploads, makes thumbnails and purges abandoned uploads."""
    from worker.settings import make_worker

    settings = _require_services(_load_settings())
    if check:
        sys.exit(asyncio.run(_check_worker_on_this_host(settings)))
    make_worker(settings).run()


async def _check_worker_on_this_host(settings: Settings) -> int:
    from redis.exceptions import RedisError

    from gallery.health import host_heartbeat_key
    from worker.settings import WorkerSettings

    hostname = socket.gethostname()
    try:
        async with _redis(settings) as redis:
            heartbeat = await redis.get(host_heartbeat_key(hostname))
    except (RedisError, OSError) as error:
        click.echo(f"unhealthy: reading the heartbeat from Redis failed: {error!r}", err=True)
        return 1
    if heartbeat is None:
        seconds = WorkerSettings.health_check_interval + 1
        click.echo(
            f"unhealthy: no worker on host {hostname} wrote its heartbeat in the last "
            f"{seconds} seconds",
            err=True,
        )
        return 1
    click.echo(f"healthy: {heartbeat.decode()}")
    return 0


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
@click.option(
    "--dry-run",
    is_flag=True,
    help="List what would be purged, verified or queued again, and change nothing.",
)
@click.option(
    "--grace-seconds",
    type=click.IntRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Purge uploads whose form expired at least this many seconds ago "
    "(default: GALLERY_PURGE_GRACE_SECONDS).",
)
def purge(dry_run: bool, grace_seconds: int | None) -> None:
    """Run one sweep now: purge abandoned uploads and stray files, move stuck ones on.

    Workers sweep every GALLERY_SWEEP_INTERVAL_SECONDS; run this by hand to see the
    backlog (--dry-run) or clear it at once. An upload whose file arrived unreported is
    verified, one whose verification job went missing is queued again, and one that
    failed too often is rejected.
    """
    from dataclasses import replace

    from worker.sweep import sweep

    settings = _require_services(_load_settings())
    if grace_seconds is not None:
        settings = replace(settings, purge_grace_seconds=grace_seconds)

    async def run() -> None:
        async with _services(settings) as (redis, store):
            ctx = {"redis": redis, "store": store, "settings": settings, "dry_run": dry_run}
            counts = await sweep(ctx)
        for action in counts.actions:
            click.echo(f"{'would ' if dry_run else ''}{action}")
        click.echo(
            f"{'would purge' if dry_run else 'purged'} {counts.purged} abandoned uploads and "
            f"{counts.stray} stray objects; {counts.promoted + counts.requeued} uploads "
            f"{'would be' if dry_run else 'were'} queued for verification and "
            f"{counts.failed} rejected"
        )

    asyncio.run(run())


@main.command()
def reindex() -> None:
    """Rebuild the Redis index from the bucket after Redis lost its data.

    Every original in the bucket without a record gets one again, with its file name,
    dates and dimensions from the object's metadata, in its owner's grid and quota, or in
    the trash if it was there. One whose renditions are incomplete is queued for a worker
    to finish. Existing records
    are left alone, so it is safe to run more than once. Accounts are not in the bucket:
    they come back only from Redis's own persistence.
    """
    from gallery.reindex import rebuild_index

    settings = _require_services(_load_settings())

    async def run() -> None:
        async with _services(settings) as (redis, store):
            counts = await rebuild_index(redis, store)
        click.echo(
            f"restored {counts.restored} images of {counts.users} users "
            f"({counts.queued} queued for a worker to finish, {counts.trashed} back in the "
            f"trash); {counts.already_indexed} were already indexed and {counts.skipped} skipped"
        )

    asyncio.run(run())


@main.command("create-user")
@click.argument("username")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from the first line of standard input instead of a prompt.",
)
def create_user(username: str, password_stdin: bool) -> None:
    """Create an account named USERNAME (3 to 32 letters, digits, dots, dashes, underscores).

    The password must have 10 to 256 characters. Without --password-stdin it is prompted
    for twice and not echoed.
    """
    from gallery import accounts

    settings = _require_services(_load_settings())
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)

    async def run() -> accounts.User:
        async with _redis(settings) as redis:
            return await accounts.create_user(redis, username, password)

    try:
        user = asyncio.run(run())
    except accounts.AccountError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"created user {user.username} with id {user.id}")


class ByteSize(click.ParamType):
    """A size in bytes, written as a number with an optional unit such as 500MB or 10GiB."""

    name = "SIZE"
    units: ClassVar[dict[str, int]] = {
        "": 1,
        "b": 1,
        "kb": 1000,
        "mb": 1000**2,
        "gb": 1000**3,
        "tb": 1000**4,
        "kib": 1024,
        "mib": 1024**2,
        "gib": 1024**3,
        "tib": 1024**4,
    }

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).lower() if match else ""
        if not match or unit not in self.units:
            self.fail(
                f"{value!r} is not a size: expected a number of bytes, optionally with "
                "KB, MB, GB, TB, KiB, MiB, GiB or TiB, such as 10GiB",
                param,
                ctx,
            )
        return int(float(match.group(1)) * self.units[unit])


@main.command("set-quota")
@click.argument("username")
@click.option(
    "--max-bytes",
    type=ByteSize(),
    default=None,
    help="Maximum total size of the user's originals and renditions, in bytes or with a "
    "unit (500MB, 10GiB); 0 means no limit.",
)
@click.option(
    "--max-images",
    type=click.IntRange(min=0),
    default=None,
    metavar="COUNT",
    help="Maximum number of images the user may store, as a count; 0 means no limit.",
)
@click.option(
    "--default",
    "use_default",
    is_flag=True,
    help="Drop the user's own limits, so GALLERY_QUOTA_BYTES and GALLERY_QUOTA_IMAGES apply.",
)
def set_quota(
    username: str, max_bytes: int | None, max_images: int | None, use_default: bool
) -> None:
    """Set the quota of USERNAME and print it with the usage.

    A limit that is not given keeps its current value; without options this only prints.
    Images already stored stay when a new limit is below the usage, and new upload forms are
    rejected until the usage is under it.
    """
    from gallery import accounts, quotas

    settings = _require_services(_load_settings())
    if use_default and (max_bytes is not None or max_images is not None):
        raise click.UsageError("--default cannot be combined with --max-bytes or --max-images")

    async def run() -> str:
        async with _redis(settings) as redis:
            user_id = await accounts.find_user_id(redis, username)
            if user_id is None:
                raise click.ClickException(f"no user named {username!r}")
            if use_default:
                await quotas.set_quota(redis, user_id, max_bytes=None, max_images=None)
            else:
                own_bytes, own_images = await quotas.get_own_limits(redis, user_id)
                await quotas.set_quota(
                    redis,
                    user_id,
                    max_bytes=own_bytes if max_bytes is None else max_bytes,
                    max_images=own_images if max_images is None else max_images,
                )
            quota = await quotas.get_quota(redis, user_id, settings)
            usage = await quotas.get_usage(redis, user_id)
            return f"{username}: {quotas.describe(quota, usage)}"

    click.echo(asyncio.run(run()))


@main.group()
def users() -> None:
    """List, disable, enable and delete accounts."""


@users.command("list")
def list_users() -> None:
    """List every account: name, creation time (UTC), images, bytes used, quota and status."""
    from gallery import user_admin

    settings = _require_services(_load_settings())

    async def run() -> list[user_admin.UserSummary]:
        async with _redis(settings) as redis:
            return await user_admin.list_users(redis, settings)

    rows = [_user_row(summary) for summary in asyncio.run(run())]
    header = ("NAME", "CREATED (UTC)", "IMAGES", "USED", "QUOTA", "STATUS")
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    for row in [header, *rows]:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _user_row(summary: Any) -> tuple[str, ...]:
    from gallery.quotas import format_bytes

    quota = summary.quota
    max_bytes = format_bytes(quota.max_bytes) if quota.max_bytes else "no size limit"
    max_images = f"{quota.max_images} images" if quota.max_images else "no image limit"
    status = f"disabled {_utc(summary.disabled_at)}" if summary.disabled_at else "enabled"
    return (
        summary.username,
        _utc(summary.created_at),
        str(summary.usage.images),
        format_bytes(summary.usage.bytes),
        f"{max_bytes}, {max_images}",
        status,
    )


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(timestamp))


@users.command()
@click.argument("username")
def disable(username: str) -> None:
    """Disable USERNAME: it cannot sign in, its sessions end and its share links stop opening.

    Its images, share links and quota are kept, and `gallery users enable` restores it.
    Image URLs that a shared page handed out before keep working until they expire, at
    most GALLERY_SHARE_URL_EXPIRY_SECONDS later.
    """
    from gallery import user_admin

    settings = _require_services(_load_settings())

    async def run() -> str:
        async with _redis(settings) as redis:
            user_id = await _find_user(redis, username)
            changed, ended = await user_admin.disable_user(redis, user_id)
        state = "disabled" if changed else "was already disabled"
        return f"{username} {state}; ended {ended} sessions"

    click.echo(asyncio.run(run()))


@users.command()
@click.argument("username")
def enable(username: str) -> None:
    """Enable USERNAME again: it can sign in, and its share links open until they expire."""
    from gallery import user_admin

    settings = _require_services(_load_settings())

    async def run() -> str:
        async with _redis(settings) as redis:
            user_id = await _find_user(redis, username)
            changed = await user_admin.enable_user(redis, user_id)
        return f"{username} {'enabled' if changed else 'was not disabled'}"

    click.echo(asyncio.run(run()))


@users.command()
@click.argument("username")
@click.option("--yes", is_flag=True, help="Delete without asking for confirmation first.")
def delete(username: str, yes: bool) -> None:
    """Delete USERNAME for good, with every image, share link, quota setting and session.

    The account is disabled first, and deleted last, after its objects in the bucket and
    its records in Redis. When the command is interrupted, run it again to finish.
    """
    from gallery import quotas, user_admin

    settings = _require_services(_load_settings())

    async def count_images() -> quotas.Usage:
        async with _redis(settings) as redis:
            return await quotas.get_usage(redis, await _find_user(redis, username))

    usage = asyncio.run(count_images())
    if not yes:
        click.confirm(
            f"Delete user {username} with {usage.images} images "
            f"({quotas.format_bytes(usage.bytes)}) for good?",
            abort=True,
        )

    async def run() -> user_admin.DeletedUser:
        async with _services(settings) as (redis, store):
            return await user_admin.delete_user(
                redis, store, await _find_user(redis, username), username
            )

    deleted = asyncio.run(run())
    click.echo(
        f"deleted user {username}: {deleted.uploads} uploads, {deleted.objects} objects, "
        f"{deleted.shares} share links and {deleted.sessions} sessions"
    )


async def _find_user(redis: Any, username: str) -> str:
    from gallery.user_admin import UnknownUser, find_user_id

    try:
        return await find_user_id(redis, username)
    except UnknownUser as error:
        raise click.ClickException(str(error)) from None


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


@asynccontextmanager
async def _redis(settings: Settings) -> AsyncIterator[Any]:
    from redis.asyncio import Redis

    client = Redis.from_url(settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def _services(settings: Settings) -> AsyncIterator[tuple[Any, Any]]:
    """Open a Redis client that can queue jobs, and the S3 storage."""
    from arq import create_pool
    from arq.connections import RedisSettings

    from gallery.storage import Storage

    redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        async with Storage.open(settings) as store:
            yield redis, store
    finally:
        await redis.aclose()


def _require_services(settings: Settings) -> Settings:
    try:
        return settings.require_services()
    except SettingsError as error:
        raise click.ClickException(f"{error}; see .env.example, or run `gallery dev`") from None


if __name__ == "__main__":
    sys.exit(main())
