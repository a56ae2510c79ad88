"""Rate limits kept in Redis: a counter per subject that lives for one window."""

from __future__ import annotations

from redis.asyncio import Redis

from gallery.index import PREFIX


def _key(name: str) -> str:
    return f"{PREFIX}:limit:{name}"


async def seconds_until_allowed(redis: Redis, name: str, limit: int) -> int:
    """Return 0 when `name` is under its limit, otherwise the seconds until its window ends."""
    count = await redis.get(_key(name))
    if count is None or int(count) < limit:
        return 0
    return max(await redis.ttl(_key(name)), 1)


async def record(redis: Redis, name: str, window_seconds: int) -> int:
    """Count one event for `name`; its window starts at its first event. Return the count."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(_key(name))
        pipe.expire(_key(name), window_seconds, nx=True)
        count, _ = await pipe.execute()
    return int(count)


async def reset(redis: Redis, name: str) -> None:
    await redis.delete(_key(name))
