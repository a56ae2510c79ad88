"""Health checks for load balancers and orchestrators: /healthz and /readyz, as JSON."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from arq.connections import ArqRedis
from arq.constants import default_queue_name, health_check_key_suffix
from litestar import Response, get
from litestar.di import NamedDependency
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from gallery.index import PREFIX
from gallery.storage import Storage

logger = logging.getLogger(__name__)

# Seconds each check of /readyz may take before it counts as failed.
CHECK_TIMEOUT_SECONDS = 2.0

# Every running worker rewrites this key each 30 s, and it expires 31 s after the last write.
WORKER_HEARTBEAT_KEY = default_queue_name + health_check_key_suffix


def host_heartbeat_key(hostname: str) -> str:
    """Return the key that the workers on one host rewrite with WORKER_HEARTBEAT_KEY.

    `gallery worker --check` reads it, so that a container's health check reads the
    heartbeat of the container's own worker, not of whichever worker wrote the shared key
    last.
    """
    return f"{PREFIX}:worker-heartbeat:{hostname}"


@get("/healthz", name="health:alive", sync_to_thread=False)
def show_alive() -> dict[str, str]:
    """Return 200 while the process serves requests; it checks no other service."""
    return {"status": "ok"}


@get("/readyz", name="health:ready")
async def show_ready(
    redis: NamedDependency[ArqRedis], store: NamedDependency[Storage]
) -> Response[dict[str, Any]]:
    """Return 200 when Redis and S3 respond and a worker sent a heartbeat recently, else 503.

    The body names each check with `ok` and, for a failed one, an `error`.
    """
    results = await asyncio.gather(
        _check("redis", redis.ping()),
        _check("s3", store.check_bucket()),
        _check("worker", _check_worker(redis)),
    )
    checks = dict(results)
    ready = all(check["ok"] for check in checks.values())
    body = {"status": "ready" if ready else "unavailable", "checks": checks}
    return Response(body, status_code=HTTP_200_OK if ready else HTTP_503_SERVICE_UNAVAILABLE)


class NotReady(Exception):
    """A service that responds but is not ready. The message gives the reason."""


async def _check(name: str, check: Any) -> tuple[str, dict[str, Any]]:
    try:
        await asyncio.wait_for(check, CHECK_TIMEOUT_SECONDS)
    except TimeoutError:
        return name, {"ok": False, "error": f"no answer within {CHECK_TIMEOUT_SECONDS:g} s"}
    except NotReady as error:
        return name, {"ok": False, "error": str(error)}
    # Any failure fails the check. Only the exception's type is sent, because its message
    # may name internal hosts; the log has the message.
    except Exception as error:  # noqa: BLE001
        logger.warning("readiness check %s failed: %r", name, error)
        return name, {"ok": False, "error": type(error).__name__}
    return name, {"ok": True}


async def _check_worker(redis: ArqRedis) -> None:
    if not await redis.exists(WORKER_HEARTBEAT_KEY):
        raise NotReady("no worker has reported itself in the last 31 s")
