"""The worker's jobs: verify each upload and make its thumbnail; purge abandoned uploads."""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any
from urllib.parse import quote

from arq import Retry
from botocore.exceptions import BotoCoreError, ClientError

from gallery import index, jobs, quotas, storage
from gallery.imaging import ImageRejected, Renditions, make_renditions
from gallery.index import State, Upload

logger = logging.getLogger(__name__)

MAX_TRIES = 5

# Reasons shown on an upload's tile when its object is missing, changed or unreadable.
REASON_MISSING = "the file never arrived"
REASON_TOO_LARGE = "too large"
REASON_WRONG_TYPE = "type does not match"
REASON_WRONG_OWNER = "not uploaded with this account's form"
REASON_FAILED = "processing failed; upload it again"


async def verify_upload(ctx: dict[str, Any], upload_id: str) -> str:
    """Check one upload against its record and its bytes, then store it and its thumbnail.

    Safe to run twice: a finished upload is left alone, and a run that stopped after moving
    the original picks up from the original.
    """
    started = time.monotonic()
    redis, store = ctx["redis"], ctx["store"]
    upload = await index.get_upload(redis, upload_id)
    if upload is None or upload.state in (State.READY, State.REJECTED):
        return "skipped"

    try:
        outcome = await _verify(ctx, upload)
    except (ClientError, BotoCoreError, OSError) as error:
        if ctx["job_try"] < MAX_TRIES:
            logger.warning("upload %s: storage error %r, retrying", upload.id, error)
            raise Retry(defer=ctx["job_try"] * 5) from error
        logger.exception("upload %s: giving up after %d tries", upload.id, ctx["job_try"])
        outcome = REASON_FAILED
        await store.delete([storage.incoming_key(upload.user_id, upload.id)])

    elapsed_ms = (time.monotonic() - started) * 1000
    if outcome == "ready":
        # The job's own line, from log_job, reports the duration at INFO.
        logger.debug("upload %s of user %s ready in %.0f ms", upload.id, upload.user_id, elapsed_ms)
        return outcome
    await index.mark_rejected(redis, upload, outcome)
    await quotas.release(redis, upload.user_id, upload.id)
    logger.warning("upload %s of user %s rejected: %s", upload.id, upload.user_id, outcome)
    return "rejected"


async def _verify(ctx: dict[str, Any], upload: Upload) -> str:
    """Return "ready", or the reason the upload is rejected after deleting its file."""
    store, settings = ctx["store"], ctx["settings"]
    incoming = storage.incoming_key(upload.user_id, upload.id)
    original = storage.original_key(upload.user_id, upload.id)

    # One GET per object, without a HEAD first: S3 requests take most of this process's CPU.
    stored = await store.read_object(incoming, max_bytes=upload.max_bytes)
    source = incoming
    if stored is None:
        # An earlier run may have stored the original and then stopped.
        stored = await store.read_object(original, max_bytes=upload.max_bytes)
        source = original
        if stored is None:
            return REASON_MISSING
    problem = _check_object(upload, stored.info, source == incoming)
    if problem or stored.body is None:
        await store.delete([incoming])
        return problem or REASON_TOO_LARGE

    data = stored.body
    try:
        processed = await asyncio.get_running_loop().run_in_executor(
            ctx["pool"],
            partial(
                make_renditions,
                data,
                upload.content_type,
                max_pixels=settings.max_pixels,
                max_animation_pixels=settings.max_animation_pixels,
                thumbnail_size=settings.thumbnail_size,
                display_size=settings.display_size,
                quality=settings.rendition_quality,
            ),
        )
    except ImageRejected as rejection:
        logger.info("upload %s: %s", upload.id, rejection)
        await store.delete([incoming, original])
        return rejection.reason

    stored_bytes = await _store_image(store, upload, data, processed)
    # Counted before the record turns ready, so a delete at any moment frees what it counted.
    await quotas.commit(ctx["redis"], upload.user_id, upload.id, stored_bytes)
    if source == incoming:
        await store.delete([incoming])
    ready = await index.mark_ready(
        ctx["redis"],
        upload,
        content_type=processed.content_type,
        width=processed.width,
        height=processed.height,
        size=len(data),
        placeholder=processed.placeholder,
    )
    if not ready:
        # The owner deleted the image while this job ran: leave nothing behind.
        await store.delete(storage.image_keys(upload.user_id, upload.id))
        await quotas.release(ctx["redis"], upload.user_id, upload.id)
    return "ready"


def _check_object(upload: Upload, info: storage.ObjectInfo, is_incoming: bool) -> str | None:
    if info.size > upload.max_bytes:
        return REASON_TOO_LARGE
    if info.metadata.get("owner") != upload.user_id:
        return REASON_WRONG_OWNER
    if is_incoming and info.content_type != upload.content_type:
        return REASON_WRONG_TYPE
    return None


async def _store_image(
    store: storage.Storage, upload: Upload, data: bytes, processed: Renditions
) -> int:
    """Write the original and its renditions; return the bytes written, for the quota."""
    # The metadata lets the index be rebuilt from the bucket alone.
    metadata = {
        "owner": upload.user_id,
        "filename": quote(upload.filename, safe=""),
        "created-at": f"{upload.created_at:.3f}",
    }
    await store.write(
        storage.original_key(upload.user_id, upload.id),
        data,
        content_type=processed.content_type,
        metadata=metadata,
    )
    bodies = (processed.thumbnail, processed.thumbnail_2x, processed.display)
    renditions = zip(storage.rendition_keys(upload.user_id, upload.id), bodies, strict=True)
    for key, body in renditions:
        await store.write(
            key,
            body,
            content_type=processed.rendition_type,
            metadata={"owner": upload.user_id},
            cache_control=storage.RENDITION_CACHE_CONTROL,
        )
    return len(data) + sum(len(body) for body in bodies)


async def purge_abandoned(ctx: dict[str, Any]) -> int:
    """Delete uploads whose form expired unused; queue again those whose job went missing.

    Also deletes stray objects under the incoming prefix: a form stays valid for minutes
    and S3 accepts it more than once, so a file can arrive after its upload was finished,
    rejected or deleted. Runs once per tick however many workers run: the first worker to
    claim the tick's lock in Redis does the work. Returns how many uploads and stray
    objects it deleted.
    """
    redis, store, settings = ctx["redis"], ctx["store"], ctx["settings"]
    tick = int(time.time() // 60)
    if not await redis.set(f"{index.PREFIX}:lock:purge:{tick}", "1", nx=True, ex=120):
        return 0

    cutoff = time.time() - settings.purge_grace_seconds
    overdue = await index.overdue_uploads(redis, cutoff)
    abandoned = [upload for upload in overdue if upload.state == State.ISSUED]
    await store.delete(storage.incoming_key(u.user_id, u.id) for u in abandoned)
    for upload in abandoned:
        await index.delete_upload(redis, upload)
    for upload in overdue:
        if upload.state == State.UPLOADED:
            await jobs.enqueue_verify(redis, upload.id)
    stray = await _stray_incoming_keys(redis, store, cutoff)
    await store.delete(stray)
    if overdue or stray:
        logger.info(
            "purged %d abandoned uploads and %d stray objects, queued %d again",
            len(abandoned),
            len(stray),
            len(overdue) - len(abandoned),
        )
    return len(abandoned) + len(stray)


async def _stray_incoming_keys(redis: Any, store: storage.Storage, cutoff: float) -> list[str]:
    """Return incoming keys older than the cutoff whose upload no longer waits for a file."""
    stray = []
    async for key, modified_at in store.list_objects(storage.INCOMING_LIFECYCLE_PREFIX):
        if modified_at > cutoff:
            continue
        _, user_id, upload_id = key.split("/", 2)
        upload = await index.get_upload(redis, upload_id)
        waiting = upload is not None and upload.is_processing and upload.user_id == user_id
        if not waiting:
            stray.append(key)
    return stray
