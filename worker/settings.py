"""The arq worker's settings: its jobs, its cron schedule, and the clients it opens."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from contextlib import AsyncExitStack
from typing import Any

from arq import cron
from arq.connections import RedisSettings
from arq.worker import Worker, create_worker

from gallery.logs import log_job
from gallery.settings import Settings
from gallery.storage import Storage
from worker.jobs import MAX_TRIES, purge_abandoned, verify_upload

logger = logging.getLogger(__name__)


async def startup(ctx: dict[str, Any]) -> None:
    """Open the S3 clients and the process pool that decodes images off the event loop."""
    stack = AsyncExitStack()
    ctx["stack"] = stack
    ctx["store"] = await stack.enter_async_context(Storage.open(ctx["settings"]))
    # Spawned, not forked: a fork would copy the event loop and open sockets.
    # The pool's processes ignore Ctrl-C, which reaches the whole process group: the worker
    # shuts the pool down itself.
    ctx["pool"] = ProcessPoolExecutor(
        max_workers=ctx["settings"].worker_processes or os.cpu_count() or 1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=signal.signal,
        initargs=(signal.SIGINT, signal.SIG_IGN),
    )
    logger.info("worker started")


async def shutdown(ctx: dict[str, Any]) -> None:
    ctx["pool"].shutdown(cancel_futures=True)
    await ctx["stack"].aclose()
    logger.info("worker stopped")


class WorkerSettings:
    functions = (log_job(verify_upload),)
    cron_jobs = (cron(log_job(purge_abandoned), second=0),)
    on_startup = startup
    on_shutdown = shutdown
    max_tries = MAX_TRIES
    job_timeout = 300
    # No kept results: a job id then blocks a duplicate only while the job is queued or runs.
    keep_result = 0
    # `gallery worker --check` reads the health record, so it must be fresh.
    health_check_interval = 30


def make_worker(settings: Settings, **overrides: Any) -> Worker:
    """Build a worker for these settings; tests pass burst=True."""
    return create_worker(
        WorkerSettings,
        redis_settings=RedisSettings.from_dsn(settings.redis_url),
        ctx={"settings": settings},
        **overrides,
    )
