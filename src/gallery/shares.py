"""Share links in Redis: one record per link, its images, and the hash of its token.

A link's token is shown to its owner once and never stored: Redis keeps its SHA-256 hash,
which maps to the share's id until the link expires or is revoked. So a token that never
existed, an expired one and a revoked one are all looked up the same way and all miss.

Keys, all under the `gallery:` prefix:
- `share:<share id>`, a hash: the record.
- `share-images:<share id>`, a sorted set of image ids, all scored 0, so the ids, which
  sort by creation time, list newest first when read in reverse lexical order.
- `share-token:<token hash>`, the share id, with a Redis expiry at the link's expiry.
- `user-shares:<user id>`, every share of a user until it is purged, scored by creation.
- `user-active-shares:<user id>`, the user's links that can still be opened, scored by
  their expiry, for the cap on active links.
- `image-shares:<image id>`, the set of shares holding an image, to remove it from them.
- `shares-ended`, every share scored by the time it ends (its expiry, or when it was
  revoked), for the purge.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import asdict, dataclass, fields

from redis.asyncio import Redis

from gallery.index import PREFIX

# A token of 32 random bytes (256 bits), sent as 43 URL-safe base64 characters.
TOKEN_BYTES = 32

HOUR = 3600
DAY = 24 * HOUR
MIN_EXPIRY_SECONDS = HOUR
MAX_EXPIRY_SECONDS = 30 * DAY
DEFAULT_EXPIRY_SECONDS = 7 * DAY

# The images one link may hold. The grid sends the selection in a GET query string, and
# 100 ids keep it near 3 KB, well under the request line limits of servers and proxies.
MAX_IMAGES = 100
MAX_TITLE_LENGTH = 100

ENDED_KEY = f"{PREFIX}:shares-ended"


class TooManyActiveShares(Exception):
    """The user already has the maximum number of active share links."""


@dataclass
class Share:
    """One share link: whose images, under which title, until when, and how often opened."""

    id: str
    user_id: str
    title: str
    # The owner's username when they chose to show it on the shared page, otherwise "".
    owner_name: str
    allow_originals: bool
    created_at: float
    # Unix time in whole seconds, because Redis's EXPIREAT takes whole seconds.
    expires_at: int
    token_hash: str
    revoked_at: float = 0.0
    views: int = 0
    last_view_at: float = 0.0

    def is_open(self, now: float) -> bool:
        """Return whether the link still opens: neither revoked nor expired at `now`."""
        return not self.revoked_at and now < self.expires_at


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _record_key(share_id: str) -> str:
    return f"{PREFIX}:share:{share_id}"


def _images_key(share_id: str) -> str:
    return f"{PREFIX}:share-images:{share_id}"


def _token_key(token_hash: str) -> str:
    return f"{PREFIX}:share-token:{token_hash}"


def _user_key(user_id: str) -> str:
    return f"{PREFIX}:user-shares:{user_id}"


def _user_active_key(user_id: str) -> str:
    return f"{PREFIX}:user-active-shares:{user_id}"


def _image_shares_key(image_id: str) -> str:
    return f"{PREFIX}:image-shares:{image_id}"


# The cap check and every write happen in one step, so parallel requests cannot pass it.
# KEYS: record, images, token, user shares, user active shares, ended, then one
# image-shares key per image. ARGV: cap, now, share id, expires_at, the number of record
# field names and values, those names and values, then the image ids.
_CREATE = """
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[1]) then return 0 end
local field_count = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], unpack(ARGV, 6, 5 + field_count))
for i = 6 + field_count, #ARGV do
  redis.call('ZADD', KEYS[2], 0, ARGV[i])
  redis.call('SADD', KEYS[i - field_count + 1], ARGV[3])
end
redis.call('SET', KEYS[3], ARGV[3], 'EXAT', ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[3])
redis.call('ZADD', KEYS[6], ARGV[4], ARGV[3])
return 1
"""

# A view of a link purged a moment ago must not leave a partial record behind.
_RECORD_VIEW = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'views', 1)
redis.call('HSET', KEYS[1], 'last_view_at', ARGV[1])
return 1
"""

# Only a link that still opens can be extended. KEYS: record, token, user active shares,
# ended. ARGV: now, seconds to add, the latest expiry allowed, share id. Returns the new
# expiry, or 0.
_EXTEND = """
local state = redis.call('HMGET', KEYS[1], 'revoked_at', 'expires_at')
if not state[2] or tonumber(state[1]) ~= 0 or tonumber(state[2]) <= tonumber(ARGV[1]) then
  return 0
end
local expires_at = math.min(tonumber(state[2]) + tonumber(ARGV[2]), tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'expires_at', expires_at)
redis.call('EXPIREAT', KEYS[2], expires_at)
redis.call('ZADD', KEYS[3], expires_at, ARGV[4])
redis.call('ZADD', KEYS[4], expires_at, ARGV[4])
return expires_at
"""


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def _encode(share: Share) -> dict[str, str]:
    values = asdict(share)
    values["allow_originals"] = "1" if share.allow_originals else "0"
    return {name: str(value) for name, value in values.items()}


def _decode(raw: dict[bytes, bytes]) -> Share | None:
    if not raw:
        return None
    values = {key.decode(): value.decode() for key, value in raw.items()}
    parsed: dict[str, object] = {}
    for field in fields(Share):
        value = values.get(field.name)
        if value is None:
            continue
        if field.type == "int":
            parsed[field.name] = int(value)
        elif field.type == "float":
            parsed[field.name] = float(value)
        elif field.type == "bool":
            parsed[field.name] = value == "1"
        else:
            parsed[field.name] = value
    return Share(**parsed)


async def create_share(
    redis: Redis,
    *,
    user_id: str,
    image_ids: list[str],
    title: str,
    expires_in: int,
    allow_originals: bool,
    owner_name: str,
    max_active: int,
) -> tuple[Share, str]:
    """Record a share link of these images; return the share and its token.

    The caller has checked that the images are the user's and ready. Raises
    TooManyActiveShares when the user already has `max_active` links that still open.
    """
    now = time.time()
    token = new_token()
    share = Share(
        id=secrets.token_hex(8),
        user_id=user_id,
        title=title,
        owner_name=owner_name,
        allow_originals=allow_originals,
        created_at=now,
        expires_at=int(now) + expires_in,
        token_hash=hash_token(token),
    )
    flat = [item for pair in _encode(share).items() for item in pair]
    keys = [
        _record_key(share.id),
        _images_key(share.id),
        _token_key(share.token_hash),
        _user_key(user_id),
        _user_active_key(user_id),
        ENDED_KEY,
        *(_image_shares_key(image_id) for image_id in image_ids),
    ]
    args = [max_active, now, share.id, share.expires_at, len(flat), *flat, *image_ids]
    if not await redis.eval(_CREATE, len(keys), *keys, *args):
        raise TooManyActiveShares(user_id)
    return share, token


async def get_share(redis: Redis, share_id: str) -> Share | None:
    return _decode(await redis.hgetall(_record_key(share_id)))


async def get_owned_share(redis: Redis, user_id: str, share_id: str) -> Share | None:
    """Return the share when it belongs to this user, otherwise None."""
    share = await get_share(redis, share_id)
    if share is None or share.user_id != user_id:
        return None
    return share


async def find_open_share(redis: Redis, token: str) -> Share | None:
    """Return the share a token opens, or None for an unknown, expired or revoked token.

    An unknown, an expired and a revoked token each cost one hash and one GET that finds
    nothing, because revoking deletes the token's key and Redis expires it with the link.
    """
    share_id = await redis.get(_token_key(hash_token(token)))
    if share_id is None:
        return None
    share = await get_share(redis, share_id.decode())
    # The key outlives the link by less than a second, because EXPIREAT takes whole seconds.
    if share is None or not share.is_open(time.time()):
        return None
    return share


async def list_image_ids(redis: Redis, share_id: str) -> list[str]:
    """Return the ids of a share's images, newest first, as the grid orders them."""
    ids = await redis.zrange(_images_key(share_id), "+", "-", desc=True, bylex=True)
    return [raw.decode() for raw in ids]


async def has_image(redis: Redis, share_id: str, image_id: str) -> bool:
    return await redis.zscore(_images_key(share_id), image_id) is not None


async def list_user_shares(redis: Redis, user_id: str) -> list[Share]:
    """Return a user's shares, newest first, including ended ones not yet purged."""
    ids = await redis.zrange(_user_key(user_id), 0, -1, desc=True)
    async with redis.pipeline(transaction=False) as pipe:
        for share_id in ids:
            pipe.hgetall(_record_key(share_id.decode()))
        records = await pipe.execute()
    return [share for raw in records if (share := _decode(raw)) is not None]


async def count_open_shares(redis: Redis, user_id: str) -> int:
    return await redis.zcount(_user_active_key(user_id), f"({time.time()}", "+inf")


async def record_view(redis: Redis, share: Share) -> None:
    await redis.eval(_RECORD_VIEW, 1, _record_key(share.id), time.time())


async def revoke(redis: Redis, share: Share) -> None:
    """Stop the link opening at once; the purge removes the record within a minute or so."""
    now = time.time()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(_record_key(share.id), "revoked_at", now)
        pipe.delete(_token_key(share.token_hash))
        pipe.zrem(_user_active_key(share.user_id), share.id)
        pipe.zadd(ENDED_KEY, {share.id: now})
        await pipe.execute()
    share.revoked_at = now


async def extend(redis: Redis, share: Share, seconds: int) -> int | None:
    """Move a link's expiry `seconds` later, but at most MAX_EXPIRY_SECONDS from now.

    Returns the new expiry, or None when the link was revoked or had expired.
    """
    now = int(time.time())
    keys = (
        _record_key(share.id),
        _token_key(share.token_hash),
        _user_active_key(share.user_id),
        ENDED_KEY,
    )
    args = (now, seconds, now + MAX_EXPIRY_SECONDS, share.id)
    expires_at = await redis.eval(_EXTEND, len(keys), *keys, *args)
    if not expires_at:
        return None
    share.expires_at = int(expires_at)
    return share.expires_at


async def remove_image(redis: Redis, image_id: str) -> int:
    """Remove an image from every share that contains it; return how many contained it."""
    share_ids = await redis.smembers(_image_shares_key(image_id))
    async with redis.pipeline(transaction=True) as pipe:
        for share_id in share_ids:
            pipe.zrem(_images_key(share_id.decode()), image_id)
        pipe.delete(_image_shares_key(image_id))
        await pipe.execute()
    return len(share_ids)


async def purge_ended(redis: Redis, now: float, *, limit: int = 1000) -> int:
    """Delete shares that expired or were revoked before `now`; return how many."""
    ids = await redis.zrangebyscore(ENDED_KEY, "-inf", now, start=0, num=limit)
    for raw in ids:
        await _delete_share(redis, raw.decode())
    return len(ids)


async def delete_user_shares(redis: Redis, user_id: str) -> int:
    """Delete every share of a user, open or ended, with its token; return how many."""
    share_ids = [raw.decode() for raw in await redis.zrange(_user_key(user_id), 0, -1)]
    for share_id in share_ids:
        await _delete_share(redis, share_id)
    await redis.delete(_user_key(user_id), _user_active_key(user_id))
    return len(share_ids)


async def _delete_share(redis: Redis, share_id: str) -> None:
    """Delete a share's record, images, token and index entries."""
    share = await get_share(redis, share_id)
    image_ids = await list_image_ids(redis, share_id)
    async with redis.pipeline(transaction=True) as pipe:
        for image_id in image_ids:
            pipe.srem(_image_shares_key(image_id), share_id)
        pipe.delete(_record_key(share_id), _images_key(share_id))
        if share is not None:
            pipe.delete(_token_key(share.token_hash))
            pipe.zrem(_user_key(share.user_id), share_id)
            pipe.zrem(_user_active_key(share.user_id), share_id)
        pipe.zrem(ENDED_KEY, share_id)
        await pipe.execute()
