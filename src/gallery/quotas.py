"""Per-user quotas of bytes and images, with usage counters and reservations in Redis.

Usage counts every stored image, its original and each rendition, until it is deleted
forever. An upload form reserves its file's size and one image while it is outstanding,
so parallel forms cannot together pass the quota. A reservation ends when its form
expires unused, or when the worker stores or rejects the upload. Every change is one Lua
script, so counters stay exact with many web and worker processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from gallery.index import PREFIX
from gallery.settings import Settings


def _usage_key(user_id: str) -> str:
    """Return the key of a user's totals: a hash with `bytes` and `images`."""
    return f"{PREFIX}:usage:{user_id}"


def _items_key(user_id: str) -> str:
    """Return the key of the bytes counted for each of a user's images, by image id."""
    return f"{PREFIX}:usage-items:{user_id}"


def _limits_key(user_id: str) -> str:
    """Return the key of a user's own limits, set by `gallery set-quota`."""
    return f"{PREFIX}:quota:{user_id}"


def _reserved_key(user_id: str) -> str:
    """Return the key of a user's reservations: upload ids scored by the form's expiry."""
    return f"{PREFIX}:reserved:{user_id}"


def _reserved_bytes_key(user_id: str) -> str:
    return f"{PREFIX}:reserved-bytes:{user_id}"


@dataclass(frozen=True)
class Quota:
    """A user's limits; 0 means no limit."""

    max_bytes: int
    max_images: int


@dataclass(frozen=True)
class Usage:
    """A user's stored bytes and images, and the amounts reserved by outstanding forms."""

    bytes: int
    images: int
    reserved_bytes: int = 0
    reserved_images: int = 0

    def space_left(self, quota: Quota) -> int | None:
        """Return the bytes a new upload may have, or None when there is no byte limit."""
        if not quota.max_bytes:
            return None
        return max(quota.max_bytes - self.bytes - self.reserved_bytes, 0)


class OverQuota(Exception):
    """A new upload would take a user past their quota."""

    def __init__(self, quota: Quota, usage: Usage) -> None:
        super().__init__(describe(quota, usage))
        self.quota = quota
        self.usage = usage


# Drops expired reservations, then sums the rest (a user has at most the pending-upload
# cap of them) and reserves when the new upload fits both limits.
_RESERVE = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[1])
for _, id in ipairs(expired) do redis.call('HDEL', KEYS[4], id) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[1])
local reserved_bytes = 0
for _, size in ipairs(redis.call('HVALS', KEYS[4])) do
  reserved_bytes = reserved_bytes + tonumber(size)
end
local reserved_images = redis.call('ZCARD', KEYS[3])
local used_bytes = tonumber(redis.call('HGET', KEYS[1], 'bytes') or '0')
local used_images = tonumber(redis.call('HGET', KEYS[1], 'images') or '0')
local max_bytes = tonumber(redis.call('HGET', KEYS[2], 'bytes') or ARGV[5])
local max_images = tonumber(redis.call('HGET', KEYS[2], 'images') or ARGV[6])
local size = tonumber(ARGV[4])
local fits = (max_bytes == 0 or used_bytes + reserved_bytes + size <= max_bytes)
  and (max_images == 0 or used_images + reserved_images + 1 <= max_images)
if fits then
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
  redis.call('HSET', KEYS[4], ARGV[3], size)
end
return {fits and 1 or 0, used_bytes, used_images, reserved_bytes, reserved_images,
        max_bytes, max_images}
"""

# Counts a stored image once, however often its job runs, and ends its reservation.
_COMMIT = """
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'bytes', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'images', 1)
return 1
"""

# Frees what an image counted, once, and any reservation of its upload.
_RELEASE = """
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
local size = redis.call('HGET', KEYS[2], ARGV[1])
if not size then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'bytes', -tonumber(size))
redis.call('HINCRBY', KEYS[1], 'images', -1)
return 1
"""


def _keys(user_id: str) -> tuple[str, str, str, str]:
    return (
        _usage_key(user_id),
        _items_key(user_id),
        _reserved_key(user_id),
        _reserved_bytes_key(user_id),
    )


async def get_quota(redis: Redis, user_id: str, settings: Settings) -> Quota:
    """Return a user's own limits, or the defaults from the settings for those not set."""
    return _quota_from(await redis.hgetall(_limits_key(user_id)), settings)


def _quota_from(own: dict[bytes, bytes], settings: Settings) -> Quota:
    return Quota(
        max_bytes=int(own.get(b"bytes", settings.quota_bytes)),
        max_images=int(own.get(b"images", settings.quota_images)),
    )


async def get_own_limits(redis: Redis, user_id: str) -> tuple[int | None, int | None]:
    """Return the byte and image limits set for this user, None where the default applies."""
    raw = await redis.hgetall(_limits_key(user_id))
    max_bytes, max_images = raw.get(b"bytes"), raw.get(b"images")
    return (
        None if max_bytes is None else int(max_bytes),
        None if max_images is None else int(max_images),
    )


async def set_quota(
    redis: Redis, user_id: str, *, max_bytes: int | None, max_images: int | None
) -> None:
    """Set a user's own limits; None goes back to the default for that limit."""
    key = _limits_key(user_id)
    for field, value in (("bytes", max_bytes), ("images", max_images)):
        if value is None:
            await redis.hdel(key, field)
        else:
            await redis.hset(key, field, value)


async def get_usage(redis: Redis, user_id: str) -> Usage:
    """Return a user's stored bytes and images, and the reservations of unexpired forms."""
    async with redis.pipeline(transaction=False) as pipe:
        _queue_usage(pipe, user_id)
        return _read_usage(await pipe.execute())


async def get_quota_and_usage(
    redis: Redis, user_id: str, settings: Settings
) -> tuple[Quota, Usage]:
    """Return a user's quota and usage in one round trip to Redis, for the upload page."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(_limits_key(user_id))
        _queue_usage(pipe, user_id)
        own, *usage = await pipe.execute()
    return _quota_from(own, settings), _read_usage(usage)


def _queue_usage(pipe: Any, user_id: str) -> None:
    pipe.hgetall(_usage_key(user_id))
    pipe.zrangebyscore(_reserved_key(user_id), time.time(), "+inf")
    pipe.hgetall(_reserved_bytes_key(user_id))


def _read_usage(replies: list[Any]) -> Usage:
    totals, live_ids, reserved = replies
    return Usage(
        bytes=int(totals.get(b"bytes", 0)),
        images=int(totals.get(b"images", 0)),
        reserved_bytes=sum(int(reserved.get(upload_id, 0)) for upload_id in live_ids),
        reserved_images=len(live_ids),
    )


async def reserve(
    redis: Redis, settings: Settings, user_id: str, upload_id: str, size: int, expires_at: float
) -> None:
    """Reserve `size` bytes and one image for an upload form until `expires_at`.

    Raises OverQuota, with the quota and the usage, when the upload does not fit.
    """
    args = (time.time(), expires_at, upload_id, size, settings.quota_bytes, settings.quota_images)
    keys = (_usage_key(user_id), _limits_key(user_id), *_keys(user_id)[2:])
    result = await redis.eval(_RESERVE, len(keys), *keys, *args)
    fits, used_bytes, used_images, reserved_bytes, reserved_images, max_bytes, max_images = (
        int(value) for value in result
    )
    if not fits:
        usage = Usage(used_bytes, used_images, reserved_bytes, reserved_images)
        raise OverQuota(Quota(max_bytes, max_images), usage)


async def hold(redis: Redis, user_id: str, upload_id: str) -> None:
    """Keep an upload's reservation past its form's expiry, until the worker finishes it."""
    await redis.zadd(_reserved_key(user_id), {upload_id: float("inf")}, xx=True)


async def commit(redis: Redis, user_id: str, image_id: str, stored_bytes: int) -> bool:
    """Count a stored image and end its reservation; False when it was counted before."""
    keys = _keys(user_id)
    return bool(await redis.eval(_COMMIT, len(keys), *keys, image_id, stored_bytes))


async def release(redis: Redis, user_id: str, image_id: str) -> bool:
    """Stop counting an image and end any reservation; False when nothing was counted."""
    keys = _keys(user_id)
    return bool(await redis.eval(_RELEASE, len(keys), *keys, image_id))


async def delete_user_counters(redis: Redis, user_id: str) -> None:
    """Delete a user's usage counters, reservations and own limits, for a deleted account."""
    await redis.delete(*_keys(user_id), _limits_key(user_id))


def format_bytes(size: int) -> str:
    """Return a size in bytes as people read it, in binary units (KiB, MiB, GiB, TiB)."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def describe(quota: Quota, usage: Usage, trashed: int = 0) -> str:
    """Return a sentence with the quota and the usage, for the upload page and errors.

    `trashed` is how many of the images are in the trash, which count until deleted forever.
    """
    parts = []
    if quota.max_bytes:
        parts.append(f"{format_bytes(usage.bytes)} of {format_bytes(quota.max_bytes)}")
    else:
        parts.append(f"{format_bytes(usage.bytes)} (no size limit)")
    if quota.max_images:
        parts.append(f"{usage.images} of {quota.max_images} images")
    else:
        parts.append(f"{usage.images} images (no image limit)")
    text = f"You use {parts[0]} and {parts[1]}"
    if usage.reserved_images:
        uploads = "upload" if usage.reserved_images == 1 else "uploads"
        text += (
            f", plus {usage.reserved_images} {uploads} in progress "
            f"({format_bytes(usage.reserved_bytes)})"
        )
    text += "."
    if trashed:
        text += f" That includes {trashed} {'image' if trashed == 1 else 'images'} in the trash."
    return text
