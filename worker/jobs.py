"""The verify job: check each upload against its record and bytes, then make its renditions."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any, NamedTuple
from urllib.parse import quote

from arq import Retry
from botocore.exceptions import BotoCoreError, ClientError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gallery import index, metrics, quotas, storage, trash
from gallery.images import format_mib
from gallery.imaging import ImageRejected, Renditions, make_renditions
from gallery.imaging.decoding import type_name
from gallery.index import Upload

logger = logging.getLogger(__name__)

# arq runs a job at most this many times; each Retry below counts as one.
MAX_TRIES = 5
# Seconds before the next try after a transient error, by the number of the failed try.
RETRY_DELAYS = (2, 8, 30, 120)
# Runs of one upload's job that started and never ended, after which the upload is
# rejected as failed: a worker killed mid-job, or a job over arq's timeout. Such an image
# may be what kills the worker. A run that ends, even with an error, does not count.
MAX_ATTEMPTS = 3

# Errors of services that a later try may not meet: S3 or Redis unreachable or failing.
# After the last try the upload waits, still verifying, and the sweep queues it again, so
# an outage of any length loses no upload. Every other error is final for the upload.
SERVICE_ERRORS = (ClientError, BotoCoreError, OSError, RedisConnectionError, RedisTimeoutError)

# Reasons shown on an upload's tile when its object is missing, changed or unreadable.
# They are also the `reason` label of gallery_uploads_rejected_total, except a Rejection's.
REASON_MISSING = "the file never arrived"
REASON_TOO_LARGE = "too large"
REASON_WRONG_TYPE = "type does not match"
REASON_WRONG_OWNER = "not uploaded with this account's form"
REASON_FAILED = "processing failed; upload it again"
# The outcome of a run that left the upload for the sweep to queue again.
DEFERRED = "deferred"
# The outcome of a run whose upload its owner deleted, or another run finished, while it
# ran: what this run stored is deleted.
DELETED = "deleted"


class Rejection(NamedTuple):
    """A rejection whose reason names values, with a fixed label for the metrics."""

    reason: str
    label: str


def make_pool(processes: int) -> ProcessPoolExecutor:
    """Start the process pool that decodes images off the event loop.

    Spawned, not forked: a fork would copy the event loop and open sockets. The pool's
    processes ignore Ctrl-C, which reaches the whole process group: the worker shuts the
    pool down itself.
    """
    return ProcessPoolExecutor(
        max_workers=processes or os.cpu_count() or 1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=signal.signal,
        initargs=(signal.SIGINT, signal.SIG_IGN),
    )


async def verify_upload(ctx: dict[str, Any], upload_id: str) -> str:
    """Check one upload against its record and its bytes, then store it and its renditions.

    Idempotent: a finished upload is left alone, a run that stopped after moving the
    original picks up from the original, every object has a fixed key, and the first run
    to finish the record wins. Service errors and a broken decoding pool retry with
    backoff up to MAX_TRIES; an image the checks reject, and any other error, is final.
    """
    try:
        return await _verify_upload(ctx, upload_id)
    except (RedisConnectionError, RedisTimeoutError) as error:
        # Redis went away while the run read or finished the upload's record.
        job_try = ctx.get("job_try", 1)
        if job_try < MAX_TRIES:
            raise _retry(upload_id, job_try, error) from error
        logger.warning(
            "upload %s: %d tries failed, last with %r; the sweep queues it again",
            upload_id,
            job_try,
            error,
        )
        return DEFERRED


async def _verify_upload(ctx: dict[str, Any], upload_id: str) -> str:
    started = time.monotonic()
    redis, store = ctx["redis"], ctx["store"]
    upload = await index.get_upload(redis, upload_id)
    if upload is None or not upload.is_processing:
        return "skipped"
    attempts = await index.mark_verifying(redis, upload)
    if not attempts:
        return "skipped"

    if attempts > MAX_ATTEMPTS:
        logger.warning("upload %s: giving up after %d attempts", upload.id, attempts - 1)
        outcome = REASON_FAILED
    else:
        outcome = await _verify_or_retry(ctx, upload)
    if outcome in (DEFERRED, DELETED):
        return outcome
    if outcome == REASON_FAILED:
        await store.delete(storage.image_keys(upload.user_id, upload.id))

    elapsed_ms = (time.monotonic() - started) * 1000
    if outcome == "ready":
        await metrics.count(redis, "gallery_uploads_verified_total")
        # The job's own line, from log_job, reports the duration at INFO.
        logger.debug("upload %s of user %s ready in %.0f ms", upload.id, upload.user_id, elapsed_ms)
        return "ready"
    reason, label = outcome if isinstance(outcome, Rejection) else (outcome, outcome)
    await index.mark_rejected(redis, upload, reason)
    await quotas.release(redis, upload.user_id, upload.id)
    await metrics.count(redis, "gallery_uploads_rejected_total", reason=label)
    logger.warning("upload %s of user %s rejected: %s", upload.id, upload.user_id, reason)
    return "rejected"


async def _verify_or_retry(ctx: dict[str, Any], upload: Upload) -> str | Rejection:
    """Run the checks; raise Retry on a service error or a broken pool until the last try.

    Returns DEFERRED when a service error lasted through every try: the upload stays
    verifying for the sweep to queue again.
    """
    job_try = ctx.get("job_try", 1)
    pool = ctx.get("pool")
    try:
        return await _verify(ctx, upload)
    except SERVICE_ERRORS as error:
        # The run ends here, so it does not count towards MAX_ATTEMPTS.
        await _end_attempt(ctx["redis"], upload)
        if job_try < MAX_TRIES:
            raise _retry(upload.id, job_try, error) from error
        logger.warning(
            "upload %s: %d tries failed, last with %r; the sweep queues it again",
            upload.id,
            job_try,
            error,
        )
        return DEFERRED
    except NotArrivedYet:
        # "Done" came before the file, which only a client other than our page sends: check
        # again once the form has expired, when no file can arrive any more.
        await _end_attempt(ctx["redis"], upload)
        if job_try >= MAX_TRIES:
            return REASON_MISSING
        delay = max(1, round(upload.form_expires_at - time.time()) + 1)
        logger.info("upload %s: file not in the bucket yet, checking in %d s", upload.id, delay)
        raise Retry(defer=delay) from None
    except BrokenProcessPool as error:
        # A decoding process died, perhaps killed for its memory by this very image: start
        # a new pool, unless another job did, and count the run, so such an image is
        # rejected in the end.
        if ctx.get("pool") is pool:
            ctx["pool"] = make_pool(ctx["settings"].worker_processes)
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if job_try < MAX_TRIES:
            raise _retry(upload.id, job_try, error) from error
        logger.exception("upload %s: giving up after %d tries", upload.id, job_try)
        return REASON_FAILED
    except Exception:
        logger.exception("upload %s: processing failed", upload.id)
        return REASON_FAILED


async def _end_attempt(redis: Any, upload: Upload) -> None:
    try:
        await index.end_attempt(redis, upload)
    except RedisError as error:
        # Redis itself is down: the attempt stays counted, which costs one of MAX_ATTEMPTS.
        logger.warning("upload %s: could not take back its attempt: %r", upload.id, error)


class NotArrivedYet(Exception):
    """The upload's file is not in the bucket, but its form may still be used to send it."""


def _retry(upload_id: str, job_try: int, error: Exception) -> Retry:
    delay = RETRY_DELAYS[min(job_try, len(RETRY_DELAYS)) - 1]
    logger.warning(
        "upload %s: try %d failed with %r, retrying in %d s", upload_id, job_try, error, delay
    )
    return Retry(defer=delay)


async def _verify(ctx: dict[str, Any], upload: Upload) -> str | Rejection:
    """Return "ready", DELETED, or the reason the upload is rejected after deleting its file."""
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
            if time.time() < upload.form_expires_at:
                raise NotArrivedYet(upload.id)
            return REASON_MISSING
    problem = _check_object(upload, stored.info, source == incoming)
    if problem or stored.body is None:
        await store.delete([incoming])
        return problem or _too_large(upload)

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
        return Rejection(rejection.message, rejection.reason.value)

    stored_bytes = await _store_image(store, upload, data, processed)
    await metrics.count(ctx["redis"], "gallery_thumbnails_made_total")
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
        taken_at=processed.taken_at,
    )
    if not ready:
        # The owner deleted the image, or another run rejected it, while this job ran.
        await store.delete(storage.image_keys(upload.user_id, upload.id))
        await quotas.release(ctx["redis"], upload.user_id, upload.id)
        return DELETED
    return "ready"


def _check_object(
    upload: Upload, info: storage.ObjectInfo, is_incoming: bool
) -> str | Rejection | None:
    if info.size > upload.max_bytes:
        return _too_large(upload)
    if info.metadata.get("owner") != upload.user_id:
        return REASON_WRONG_OWNER
    if is_incoming and info.content_type != upload.content_type:
        stored, signed = type_name(info.content_type), type_name(upload.content_type)
        return Rejection(
            f"stored as {stored}, not the {signed} its form allowed", REASON_WRONG_TYPE
        )
    return None


def _too_large(upload: Upload) -> Rejection:
    limit = format_mib(upload.max_bytes)
    return Rejection(f"file over the {limit} MiB its form allowed", REASON_TOO_LARGE)


async def _store_image(
    store: storage.Storage, upload: Upload, data: bytes, processed: Renditions
) -> int:
    """Write the original and its renditions; return the bytes written, for the quota."""
    # The metadata lets `gallery reindex` rebuild the record from the bucket alone. S3
    # metadata is ASCII, so the name is percent-encoded; repr keeps the exact float time.
    metadata = {
        "owner": upload.user_id,
        "filename": quote(upload.filename, safe=""),
        "created-at": repr(upload.created_at),
        "width": str(processed.width),
        "height": str(processed.height),
        "placeholder": processed.placeholder,
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


async def purge_trash(ctx: dict[str, Any]) -> int:
    """Delete forever the images kept in the trash longer than the retention period.

    Runs once per hour however many workers run: the first to claim the hour's lock in Redis
    does the work. Returns how many images it deleted.
    """
    redis, store, settings = ctx["redis"], ctx["store"], ctx["settings"]
    hour = int(time.time() // 3600)
    if not await redis.set(f"{index.PREFIX}:lock:purge-trash:{hour}", "1", nx=True, ex=7200):
        return 0
    deleted = await trash.purge_expired(redis, store, retention_days=settings.trash_retention_days)
    if deleted:
        logger.info(
            "purged %d images kept in the trash over %d days",
            deleted,
            settings.trash_retention_days,
        )
    return deleted
