"""The Redis index of uploads and images: one record per upload and one grid per user.

Pages are rendered from this index alone, never from a bucket listing. Every record also
exists as objects and metadata in the bucket, so the index can be rebuilt from there.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, fields
from enum import StrEnum

from redis.asyncio import Redis

PREFIX = "gallery"


class State(StrEnum):
    """The stage an upload has reached.

    issued -> uploaded -> verifying -> ready or rejected. The sweep also moves an issued
    upload to uploaded when its file arrived but the browser never reported it, and deletes
    one whose file never arrived.
    """

    ISSUED = "issued"  # a form was signed; the browser may be posting the file
    UPLOADED = "uploaded"  # the file was reported or found in S3; verification is queued
    VERIFYING = "verifying"  # a worker is checking the file and making the renditions
    READY = "ready"
    REJECTED = "rejected"
    TRASHED = "trashed"  # deleted from the grid; restorable until the trash is purged


# The states in which a worker still owes the upload some work.
PROCESSING_STATES = (State.ISSUED, State.UPLOADED, State.VERIFYING)

# How long an upload may stay uploaded or verifying before the sweep looks at it again.
SWEEP_AFTER_SECONDS = 60


@dataclass
class Upload:
    """One upload, from its signed form to a ready or rejected image."""

    id: str
    user_id: str
    filename: str
    content_type: str
    max_bytes: int
    state: State
    created_at: float
    form_expires_at: float
    reason: str = ""
    width: int = 0
    height: int = 0
    size: int = 0
    # A data URI of a tiny preview, shown until the thumbnail has loaded.
    placeholder: str = ""
    # The Unix time of the last change of state.
    updated_at: float = 0.0
    # Runs of the verify job that started and have not ended: a worker killed mid-job, or
    # a job over its timeout. A run that ends with a service error takes its count back.
    attempts: int = 0
    # When the owner moved the image to the trash, as a Unix time; 0 when it is not there.
    trashed_at: float = 0.0
    # When the photo was taken, as "YYYY-MM-DD HH:MM" from its EXIF; "" when unknown.
    taken_at: str = ""

    @property
    def is_processing(self) -> bool:
        return self.state in PROCESSING_STATES


def _record_key(upload_id: str) -> str:
    return f"{PREFIX}:upload:{upload_id}"


def _grid_key(user_id: str) -> str:
    return f"{PREFIX}:grid:{user_id}"


def _trash_key(user_id: str) -> str:
    """Return the key of a user's trash: a sorted set of image ids scored by trashed_at."""
    return f"{PREFIX}:trash:{user_id}"


# Unfinished uploads, scored by when the sweep should next look at them: an issued upload
# when its form expires, an uploaded or verifying one SWEEP_AFTER_SECONDS after it got there.
PENDING_KEY = f"{PREFIX}:pending"

# Every user's trashed images, scored by trashed_at, so one purge finds the expired ones.
TRASHED_KEY = f"{PREFIX}:trashed"


def _user_pending_key(user_id: str) -> str:
    """Return the key of a user's uploads that are not ready or rejected yet.

    A sorted set: an issued upload is scored by its form's expiry time, so an unused form
    stops counting when it expires, and an uploaded one by +inf until its job finishes.
    """
    return f"{PREFIX}:user-pending:{user_id}"


def _user_rejected_key(user_id: str) -> str:
    """Return the key of a user's rejected uploads, which stay in the grid until dismissed.

    A set of upload ids. NOTE: uploads rejected before this set existed are missing from
    it, so the grid's ready count includes them until they are dismissed.
    """
    return f"{PREFIX}:user-rejected:{user_id}"


class TooManyPendingUploads(Exception):
    """The user already has the maximum number of uploads waiting to be verified."""


# Lua scripts run atomically in Redis, so two requests or jobs cannot both make a move.
_MARK_UPLOADED = """
if redis.call('HGET', KEYS[1], 'state') ~= 'issued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'uploaded', 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('ZADD', KEYS[3], '+inf', ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
return 1
"""

# Returns the new attempt count, or 0 when the upload is not waiting for a worker or is
# being deleted.
_MARK_VERIFYING = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'uploaded' and state ~= 'verifying' then return 0 end
if redis.call('HEXISTS', KEYS[1], 'deleting') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'verifying', 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
"""

# The cap check and the insert happen in one step, so parallel requests cannot pass it.
_CREATE = """
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[4])
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return 1
"""

# Returns the record's final state. A record deleted by its owner while a job ran must not
# come back, so then it returns an empty string. The first run to finish an upload wins, so
# a second run of the same job cannot change a ready image into a rejected one.
_FINISH = """
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local state = redis.call('HGET', KEYS[1], 'state')
if not state or redis.call('HEXISTS', KEYS[1], 'deleting') == 1 then return '' end
if state == 'ready' or state == 'rejected' then return state end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
state = redis.call('HGET', KEYS[1], 'state')
if state == 'rejected' then redis.call('SADD', KEYS[4], ARGV[1]) end
return state
"""


# Restores a lost record unless one exists; an unfinished one also goes back in the pending
# sets, so the sweep finds it.
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], 0, ARGV[1])
if ARGV[2] ~= 'ready' then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
  redis.call('ZADD', KEYS[4], '+inf', ARGV[1])
end
return 1
"""

# Only a ready image goes to the trash, and only a trashed one comes back, so a repeated
# or crossed request changes nothing.
_TRASH = """
if redis.call('HGET', KEYS[1], 'state') ~= 'ready' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'trashed', 'trashed_at', ARGV[2], 'updated_at', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
return 1
"""

_UNTRASH = """
if redis.call('HGET', KEYS[1], 'state') ~= 'trashed' then return 0 end
if redis.call('HEXISTS', KEYS[1], 'deleting') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'ready', 'trashed_at', '0.0', 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""

# Marks a record as being deleted for good, when its state is one of ARGV. From then on it
# cannot be restored or finished, so its objects can be deleted without a check racing them.
_CLAIM_DELETE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
for _, allowed in ipairs(ARGV) do
  if state == allowed then
    redis.call('HSET', KEYS[1], 'deleting', '1')
    return 1
  end
end
return 0
"""


def new_upload_id() -> str:
    """Make an id that sorts by creation time: 12 hex digits of milliseconds, 16 random."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(8)}"


def _encode(upload: Upload) -> dict[str, str]:
    return {name: str(value) for name, value in asdict(upload).items()}


def _decode(raw: dict[bytes, bytes]) -> Upload | None:
    if not raw:
        return None
    values = {key.decode(): value.decode() for key, value in raw.items()}
    kinds = {field.name: field.type for field in fields(Upload)}
    parsed: dict[str, object] = {}
    for name, value in values.items():
        kind = kinds.get(name)
        if kind == "int":
            parsed[name] = int(value)
        elif kind == "float":
            parsed[name] = float(value)
        elif kind == "State":
            parsed[name] = State(value)
        elif kind is not None:
            parsed[name] = value
    return Upload(**parsed)


async def create_upload(
    redis: Redis,
    *,
    user_id: str,
    filename: str,
    content_type: str,
    max_bytes: int,
    form_seconds: int,
    max_pending: int,
) -> Upload:
    """Record an upload whose form is about to be signed.

    Raises TooManyPendingUploads when the user already has `max_pending` uploads that are
    neither ready nor rejected.
    """
    now = time.time()
    upload = Upload(
        id=new_upload_id(),
        user_id=user_id,
        filename=filename,
        content_type=content_type,
        max_bytes=max_bytes,
        state=State.ISSUED,
        created_at=now,
        form_expires_at=now + form_seconds,
        updated_at=now,
    )
    flat = [item for pair in _encode(upload).items() for item in pair]
    keys = (_record_key(upload.id), PENDING_KEY, _user_pending_key(user_id))
    args = (max_pending, upload.id, upload.form_expires_at, now, *flat)
    if not await redis.eval(_CREATE, len(keys), *keys, *args):
        raise TooManyPendingUploads(user_id)
    return upload


async def restore_upload(redis: Redis, upload: Upload) -> bool:
    """Write a record rebuilt from the bucket; False when the index already has one."""
    flat = [item for pair in _encode(upload).items() for item in pair]
    keys = (
        _record_key(upload.id),
        _grid_key(upload.user_id),
        PENDING_KEY,
        _user_pending_key(upload.user_id),
    )
    args = (upload.id, upload.state, upload.updated_at, *flat)
    return bool(await redis.eval(_RESTORE, len(keys), *keys, *args))


async def list_issued(redis: Redis, user_id: str) -> list[Upload]:
    """Return a user's issued uploads that still count against the pending cap.

    Their scores in the user's pending set are form expiry times; uploads on their way
    through a worker score +inf.
    """
    ids = await redis.zrange(_user_pending_key(user_id), "-inf", "(+inf", byscore=True)
    if not ids:
        return []
    uploads = await get_uploads(redis, [raw.decode() for raw in ids])
    return [upload for upload in uploads if upload.state == State.ISSUED]


async def get_upload(redis: Redis, upload_id: str) -> Upload | None:
    return _decode(await redis.hgetall(_record_key(upload_id)))


async def get_uploads(redis: Redis, upload_ids: list[str]) -> list[Upload]:
    """Return the records of these uploads in the same order, leaving out missing ones."""
    async with redis.pipeline(transaction=False) as pipe:
        for upload_id in upload_ids:
            pipe.hgetall(_record_key(upload_id))
        records = await pipe.execute()
    return [upload for raw in records if (upload := _decode(raw)) is not None]


async def get_owned_upload(redis: Redis, user_id: str, upload_id: str) -> Upload | None:
    """Return the upload when it belongs to this user, otherwise None."""
    upload = await get_upload(redis, upload_id)
    if upload is None or upload.user_id != user_id:
        return None
    return upload


async def mark_uploaded(redis: Redis, upload: Upload) -> bool:
    """Move an issued upload into its owner's grid; False when it had already moved on."""
    now = time.time()
    moved = await redis.eval(
        _MARK_UPLOADED,
        4,
        _record_key(upload.id),
        _grid_key(upload.user_id),
        _user_pending_key(upload.user_id),
        PENDING_KEY,
        upload.id,
        now,
        now + SWEEP_AFTER_SECONDS,
    )
    if moved:
        upload.state = State.UPLOADED
        upload.updated_at = now
    return bool(moved)


async def mark_verifying(redis: Redis, upload: Upload) -> int:
    """Move an uploaded upload to verifying and count the attempt.

    Returns the attempt count, or 0 when the upload is not waiting for a worker (it is
    still issued, already finished, or gone).
    """
    now = time.time()
    attempts = await redis.eval(
        _MARK_VERIFYING,
        2,
        _record_key(upload.id),
        PENDING_KEY,
        upload.id,
        now,
        now + SWEEP_AFTER_SECONDS,
    )
    if attempts:
        upload.state = State.VERIFYING
        upload.updated_at = now
        upload.attempts = int(attempts)
    return int(attempts)


async def end_attempt(redis: Redis, upload: Upload) -> None:
    """Take back the attempt of a run that ended without finishing the upload."""
    if upload.attempts > 0:
        await redis.hincrby(_record_key(upload.id), "attempts", -1)
        upload.attempts -= 1


async def postpone_sweep(
    redis: Redis, upload: Upload, seconds: float = SWEEP_AFTER_SECONDS
) -> None:
    """Have the sweep look at an unfinished upload again only after `seconds`."""
    await redis.zadd(PENDING_KEY, {upload.id: time.time() + seconds}, xx=True)


async def mark_ready(
    redis: Redis,
    upload: Upload,
    *,
    content_type: str,
    width: int,
    height: int,
    size: int,
    placeholder: str = "",
    taken_at: str = "",
) -> bool:
    """Mark an upload ready.

    Returns False when the image must not be shown: its owner deleted it while the job ran,
    or another run of the job rejected it first.
    """
    values = {
        "state": State.READY,
        "updated_at": str(time.time()),
        "content_type": content_type,
        "width": str(width),
        "height": str(height),
        "size": str(size),
        "placeholder": placeholder,
        "taken_at": taken_at,
        "reason": "",
    }
    return await _finish(redis, upload, values)


async def mark_rejected(redis: Redis, upload: Upload, reason: str) -> bool:
    """Mark an upload rejected; False when it was deleted or another run finished it first."""
    values = {"state": State.REJECTED, "reason": reason, "updated_at": str(time.time())}
    return await _finish(redis, upload, values)


async def _finish(redis: Redis, upload: Upload, values: dict[str, str]) -> bool:
    """Apply a final state, and return whether the record now has exactly that state."""
    flat = [item for pair in values.items() for item in pair]
    keys = (
        _record_key(upload.id),
        PENDING_KEY,
        _user_pending_key(upload.user_id),
        _user_rejected_key(upload.user_id),
    )
    final_state = await redis.eval(_FINISH, len(keys), *keys, upload.id, *flat)
    if isinstance(final_state, bytes):
        final_state = final_state.decode()
    return final_state == values["state"]


async def claim_delete(redis: Redis, upload: Upload) -> bool:
    """Mark an upload as being deleted for good; False when it is ready or gone.

    Any state but ready may be claimed: a ready image goes to the trash before it can be
    deleted. While claimed, a restore of the upload fails and a verify job that finishes it
    deletes what it stored instead. `release_delete` takes the claim back.
    """
    allowed = [state.value for state in State if state != State.READY]
    return bool(await redis.eval(_CLAIM_DELETE, 1, _record_key(upload.id), *allowed))


async def release_delete(redis: Redis, upload: Upload) -> None:
    """Take back a claim of `claim_delete` whose delete failed, so the upload can be restored."""
    await redis.hdel(_record_key(upload.id), "deleting")


async def delete_upload(redis: Redis, upload: Upload) -> bool:
    """Remove an upload's record, grid and trash entries; False when it was already gone."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(_record_key(upload.id))
        pipe.zrem(_grid_key(upload.user_id), upload.id)
        pipe.zrem(PENDING_KEY, upload.id)
        pipe.zrem(_user_pending_key(upload.user_id), upload.id)
        pipe.srem(_user_rejected_key(upload.user_id), upload.id)
        pipe.zrem(_trash_key(upload.user_id), upload.id)
        pipe.zrem(TRASHED_KEY, upload.id)
        deleted, *_ = await pipe.execute()
    return bool(deleted)


async def list_user_upload_ids(redis: Redis, user_id: str) -> list[str]:
    """Return the ids of all of a user's uploads: the grid, the trash and unfinished ones."""
    async with redis.pipeline(transaction=False) as pipe:
        for key in (_grid_key(user_id), _trash_key(user_id), _user_pending_key(user_id)):
            pipe.zrange(key, 0, -1)
        replies = await pipe.execute()
    return sorted({raw.decode() for reply in replies for raw in reply})


async def delete_user_uploads(redis: Redis, user_id: str, *, batch_size: int = 500) -> int:
    """Delete the records of all of a user's uploads and the user's sets; return how many.

    Besides the grid, the trash and the user's unfinished uploads, this deletes issued
    uploads whose form expired, which only the sweep's pending set still lists. Otherwise
    the sweep could turn a file posted late with such a form into an image of a deleted user.
    """
    pending_ids = [raw.decode() for raw in await redis.zrange(PENDING_KEY, 0, -1)]
    owners = await processing_owners(redis, pending_ids)
    own_pending = {
        upload_id for upload_id, owner in zip(pending_ids, owners, strict=True) if owner == user_id
    }
    upload_ids = sorted(own_pending.union(await list_user_upload_ids(redis, user_id)))
    user_sets = (_grid_key(user_id), _trash_key(user_id), _user_pending_key(user_id))
    for start in range(0, len(upload_ids), batch_size):
        batch = upload_ids[start : start + batch_size]
        async with redis.pipeline(transaction=True) as pipe:
            pipe.delete(*(_record_key(upload_id) for upload_id in batch))
            for key in (PENDING_KEY, TRASHED_KEY, *user_sets):
                pipe.zrem(key, *batch)
            await pipe.execute()
    # The rejected uploads are in the grid, so only their set itself is left.
    await redis.delete(*user_sets, _user_rejected_key(user_id))
    return len(upload_ids)


async def trash_upload(redis: Redis, upload: Upload, *, now: float | None = None) -> bool:
    """Move a ready image from its owner's grid to the trash; False when it was not ready."""
    trashed_at = time.time() if now is None else now
    keys = (
        _record_key(upload.id),
        _grid_key(upload.user_id),
        _trash_key(upload.user_id),
        TRASHED_KEY,
    )
    moved = await redis.eval(_TRASH, len(keys), *keys, upload.id, repr(trashed_at))
    if moved:
        upload.state, upload.trashed_at = State.TRASHED, trashed_at
    return bool(moved)


async def untrash_upload(redis: Redis, upload: Upload) -> bool:
    """Move a trashed image back into its owner's grid; False when it was not in the trash."""
    keys = (
        _record_key(upload.id),
        _grid_key(upload.user_id),
        _trash_key(upload.user_id),
        TRASHED_KEY,
    )
    moved = await redis.eval(_UNTRASH, len(keys), *keys, upload.id, repr(time.time()))
    if moved:
        upload.state, upload.trashed_at = State.READY, 0.0
    return bool(moved)


async def list_trash(redis: Redis, user_id: str, *, limit: int) -> list[Upload]:
    """Return up to `limit` of a user's trashed images, the most recently trashed first."""
    ids = await redis.zrange(_trash_key(user_id), 0, limit - 1, desc=True)
    return await get_uploads(redis, [raw.decode() for raw in ids])


async def count_trash(redis: Redis, user_id: str) -> int:
    return await redis.zcard(_trash_key(user_id))


async def expired_trash(redis: Redis, cutoff: float, *, limit: int = 1000) -> list[Upload]:
    """Return trashed images of every user that went to the trash before the cutoff.

    Ids whose record is gone are dropped from the set on the way.
    """
    return await _uploads_scored_up_to(redis, TRASHED_KEY, cutoff, limit)


async def list_grid(
    redis: Redis, user_id: str, *, before: str | None, limit: int
) -> tuple[list[Upload], str | None]:
    """Return one page of a user's grid, newest first, and the cursor of the next page.

    Keyset paging on the time-ordered ids: the cursor is the last id shown, so a page
    costs the same at any depth and new uploads do not shift later pages.
    """
    start = f"({before}" if before else "+"
    ids = await redis.zrange(
        _grid_key(user_id), start, "-", desc=True, bylex=True, offset=0, num=limit + 1
    )
    page_ids = [raw.decode() for raw in ids[:limit]]
    uploads = await get_uploads(redis, page_ids)
    next_cursor = page_ids[-1] if len(ids) > limit else None
    return uploads, next_cursor


async def count_grid(redis: Redis, user_id: str) -> int:
    return await redis.zcard(_grid_key(user_id))


@dataclass(frozen=True)
class ImageCounts:
    """A user's grid tiles, those of them still processing and rejected, and the trash."""

    tiles: int
    processing: int
    rejected: int
    trashed: int

    @property
    def ready(self) -> int:
        return max(self.tiles - self.processing - self.rejected, 0)


async def count_images(redis: Redis, user_id: str) -> ImageCounts:
    """Count a user's grid tiles by state and the trash, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(_grid_key(user_id))
        # Issued uploads are scored by their form's expiry, and those in the grid by +inf.
        pipe.zcount(_user_pending_key(user_id), "+inf", "+inf")
        pipe.scard(_user_rejected_key(user_id))
        pipe.zcard(_trash_key(user_id))
        tiles, processing, rejected, trashed = await pipe.execute()
    return ImageCounts(tiles=tiles, processing=processing, rejected=rejected, trashed=trashed)


async def due_uploads(redis: Redis, now: float, *, limit: int = 1000) -> list[Upload]:
    """Return unfinished uploads that the sweep should look at by `now`, oldest due first."""
    return await _uploads_scored_up_to(redis, PENDING_KEY, now, limit)


async def _uploads_scored_up_to(redis: Redis, key: str, score: float, limit: int) -> list[Upload]:
    """Return the records of a sorted set's ids scored up to `score`, lowest first.

    Reads the records in one round trip and removes ids whose record is gone from the set.
    """
    ids = [raw.decode() for raw in await redis.zrangebyscore(key, "-inf", score, 0, limit)]
    async with redis.pipeline(transaction=False) as pipe:
        for upload_id in ids:
            pipe.hgetall(_record_key(upload_id))
        records = await pipe.execute()
    uploads = []
    gone = []
    for upload_id, raw in zip(ids, records, strict=True):
        upload = _decode(raw)
        if upload is None:
            gone.append(upload_id)
        else:
            uploads.append(upload)
    if gone:
        await redis.zrem(key, *gone)
    return uploads


async def processing_owners(redis: Redis, upload_ids: list[str]) -> list[str | None]:
    """Return the owner of each upload that still waits for a worker, else None, in order."""
    async with redis.pipeline(transaction=False) as pipe:
        for upload_id in upload_ids:
            pipe.hmget(_record_key(upload_id), "user_id", "state")
        rows = await pipe.execute()
    owners: list[str | None] = []
    for user_id, state in rows:
        waiting = user_id is not None and state is not None and state.decode() in PROCESSING_STATES
        owners.append(user_id.decode() if waiting else None)
    return owners


async def grid_neighbours(
    redis: Redis, user_id: str, image_id: str
) -> tuple[str | None, str | None]:
    """Return the ids next to an image in its owner's grid: the newer one, then the older one.

    Either is None at the grid's end. The image need not be in the grid itself.
    """
    newer = await redis.zrange(_grid_key(user_id), f"({image_id}", "+", bylex=True, offset=0, num=1)
    older = await redis.zrange(
        _grid_key(user_id), f"({image_id}", "-", desc=True, bylex=True, offset=0, num=1
    )
    return (newer[0].decode() if newer else None, older[0].decode() if older else None)


async def set_type_and_name(
    redis: Redis, upload: Upload, *, content_type: str, filename: str
) -> None:
    """Record the type and name of a file posted without either pinned in its form."""
    await redis.hset(
        _record_key(upload.id), mapping={"content_type": content_type, "filename": filename}
    )
    upload.content_type, upload.filename = content_type, filename
