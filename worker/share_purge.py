"""The share purge cron: delete share links that expired or were revoked."""

from __future__ import annotations

import logging
import time
from typing import Any

from gallery import shares
from worker.sweep import claim_tick, scheduled_time

logger = logging.getLogger(__name__)

# Seconds between runs: the cron runs once a minute.
PURGE_INTERVAL_SECONDS = 60


async def purge_shares(ctx: dict[str, Any]) -> int:
    """Delete share links that expired or were revoked; return how many.

    Runs once per tick however many workers run: the first worker to claim the tick's lock
    does the work.
    """
    redis = ctx["redis"]
    if not await claim_tick(redis, "purge-shares", PURGE_INTERVAL_SECONDS, scheduled_time(ctx)):
        return 0
    purged = await shares.purge_ended(redis, time.time())
    if purged:
        logger.info("purged %d ended share links", purged)
    return purged
