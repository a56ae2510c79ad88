"""Rebuild the Redis index of images from the bucket, after Redis lost its data."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from urllib.parse import unquote

from arq.connections import ArqRedis

from gallery import index, jobs, quotas, storage
from gallery.index import State, Upload
from gallery.storage import Storage

logger = logging.getLogger(__name__)

# HEAD requests for original metadata in flight at once.
CONCURRENT_HEADS = 16


@dataclass
class ReindexCounts:
    """Counts of what a rebuild found and did."""

    users: int = 0
    restored: int = 0
    queued: int = 0
    already_indexed: int = 0
    skipped: int = 0
    # Of the restored images, those that were in the trash and went back there.
    trashed: int = 0


async def rebuild_index(redis: ArqRedis, store: Storage) -> ReindexCounts:
    """Restore a record and grid entry for every original in the bucket that has none.

    An original with its three renditions and its metadata comes back ready, with its file
    name, dates, size and dimensions, and counts towards its owner's quota again. One tagged
    as in the trash goes back to the trash, with the time it went there. One
    missing a rendition or metadata comes back uploaded, and its verify job is queued, so
    the worker makes what is missing from the original. Records that exist are left alone,
    so running it twice, or on an index that lost only part of its data, is safe.
    """
    counts = ReindexCounts()
    async for folder in store.list_folders(storage.IMAGES_PREFIX):
        user_id = folder.removeprefix(storage.IMAGES_PREFIX).rstrip("/")
        counts.users += 1
        await _rebuild_user(redis, store, user_id, counts)
    return counts


async def _rebuild_user(
    redis: ArqRedis, store: Storage, user_id: str, counts: ReindexCounts
) -> None:
    sizes = {key: size async for key, size in store.list_sizes(storage.user_folder(user_id))}
    originals = [key for key in sizes if key == storage.original_key(user_id, _image_id(key))]
    limit = asyncio.Semaphore(CONCURRENT_HEADS)

    async def restore(key: str) -> None:
        async with limit:
            await _restore_image(redis, store, user_id, _image_id(key), sizes, counts)

    await asyncio.gather(*(restore(key) for key in originals))


def _image_id(key: str) -> str:
    return key.rsplit("/", 1)[-1].removesuffix(".webp")


async def _restore_image(
    redis: ArqRedis,
    store: Storage,
    user_id: str,
    image_id: str,
    sizes: dict[str, int],
    counts: ReindexCounts,
) -> None:
    info = await store.head(storage.original_key(user_id, image_id))
    if info is None:
        # Deleted since the listing.
        return
    metadata = info.metadata
    if metadata.get("owner") != user_id:
        logger.warning("skipping %s: its owner metadata names another user", image_id)
        counts.skipped += 1
        return

    created_at = _number(metadata.get("created-at"), float) or time.time()
    width = _number(metadata.get("width"), int)
    height = _number(metadata.get("height"), int)
    renditions = storage.rendition_keys(user_id, image_id)
    complete = bool(width and height) and all(key in sizes for key in renditions)
    # NOTE: share links and user accounts are not in the bucket and do not come back.
    upload = Upload(
        id=image_id,
        user_id=user_id,
        filename=unquote(metadata.get("filename", "")) or image_id,
        content_type=info.content_type,
        max_bytes=info.size,
        state=State.READY if complete else State.UPLOADED,
        created_at=created_at,
        form_expires_at=created_at,
        width=width or 0,
        height=height or 0,
        size=info.size,
        placeholder=metadata.get("placeholder", ""),
        updated_at=time.time(),
    )
    if not await index.restore_upload(redis, upload):
        counts.already_indexed += 1
        return
    counts.restored += 1
    if complete:
        stored_bytes = info.size + sum(sizes[key] for key in renditions)
        await quotas.commit(redis, user_id, image_id, stored_bytes)
        trashed_at = await _trashed_at(store, storage.original_key(user_id, image_id))
        if trashed_at is not None:
            await index.trash_upload(redis, upload, now=trashed_at)
            counts.trashed += 1
    else:
        await jobs.enqueue_verify(redis, image_id)
        counts.queued += 1


async def _trashed_at(store: Storage, key: str) -> float | None:
    """Return the time the trash tag of an original gives, or None when it has none."""
    return _number((await store.object_tags(key)).get(storage.TRASHED_AT_TAG), float)


def _number(raw: str | None, kind: type[int | float]) -> int | float | None:
    try:
        return kind(raw) if raw else None
    except ValueError:
        return None
