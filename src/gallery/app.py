"""The web app, built from a settings object: routes, templates, plugins and the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from litestar import Litestar
from litestar.config.csrf import CSRFConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import NotAuthorizedException, NotFoundException
from litestar.plugins.htmx import HTMXPlugin
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router
from litestar.stores.redis import RedisStore
from litestar.template.config import TemplateConfig

from gallery import accounts, errors, images
from gallery.sessions import SessionConfig
from gallery.settings import Settings
from gallery.storage import Storage

PROJECT_ROOT = Path(__file__).resolve().parents[2]

def security_headers(settings: Settings) -> dict[str, str]:
    """Return the headers every response carries.

    Scripts and styles come only from our own static files. Images, the upload request and
    the no-JavaScript upload form may also reach the S3 endpoint that presigned URLs name.
    No Referer is sent, so a page's URL never travels to S3 or elsewhere.
    """
    s3 = _origin(settings.presign_endpoint_url)
    policy = (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        f"img-src 'self' {s3}; connect-src 'self' {s3}; form-action 'self' {s3}; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def provide_store(state: State) -> Storage:
    return state.store


def provide_queue(state: State) -> ArqRedis:
    return state.queue


def create_app(settings: Settings) -> Litestar:
    """Build the gallery's web app."""

    @asynccontextmanager
    async def open_services(app: Litestar) -> AsyncIterator[None]:
        async with Storage.open(settings) as store:
            queue = await create_pool(RedisSettings.from_dsn(settings.redis_url))
            app.state.store, app.state.queue = store, queue
            try:
                yield
            finally:
                await queue.aclose()

    return Litestar(
        route_handlers=[
            images.show_home,
            accounts.router,
            images.router,
            create_static_files_router(path="/static", directories=[PROJECT_ROOT / "static"]),
        ],
        dependencies={
            "settings": Provide(lambda: settings, use_cache=True, sync_to_thread=False),
            "store": Provide(provide_store, sync_to_thread=False),
            "redis": Provide(provide_queue, sync_to_thread=False),
        },
        lifespan=[open_services],
        stores={
            "sessions": RedisStore.with_client(url=settings.redis_url, namespace="gallery:sessions")
        },
        middleware=[SessionConfig(secure=settings.cookies_secure).middleware],
        csrf_config=CSRFConfig(
            secret=settings.secret_key,
            cookie_secure=settings.cookies_secure,
            cookie_httponly=True,
        ),
        template_config=TemplateConfig(
            directory=PROJECT_ROOT / "templates", engine=JinjaTemplateEngine
        ),
        plugins=[HTMXPlugin()],
        exception_handlers={
            NotAuthorizedException: errors.redirect_to_signin,
            NotFoundException: errors.show_not_found,
        },
        response_headers=security_headers(settings),
    )
