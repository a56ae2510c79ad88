"""The arq worker's settings: its jobs, its cron schedule, and the clients it opens."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

from arq import cron
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from arq.worker import Worker, get_kwargs
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from gallery.health import host_heartbeat_key
from gallery.logs import log_job
from gallery.metrics import timed_job
from gallery.settings import Settings
from gallery.storage import Storage
from worker.jobs import MAX_TRIES, make_pool, purge_trash, verify_upload
from worker.share_purge import purge_shares
from worker.sweep import sweep_uploads

logger = logging.getLogger(__name__)

# A command whose connection breaks is sent again, with exponential backoff from 0.1 s up
# to 2 s between tries.
REDIS_COMMAND_RETRIES = 8
# After that, the polling loop waits this long, at most, between tries to reach Redis.
MAX_RECONNECT_DELAY = 10.0
# redis-py opens a connection outside that retry loop, so while the server is down and
# refuses connections, every command fails at once.
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
# A connection lost inside arq's WATCH of a cron job's key comes out as a WatchError.
POLL_ERRORS = (*REDIS_ERRORS, WatchError)


async def startup(ctx: dict[str, Any]) -> None:
    """Open the S3 clients and the process pool that decodes images off the event loop."""
    stack = AsyncExitStack()
    ctx["stack"] = stack
    ctx["store"] = await stack.enter_async_context(Storage.open(ctx["settings"]))
    ctx["pool"] = make_pool(ctx["settings"].worker_processes)
    logger.info("worker started")


async def shutdown(ctx: dict[str, Any]) -> None:
    ctx["pool"].shutdown(cancel_futures=True)
    await ctx["stack"].aclose()
    logger.info("worker stopped")


class ReconnectingWorker(Worker):
    """An arq worker that waits for Redis to come back instead of exiting when it is gone.

    arq 0.28 lets a connection error out of its polling loop, which stops the worker. It
    also records a heartbeat under its host's name, for `gallery worker --check`.

    A job that ends while Redis is down cannot record its end, and arq would leave it
    marked as running until its in-progress key expires, `job_timeout` + 10 s later. The
    worker keeps such ends and records them once Redis is back, so a job that asked to be
    retried runs again within seconds of the outage, not minutes.
    """

    _outage_started: float | None = None
    _host_heartbeat_at: float = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Job id -> the write that records its end, for jobs that ended during an outage.
        self._unrecorded_ends: dict[str, Callable[[], Awaitable[None]]] = {}

    async def run_job(self, job_id: str, score: int) -> None:
        try:
            await super().run_job(job_id, score)
        except REDIS_ERRORS as error:
            # arq could not read the job to start it. Free the job once Redis is back, so
            # that it runs then instead of when its in-progress key expires.
            release = partial(self.pool.delete, in_progress_key_prefix + job_id)
            self._unrecorded_ends.setdefault(job_id, release)
            logger.warning(
                "job %s could not start: Redis is unreachable (%r); it runs once Redis is back",
                job_id,
                error,
            )

    async def finish_job(self, job_id: str, *args: Any) -> None:
        await self._record_end(job_id, partial(super().finish_job, job_id, *args))

    async def finish_failed_job(self, job_id: str, *args: Any) -> None:
        await self._record_end(job_id, partial(super().finish_failed_job, job_id, *args))

    async def _record_end(self, job_id: str, record: Callable[[], Awaitable[None]]) -> None:
        try:
            await record()
        except REDIS_ERRORS as error:
            self._unrecorded_ends[job_id] = record
            logger.warning(
                "job %s ended while Redis was unreachable (%r); its end is recorded once "
                "Redis is back",
                job_id,
                error,
            )

    async def _record_unrecorded_ends(self) -> None:
        for job_id, record in list(self._unrecorded_ends.items()):
            await record()
            del self._unrecorded_ends[job_id]
            logger.info("job %s: end recorded after the outage", job_id)

    async def record_health(self) -> None:
        """Write arq's shared health key and this host's heartbeat, each health check interval.

        arq calls this from its polling loop, so a worker whose loop is stuck writes neither.
        """
        await super().record_health()
        now = time.time()
        if now - self._host_heartbeat_at < self.health_check_interval:
            return
        self._host_heartbeat_at = now
        hostname = socket.gethostname()
        await self.pool.psetex(
            host_heartbeat_key(hostname),
            int((self.health_check_interval + 1) * 1000),
            f"worker {os.getpid()} on {hostname} at {time.strftime('%H:%M:%S')}",
        )

    async def _poll_iteration(self) -> None:
        try:
            if self._unrecorded_ends:
                await self._record_unrecorded_ends()
            await super()._poll_iteration()
        except POLL_ERRORS as error:
            await self._wait_after_error(error)
            return
        if self._outage_started is not None:
            down = time.monotonic() - self._outage_started
            logger.info("Redis is reachable again after %.1f s", down)
            self._outage_started = None

    async def _wait_after_error(self, error: Exception) -> None:
        now = time.monotonic()
        if self._outage_started is None:
            self._outage_started = now
            logger.warning("Redis is unreachable (%r); retrying until it is back", error)
        down = now - self._outage_started
        await asyncio.sleep(min(MAX_RECONNECT_DELAY, 0.5 + down / 2))


class WorkerSettings:
    functions = (log_job(timed_job(verify_upload)),)
    on_startup = startup
    on_shutdown = shutdown
    max_tries = MAX_TRIES
    job_timeout = 300
    # No kept results: a job id then blocks a duplicate only while the job is queued or runs.
    keep_result = 0
    # `gallery worker --check` and /readyz read the health record, so it must be fresh.
    health_check_interval = 30


def redis_settings(settings: Settings, *, command_retries: int) -> RedisSettings:
    """Return arq's connection settings, retrying each command on a lost connection."""
    redis = RedisSettings.from_dsn(settings.redis_url)
    redis.retry = RedisRetry(ExponentialBackoff(cap=2, base=0.1), command_retries)
    redis.retry_on_error = [RedisConnectionError, RedisTimeoutError]
    return redis


def make_worker(settings: Settings, **overrides: Any) -> Worker:
    """Build a worker for these settings; tests pass burst=True."""
    seconds = set(range(0, 60, settings.sweep_interval_seconds))
    options: dict[str, Any] = {
        "redis_settings": redis_settings(settings, command_retries=REDIS_COMMAND_RETRIES),
        "ctx": {"settings": settings},
        "cron_jobs": [
            cron(log_job(timed_job(sweep_uploads)), second=seconds),
            cron(log_job(timed_job(purge_shares)), second=30),
            cron(log_job(timed_job(purge_trash)), minute=7, second=30),
        ],
        **overrides,
    }
    return ReconnectingWorker(**{**get_kwargs(WorkerSettings), **options})
