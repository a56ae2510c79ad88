"""Security headers added to every response the app sends, pages, fragments and files."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from litestar.datastructures import MutableScopeHeaders
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gallery.settings import Settings

STATIC_PATH = "/static/"


def security_headers(settings: Settings) -> dict[str, str]:
    """Return the headers every response carries.

    Scripts and styles come only from our own static files. Images, the upload request and
    the no-JavaScript upload form may also reach the S3 endpoint that presigned URLs name.
    Images may be data URIs, for the tiny previews that the worker makes.
    No Referer is sent, so a page's URL never travels to S3 or elsewhere.
    """
    s3 = _origin(settings.presign_endpoint_url)
    policy = (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        f"img-src 'self' {s3} data:; connect-src 'self' {s3}; form-action 'self' {s3}; "
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


def security_headers_middleware(headers: dict[str, str]) -> Callable[[ASGIApp], ASGIApp]:
    """Make a middleware that sets these headers on every HTTP response.

    A middleware, not Litestar's `response_headers`, because those skip the static files
    and the htmx template responses. Every response but a static file also gets
    `Cache-Control: no-store`, so a page of photos is not kept by the browser: after
    sign-out, Back must not show it again.
    """

    def wrap(app: ASGIApp) -> ASGIApp:
        async def add_headers(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            is_static = scope["path"].startswith(STATIC_PATH)

            async def send_with_headers(message: Message) -> None:
                if message["type"] == "http.response.start":
                    response_headers = MutableScopeHeaders.from_message(message)
                    for name, value in headers.items():
                        response_headers[name] = value
                    if not is_static:
                        response_headers["Cache-Control"] = "no-store"
                await send(message)

            await app(scope, receive, send_with_headers)

        return add_headers

    return wrap
