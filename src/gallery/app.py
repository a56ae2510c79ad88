"""The web app, built from a settings object: routes, templates, plugins and the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis
from botocore.exceptions import (
    ClientError,
)
from litestar import Litestar
from litestar.config.csrf import CSRFConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException, NotAuthorizedException, NotFoundException
from litestar.logging import LoggingConfig
from litestar.plugins.htmx import HTMXPlugin
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.stores.redis import RedisStore
from litestar.template.config import TemplateConfig
from redis.asyncio import Redis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gallery import accounts, errors, health, images, metrics, plain_upload, share_pages, trash
from gallery.logs import request_log_middleware
from gallery.proxies import trusted_proxies_middleware
from gallery.security import security_headers, security_headers_middleware
from gallery.sessions import SESSION_NAMESPACE, SessionConfig
from gallery.settings import Settings
from gallery.storage import Storage

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Seconds a request waits for Redis to connect, and to run one command, before the page
# returns 503. The web app starts, and keeps serving errors, while Redis is down.
REDIS_CONNECT_TIMEOUT = 2
REDIS_COMMAND_TIMEOUT = 5


HEALTH_PATHS = ["^/healthz$", "^/readyz$", "^/metrics$"]


def _redis_options() -> dict[str, Any]:
    """Return the Redis client options of the web app.

    A command that meets a closed connection, as every pooled one is after Redis restarted,
    is sent once more on a new connection before the request fails.
    """
    return {
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT,
        "socket_timeout": REDIS_COMMAND_TIMEOUT,
        "retry": RedisRetry(NoBackoff(), 1),
        "retry_on_error": [RedisConnectionError],
    }


def provide_store(state: State) -> Storage:
    return state.store


def provide_queue(state: State) -> ArqRedis:
    return state.queue


def create_app(settings: Settings) -> Litestar:
    """Build the gallery's web app."""

    @asynccontextmanager
    async def open_services(app: Litestar) -> AsyncIterator[None]:
        async with Storage.open(settings) as store:
            queue = ArqRedis.from_url(settings.redis_url, **_redis_options())
            app.state.store, app.state.queue = store, queue
            try:
                yield
            finally:
                await queue.aclose()

    return Litestar(
        route_handlers=[
            images.show_home,
            health.show_alive,
            health.show_ready,
            metrics.show_metrics,
            accounts.router,
            images.router,
            share_pages.owner_router,
            share_pages.public_router,
            plain_upload.router,
            trash.router,
            create_static_files_router(path="/static", directories=[PROJECT_ROOT / "static"]),
        ],
        dependencies={
            "settings": Provide(lambda: settings, use_cache=True, sync_to_thread=False),
            "store": Provide(provide_store, sync_to_thread=False),
            "redis": Provide(provide_queue, sync_to_thread=False),
        },
        lifespan=[open_services],
        stores={
            "sessions": RedisStore(
                Redis.from_url(settings.redis_url, **_redis_options()),
                namespace=SESSION_NAMESPACE,
                handle_client_shutdown=True,
            )
        },
        middleware=[
            # First, so the request log and the per-address limits see the real client.
            trusted_proxies_middleware(settings.trusted_proxy_networks),
            request_log_middleware(errors.status_of_error),
            security_headers_middleware(security_headers(settings)),
            # Health checks run without loading a session, so /readyz reports a Redis
            # outage in its JSON even when the probe sends a session cookie.
            SessionConfig(secure=settings.cookies_secure, exclude=HEALTH_PATHS).middleware,
        ],
        csrf_config=CSRFConfig(
            secret=settings.secret_key,
            cookie_secure=settings.cookies_secure,
            cookie_httponly=True,
        ),
        template_config=TemplateConfig(
            directory=PROJECT_ROOT / "templates", engine=JinjaTemplateEngine
        ),
        plugins=[HTMXPlugin()],
        # Litestar's records go to the root logger, which `gallery` configures once for the
        # web app and the worker, instead of to a queue handler of Litestar's own.
        logging_config=LoggingConfig(
            configure_root_logger=False,
            log_exceptions="always",
            # A client's mistake (401, 404, a CSRF 403) is one request log line, not a
            # traceback: only errors of ours are logged with their stack. So is Redis or S3
            # out of reach, which errors.show_unavailable logs as one warning per request.
            disable_stack_trace={*range(400, 500), *errors.UNREACHABLE_ERRORS},
            loggers={"litestar": {"level": "INFO", "handlers": [], "propagate": True}},
        ),
        # No OpenAPI pages: the app has no public API, and their viewers load remote scripts.
        openapi_config=None,
        # Litestar looks up the status code first, then the exception's classes from the most
        # specific, so 401 and 404 keep their handlers. The 500 entry also catches every
        # exception that is not an HTTPException.
        exception_handlers={
            NotAuthorizedException: errors.redirect_to_signin,
            NotFoundException: errors.show_not_found,
            HTTPException: errors.show_error,
            HTTP_500_INTERNAL_SERVER_ERROR: errors.show_error,
            # Redis or S3 unreachable or failing: 503 with Retry-After, never a traceback.
            **dict.fromkeys(errors.UNAVAILABLE_BASES, errors.show_unavailable),
            ClientError: errors.show_unavailable,
        },
    )
