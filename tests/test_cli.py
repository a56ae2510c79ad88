"""The `gallery` command: help for every option, and the admin commands on real services."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from dataclasses import replace

import click
import pytest
from click.testing import CliRunner

from gallery import accounts, index, quotas
from gallery.cli import ByteSize, main
from gallery.embedded import free_port
from gallery.health import WORKER_HEARTBEAT_KEY, host_heartbeat_key

SUBCOMMANDS = (
    "serve",
    "worker",
    "dev",
    "init-bucket",
    "doctor",
    "purge",
    "create-user",
    "set-quota",
    "reindex",
    "users",
)
# Words that name the unit of an option's value.
UNIT_WORDS = ("seconds", "bytes", "count", "characters", "standard input")


def test_help_lists_every_subcommand():
    result = CliRunner().invoke(main, ["--help"])

    assert result.exit_code == 0
    for subcommand in SUBCOMMANDS:
        assert re.search(rf"^\s+{subcommand}\s", result.output, re.MULTILINE), subcommand


def _command_paths(group: click.Group, parents: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Return the name path of every subcommand, with those of nested groups."""
    paths = []
    for name, command in sorted(group.commands.items()):
        paths.append((*parents, name))
        if isinstance(command, click.Group):
            paths += _command_paths(command, (*parents, name))
    return paths


def test_users_group_has_its_subcommands():
    assert {path[1] for path in _command_paths(main) if path[0] == "users" and len(path) > 1} == {
        "list",
        "disable",
        "enable",
        "delete",
    }


@pytest.mark.parametrize("path", _command_paths(main), ids=" ".join)
def test_subcommand_help_describes_every_option_with_unit(path):
    command = main
    for part in path:
        command = command.commands[part]
    name = " ".join(path)

    result = CliRunner().invoke(main, [*path, "--help"])

    assert result.exit_code == 0
    assert command.help, f"`gallery {name}` has no description"
    for option in command.params:
        if not isinstance(option, click.Option):
            continue
        assert option.help, f"`gallery {name} {option.opts[0]}` has no help"
        assert option.opts[0] in result.output
        if not option.is_flag:
            assert any(word in option.help for word in UNIT_WORDS), (
                f"`gallery {name} {option.opts[0]}` help names no unit: {option.help}"
            )


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("1500", 1500), ("500MB", 500_000_000), ("10GiB", 10 * 1024**3), ("1.5 KiB", 1536)],
)
def test_byte_size_accepts_units(text, size):
    assert ByteSize().convert(text, None, None) == size


def test_byte_size_rejects_unknown_unit():
    with pytest.raises(click.BadParameter, match="'10 parsecs' is not a size"):
        ByteSize().convert("10 parsecs", None, None)


def _run(settings, *args: str, stdin: str | None = None):
    return CliRunner().invoke(main, list(args), env=settings.to_env(), input=stdin)


def test_create_user_reads_password_from_stdin(settings):
    name = f"cli{time.time_ns() % 10**9}"

    result = _run(settings, "create-user", name, "--password-stdin", stdin="a long password\n")

    assert result.exit_code == 0, result.output
    user = asyncio.run(_authenticate(settings, name, "a long password"))
    assert user is not None
    assert f"created user {name} with id {user.id}" in result.output


def test_create_user_with_short_password_fails_with_message(settings):
    result = _run(settings, "create-user", "shortpw", "--password-stdin", stdin="short\n")

    assert result.exit_code == 1
    assert "Choose a password of 10 to 256 characters." in result.output


def test_set_quota_sets_then_restores_defaults(settings):
    name = f"quota{time.time_ns() % 10**9}"
    _run(settings, "create-user", name, "--password-stdin", stdin="a long password\n")

    limited = _run(settings, "set-quota", name, "--max-bytes", "10MiB", "--max-images", "5")
    only_images = _run(settings, "set-quota", name, "--max-images", "7")
    restored = _run(settings, "set-quota", name, "--default")

    assert limited.exit_code == 0, limited.output
    assert "You use 0 bytes of 10.0 MiB and 0 of 5 images." in limited.output
    assert "You use 0 bytes of 10.0 MiB and 0 of 7 images." in only_images.output
    assert f"of {quotas.format_bytes(settings.quota_bytes)}" in restored.output


def test_set_quota_of_unknown_user_fails(settings):
    result = _run(settings, "set-quota", "nobody-here", "--max-images", "1")

    assert result.exit_code == 1
    assert "no user named 'nobody-here'" in result.output


def test_purge_dry_run_lists_and_keeps_then_purge_deletes(settings, store):
    upload = asyncio.run(_abandoned_upload(settings, store))

    dry = _run(settings, "purge", "--dry-run", "--grace-seconds", "0")
    kept = asyncio.run(_record_exists(settings, upload.id))
    real = _run(settings, "purge", "--grace-seconds", "0")

    assert dry.exit_code == 0, dry.output
    assert f"would purge abandoned upload {upload.id} of user {upload.user_id}" in dry.output
    assert kept
    assert real.exit_code == 0, real.output
    assert f"\npurge abandoned upload {upload.id}" in "\n" + real.output
    assert not asyncio.run(_record_exists(settings, upload.id))


async def test_worker_check_passes_after_local_worker(settings, redis, run_worker):
    await redis.delete(host_heartbeat_key(socket.gethostname()))

    await run_worker()
    result = await asyncio.to_thread(_run, settings, "worker", "--check")

    assert result.exit_code == 0, result.output
    assert f"healthy: worker {os.getpid()} on {socket.gethostname()} at" in result.output


async def test_worker_check_ignores_workers_on_other_hosts(settings, redis):
    hostname = socket.gethostname()
    await redis.delete(host_heartbeat_key(hostname))
    # Workers elsewhere are alive: arq's shared key and another host's heartbeat are fresh.
    await redis.set(WORKER_HEARTBEAT_KEY, "another worker", px=31_000)
    await redis.set(host_heartbeat_key("other-host"), "worker 1 on other-host", px=31_000)

    try:
        result = await asyncio.to_thread(_run, settings, "worker", "--check")
    finally:
        await redis.delete(WORKER_HEARTBEAT_KEY, host_heartbeat_key("other-host"))

    assert result.exit_code == 1
    assert f"unhealthy: no worker on host {hostname} wrote its heartbeat" in result.output


def test_worker_check_without_redis_fails_with_message(settings):
    unreachable = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")

    result = _run(unreachable, "worker", "--check")

    assert result.exit_code == 1
    assert "unhealthy: reading the heartbeat from Redis failed: ConnectionError" in result.output


async def _authenticate(settings, name: str, password: str):
    from redis.asyncio import Redis

    redis = Redis.from_url(settings.redis_url)
    try:
        return await accounts.authenticate(redis, name, password)
    finally:
        await redis.aclose()


async def _record_exists(settings, upload_id: str) -> bool:
    from redis.asyncio import Redis

    redis = Redis.from_url(settings.redis_url)
    try:
        return await index.get_upload(redis, upload_id) is not None
    finally:
        await redis.aclose()


async def _abandoned_upload(settings, store) -> index.Upload:
    """Record an upload whose form expired an hour ago, with its file in the bucket."""
    from redis.asyncio import Redis

    redis = Redis.from_url(settings.redis_url)
    try:
        upload = await index.create_upload(
            redis,
            user_id="purge-cli",
            filename="gone.jpg",
            content_type="image/jpeg",
            max_bytes=10,
            form_seconds=60,
            max_pending=10**6,
        )
        await redis.hset(f"gallery:upload:{upload.id}", "form_expires_at", time.time() - 3600)
        await redis.zadd(index.PENDING_KEY, {upload.id: time.time() - 3600})
    finally:
        await redis.aclose()
    return upload
