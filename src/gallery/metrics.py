"""Counters and job timings kept in Redis, served at /metrics in Prometheus text format.

Web apps and workers run as separate processes, often on separate hosts, and all of them
change the same totals, so the counters live in Redis, which every process shares. Any
web process serves the totals of all of them: scrape one, or do not sum what several
return. A counter survives a restart of the process that counts it, and Prometheus's
rate() copes with the reset when Redis itself loses its data.

NOTE: a Redis command retried after a lost connection may count one event twice.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from arq.constants import default_queue_name
from litestar import Response, get
from litestar.di import NamedDependency
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gallery.index import PENDING_KEY, PREFIX

logger = logging.getLogger(__name__)

COUNTERS_KEY = f"{PREFIX}:metrics:counters"
# Histogram buckets, sums and counts, in one hash.
HISTOGRAMS_KEY = f"{PREFIX}:metrics:histograms"

# Upper bounds of the job duration buckets, in seconds.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str
    help: str
    # Whether every sample carries labels; an unlabelled counter is shown as 0 until counted.
    labelled: bool = False


COUNTERS = {
    metric.name: metric
    for metric in (
        Metric("gallery_upload_forms_issued_total", "counter", "Upload forms signed."),
        Metric(
            "gallery_uploads_completed_total",
            "counter",
            "Uploads reported done by the browser, or found in S3 by the gallery page or the "
            "sweep (source).",
            labelled=True,
        ),
        Metric("gallery_uploads_verified_total", "counter", "Uploads that became ready."),
        Metric("gallery_uploads_rejected_total", "counter", "Uploads rejected, by reason.", True),
        Metric(
            "gallery_thumbnails_made_total",
            "counter",
            "Images whose renditions (thumbnail, 2x thumbnail, display) were stored.",
        ),
        Metric(
            "gallery_purged_total",
            "counter",
            "Abandoned uploads and stray incoming objects deleted by the sweep (kind).",
            labelled=True,
        ),
        Metric("gallery_sweeps_total", "counter", "Sweeps run, one per tick across workers."),
    )
}
JOB_DURATION = Metric(
    "gallery_job_duration_seconds", "histogram", "Worker job run time by function and outcome."
)
GAUGES = (
    Metric("gallery_queue_depth", "gauge", "Jobs waiting in the arq queue."),
    Metric("gallery_uploads_unfinished", "gauge", "Uploads issued, uploaded or verifying."),
)


def _escape(value: str) -> str:
    """Escape a label value as the text format requires: backslash, quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    pairs = ",".join(f'{name}="{_escape(value)}"' for name, value in sorted(labels.items()))
    return "{" + pairs + "}"


async def count(redis: Redis, name: str, amount: int = 1, **labels: str) -> None:
    """Add to a counter; a Redis error is logged at DEBUG and not raised to the caller."""
    if name not in COUNTERS:
        raise KeyError(f"unknown counter {name!r}; add it to COUNTERS")
    if amount <= 0:
        return
    try:
        await redis.hincrby(COUNTERS_KEY, name + _labels(labels), amount)
    except RedisError as error:
        logger.debug("could not count %s: %r", name, error)


async def observe_duration(redis: Redis, seconds: float, **labels: str) -> None:
    """Record one job's run time in the duration histogram."""
    name = JOB_DURATION.name
    async with redis.pipeline(transaction=True) as pipe:
        for bound in DURATION_BUCKETS:
            if seconds <= bound:
                pipe.hincrby(
                    HISTOGRAMS_KEY, f"{name}_bucket" + _labels({**labels, "le": f"{bound:g}"}), 1
                )
        pipe.hincrby(HISTOGRAMS_KEY, f"{name}_bucket" + _labels({**labels, "le": "+Inf"}), 1)
        pipe.hincrbyfloat(HISTOGRAMS_KEY, f"{name}_sum" + _labels(labels), seconds)
        pipe.hincrby(HISTOGRAMS_KEY, f"{name}_count" + _labels(labels), 1)
        try:
            await pipe.execute()
        except RedisError as error:
            logger.debug("could not record the duration of %s: %r", labels, error)


Job = TypeVar("Job", bound=Callable[..., Awaitable[Any]])


def timed_job(function: Job) -> Job:
    """Wrap an arq job so that each run's duration and outcome go into the histogram."""

    @functools.wraps(function)
    async def run(ctx: dict[str, Any], *args: Any) -> Any:
        started = time.monotonic()
        outcome = "failed"
        try:
            result = await function(ctx, *args)
            outcome = str(result)
            return result
        finally:
            seconds = time.monotonic() - started
            labels = {"function": function.__name__, "outcome": outcome}
            await observe_duration(ctx["redis"], seconds, **labels)

    return run  # type: ignore[return-value]  # same signature as the wrapped job


async def render(redis: Redis) -> str:
    """Return every counter, histogram and gauge in Prometheus text format 0.0.4."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(COUNTERS_KEY)
        pipe.hgetall(HISTOGRAMS_KEY)
        pipe.zcard(default_queue_name)
        pipe.zcard(PENDING_KEY)
        counters, histograms, queue_depth, unfinished = await pipe.execute()

    lines: list[str] = []
    samples = _decode(counters)
    for metric in COUNTERS.values():
        _header(lines, metric)
        own = {key: value for key, value in samples.items() if _base(key) == metric.name}
        lines.extend(f"{key} {value}" for key, value in sorted(own.items()))
        if not own and not metric.labelled:
            lines.append(f"{metric.name} 0")
    _header(lines, JOB_DURATION)
    lines.extend(f"{key} {value}" for key, value in sorted(_decode(histograms).items()))
    for metric, value in zip(GAUGES, (queue_depth, unfinished), strict=True):
        _header(lines, metric)
        lines.append(f"{metric.name} {value}")
    return "\n".join(lines) + "\n"


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {key.decode(): value.decode() for key, value in raw.items()}


def _base(sample: str) -> str:
    return sample.split("{", 1)[0]


def _header(lines: list[str], metric: Metric) -> None:
    lines.append(f"# HELP {metric.name} {metric.help}")
    lines.append(f"# TYPE {metric.name} {metric.kind}")


@get("/metrics", name="metrics:show", media_type=CONTENT_TYPE)
async def show_metrics(redis: NamedDependency[Redis]) -> Response[str]:
    """Serve the metrics of every web and worker process, for Prometheus to scrape."""
    return Response(await render(redis), media_type=CONTENT_TYPE)
