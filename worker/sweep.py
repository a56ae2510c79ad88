"""The sweep cron: finish or purge uploads stuck in a state, and delete stray incoming files."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from arq.constants import job_key_prefix

from gallery import arrivals, index, jobs, metrics, quotas, storage
from gallery.index import State, Upload
from worker.jobs import MAX_ATTEMPTS, REASON_FAILED

logger = logging.getLogger(__name__)

# Uploads the sweep looks at in one tick; the rest wait for the next tick.
SWEEP_BATCH = 1000
# A tick's lock outlives any late copy of its job: arq drops a job not started within a day.
TICK_LOCK_SECONDS = 24 * 3600 + 60
# Incoming keys looked up in Redis in one pipelined round trip.
LOOKUP_BATCH = 500


@dataclass
class SweepCounts:
    """Counts of the uploads one sweep moved on, failed or purged, and of stray files."""

    promoted: int = 0
    requeued: int = 0
    failed: int = 0
    purged: int = 0
    stray: int = 0
    # One line per action, for `gallery purge`.
    actions: list[str] = field(default_factory=list)


async def claim_tick(redis: Any, name: str, interval: int, scheduled_at: float) -> bool:
    """Claim one tick of a cron job for this worker; False when another worker has it.

    arq enqueues a cron job from every worker under one job id, but with no kept results
    a worker that polls late can enqueue the same tick again after the first run ended.
    That copy runs once arq's in-progress key of the first run expires, 60 s later. The
    lock key names the tick's scheduled time, so a late copy cannot take the next tick.
    """
    tick = int(scheduled_at // interval)
    key = f"{index.PREFIX}:lock:{name}:{tick}"
    return bool(await redis.set(key, "1", nx=True, ex=TICK_LOCK_SECONDS))


def scheduled_time(ctx: dict[str, Any]) -> float:
    """Return the Unix time a cron run was scheduled for, from its arq job id.

    arq names a cron job `cron:<function>:<scheduled time in ms>`. A run started by hand
    has no such id and uses the current time.
    """
    _, _, millis = str(ctx.get("job_id", "")).rpartition(":")
    if millis.isdigit():
        return int(millis) / 1000
    return time.time()


async def sweep_uploads(ctx: dict[str, Any]) -> int:
    """Finish or purge unfinished uploads that are due, and delete stray incoming files.

    Runs once per tick however many workers run: the first worker to claim the tick's lock
    does the work. Returns how many uploads and stray objects it deleted.
    """
    redis, settings = ctx["redis"], ctx["settings"]
    interval = settings.sweep_interval_seconds
    if not await claim_tick(redis, "sweep", interval, scheduled_time(ctx)):
        return 0
    counts = await sweep(ctx)
    if counts.promoted or counts.requeued or counts.failed or counts.purged or counts.stray:
        logger.info(
            "sweep: %d unreported uploads queued, %d stuck uploads queued again, "
            "%d failed, %d abandoned uploads and %d stray objects purged",
            counts.promoted,
            counts.requeued,
            counts.failed,
            counts.purged,
            counts.stray,
        )
    return counts.purged + counts.stray


async def sweep(ctx: dict[str, Any]) -> SweepCounts:
    """Move every due upload on, then delete stray incoming files; the body of the cron.

    With `dry_run` true in ctx it changes nothing and only counts and lists the actions.
    """
    redis, store, settings = ctx["redis"], ctx["store"], ctx["settings"]
    dry_run = ctx.get("dry_run", False)
    now = time.time()
    counts = SweepCounts()
    for upload in await index.due_uploads(redis, now, limit=SWEEP_BATCH):
        if upload.state == State.ISSUED:
            await _sweep_issued(ctx, upload, now, counts)
        else:
            await _sweep_unfinished(ctx, upload, counts)
    cutoff = now - settings.purge_grace_seconds
    stray = await _stray_incoming_keys(redis, store, cutoff)
    if not dry_run:
        await store.delete(stray)
    counts.stray = len(stray)
    counts.actions.extend(f"delete stray object {key}" for key in stray)
    if not dry_run:
        await _count_sweep(redis, counts)
    return counts


async def _count_sweep(redis: Any, counts: SweepCounts) -> None:
    await metrics.count(redis, "gallery_sweeps_total")
    await metrics.count(redis, "gallery_uploads_completed_total", counts.promoted, source="sweep")
    await metrics.count(redis, "gallery_purged_total", counts.purged, kind="abandoned_upload")
    await metrics.count(redis, "gallery_purged_total", counts.stray, kind="stray_object")


async def _sweep_issued(
    ctx: dict[str, Any], upload: Upload, now: float, counts: SweepCounts
) -> None:
    """Verify an upload whose file arrived unreported; purge one whose file never came."""
    redis, store, settings = ctx["redis"], ctx["store"], ctx["settings"]
    dry_run = ctx.get("dry_run", False)
    owner = f"{upload.id} of user {upload.user_id}"
    info = await store.head(storage.incoming_key(upload.user_id, upload.id))
    if info is not None:
        # The browser posted the file but its "done" request never reached us.
        if dry_run or await arrivals.accept_arrived(redis, store, upload, info):
            counts.promoted += 1
            counts.actions.append(f"verify unreported upload {owner}")
        return
    purge_at = upload.form_expires_at + settings.purge_grace_seconds
    if purge_at <= now:
        if not dry_run:
            await index.delete_upload(redis, upload)
        counts.purged += 1
        counts.actions.append(f"purge abandoned upload {owner}")
    elif not dry_run:
        await index.postpone_sweep(redis, upload, purge_at - now)


async def _sweep_unfinished(ctx: dict[str, Any], upload: Upload, counts: SweepCounts) -> None:
    """Queue again an uploaded or verifying upload whose job is gone; fail it after MAX_ATTEMPTS."""
    redis, store = ctx["redis"], ctx["store"]
    dry_run = ctx.get("dry_run", False)
    owner = f"{upload.id} of user {upload.user_id}"
    job_id = jobs.verify_job_id(upload.id)
    if await redis.exists(job_key_prefix + job_id):
        # Queued, running, or waiting for arq to run it again after a worker died.
        if not dry_run:
            await index.postpone_sweep(redis, upload)
        return
    if upload.attempts >= MAX_ATTEMPTS:
        counts.failed += 1
        counts.actions.append(f"reject upload {owner} after {upload.attempts} attempts")
        if dry_run:
            return
        await store.delete(storage.image_keys(upload.user_id, upload.id))
        await index.mark_rejected(redis, upload, REASON_FAILED)
        await quotas.release(redis, upload.user_id, upload.id)
        logger.warning("upload %s: rejected after %d attempts", upload.id, upload.attempts)
        return
    counts.requeued += 1
    counts.actions.append(f"queue again upload {owner}")
    if not dry_run:
        await jobs.enqueue_verify(redis, upload.id)
        await index.postpone_sweep(redis, upload)


async def _stray_incoming_keys(redis: Any, store: storage.Storage, cutoff: float) -> list[str]:
    """Return incoming keys older than the cutoff whose upload no longer waits for a file.

    A form stays valid for minutes and S3 accepts it more than once, so a file can arrive
    after its upload was finished, rejected or deleted.
    """
    candidates = []
    async for key, modified_at in store.list_objects(storage.INCOMING_LIFECYCLE_PREFIX):
        if modified_at <= cutoff:
            candidates.append(key)
    stray = []
    for start in range(0, len(candidates), LOOKUP_BATCH):
        batch = candidates[start : start + LOOKUP_BATCH]
        owners = await index.processing_owners(redis, [key.rsplit("/", 1)[1] for key in batch])
        for key, owner in zip(batch, owners, strict=True):
            _, user_id, _ = key.split("/", 2)
            if owner != user_id:
                stray.append(key)
    return stray
