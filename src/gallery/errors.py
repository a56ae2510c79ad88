"""Exception handlers that turn errors into pages, htmx text or JSON, as the request expects."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urlencode, urlsplit

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as S3ConnectionError
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.exceptions.responses import create_exception_response
from litestar.response import Redirect, Template
from litestar.status_codes import (
    HTTP_401_UNAUTHORIZED,
    HTTP_404_NOT_FOUND,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gallery import accounts
from gallery.accounts import current_user
from gallery.sessions import SessionConfig

logger = logging.getLogger(__name__)

# The paths of the public share pages, which visitors without an account open.
SHARE_PATH_PREFIX = "/s/"

# The name of the session cookie, Litestar's default for SessionConfig.key.
SESSION_COOKIE = SessionConfig.key

# Seconds in the Retry-After header of a 503 sent while Redis or S3 is unreachable.
UNAVAILABLE_RETRY_SECONDS = 30


@dataclass(frozen=True)
class ErrorText:
    """The text shown for a failed request: the problem, then the next step for the user."""

    problem: str
    next_step: str


ERROR_TEXTS = {
    400: ErrorText("The request was invalid.", "Go back, reload the page and try again."),
    403: ErrorText(
        "The request was rejected, most likely because the page was out of date.",
        "Reload the page and try again.",
    ),
    405: ErrorText(
        "This address cannot be opened that way.", "Use the links and buttons on the pages."
    ),
    409: ErrorText(
        "The photo changed in another tab or window since this page loaded, so nothing was"
        " deleted.",
        "Reload the page to see where the photo is now.",
    ),
    429: ErrorText(
        "Too many requests came from your address in the last minute.",
        "Wait a minute, then reload the page.",
    ),
    500: ErrorText(
        "Something went wrong on our side.",
        "Try again in a moment, and if it keeps failing, tell whoever runs this gallery.",
    ),
    503: ErrorText(
        "The gallery cannot reach its database or file storage right now.",
        f"Nothing you saved is lost. Wait {UNAVAILABLE_RETRY_SECONDS} seconds, then reload the page.",
    ),
}


def _is_htmx(request: Request[Any, Any, Any]) -> bool:
    return request.headers.get("hx-request") == "true"


def _expects_json(request: Request[Any, Any, Any]) -> bool:
    """Return whether a script expects JSON, as upload.js does when it requests /uploads."""
    accept = request.headers.get("accept", "")
    content_type = request.headers.get("content-type", "")
    return "application/json" in accept or content_type.startswith("application/json")


def _error_text(status_code: int) -> ErrorText:
    if status_code in ERROR_TEXTS:
        return ERROR_TEXTS[status_code]
    return ErrorText(f"{HTTPStatus(status_code).phrase}.", "Go back and try again.")


def _page_context(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Return who is signed in and whether the page is public, for an error page's links.

    A visitor of a share link gets no link into the app, and other visitors without a
    session get a sign-in link. The router raises 404 for a path no route matches, and 405
    for a method a route does not take, before the session middleware loads the session.
    Then a session cookie counts as signed in, because only a sign-in sets one, and the
    gallery link of a cookie whose session has ended leads to the sign-in page.
    """
    user = current_user(request) if "session" in request.scope else None
    if "session" in request.scope:
        signed_in = user is not None
    else:
        signed_in = SESSION_COOKIE in request.cookies
    return {
        "user": user,
        "signed_in": signed_in,
        "public_page": request.url.path.startswith(SHARE_PATH_PREFIX),
    }


def _page_to_return_to(request: Request[Any, Any, Any]) -> str | None:
    """Return the path and query of the page a request without a session came from.

    htmx names its page in HX-Current-URL. Other requests return only from a GET, because
    a form's POST address cannot be opened again after sign-in.
    """
    if _is_htmx(request):
        current = urlsplit(request.headers.get("hx-current-url", ""))
        path, query = current.path, current.query
    elif request.method == "GET":
        path, query = request.url.path, request.url.query
    else:
        return None
    page = f"{path}?{query}" if query else path
    # Sign-in lands on the gallery anyway.
    if page == request.app.route_reverse("images:gallery"):
        return None
    return accounts.safe_next(page)


def _signin_url(request: Request[Any, Any, Any]) -> str:
    """Return the sign-in address for a request without a valid session.

    It carries the page to return to, and `ended=1` when the request brought a session
    cookie whose session has ended.
    """
    params = {}
    page = _page_to_return_to(request)
    if page:
        params["next"] = page
    if SESSION_COOKIE in request.cookies:
        params["ended"] = "1"
    url = request.app.route_reverse("accounts:signin-page")
    return f"{url}?{urlencode(params)}" if params else url


def redirect_to_signin(request: Request[Any, Any, Any], _: HTTPException) -> Response[Any]:
    """Send a visitor without a session to the sign-in page, through htmx when it asked."""
    signin_url = _signin_url(request)
    if _is_htmx(request):
        headers = {"HX-Redirect": signin_url}
        return Response("Sign in to continue.", status_code=HTTP_401_UNAUTHORIZED, headers=headers)
    return Redirect(signin_url)


def show_not_found(request: Request[Any, Any, Any], error: HTTPException) -> Response[Any]:
    if _is_htmx(request):
        return Response(error.detail, status_code=HTTP_404_NOT_FOUND, media_type="text/plain")
    context = {"message": error.detail, **_page_context(request)}
    return Template("not_found.html", context=context, status_code=HTTP_404_NOT_FOUND)


def show_error(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """Respond to a failed request with Litestar's JSON, plain text for htmx, or the error page.

    Any exception that is not an HTTPException becomes a 500 whose message appears only in
    the log, where Litestar's exception logging (`log_exceptions` in app.py) writes it with
    its traceback.
    """
    if _expects_json(request):
        return create_exception_response(request, error)

    is_http_error = isinstance(error, HTTPException)
    status_code = error.status_code if is_http_error else HTTP_500_INTERNAL_SERVER_ERROR
    # An HTTPException may carry headers the client needs, such as Allow on a 405.
    headers = error.headers if is_http_error else None
    text = _error_text(status_code)
    if _is_htmx(request):
        message = f"{text.problem} {text.next_step}"
        return Response(message, status_code=status_code, headers=headers, media_type="text/plain")
    reason = HTTPStatus(status_code).phrase
    context = {"status_code": status_code, "reason": reason, "text": text}
    context |= _page_context(request)
    return Template("error.html", context=context, status_code=status_code, headers=headers)


# The exact classes of the errors of Redis or S3 out of reach: Litestar matches the
# exception's own class against `disable_stack_trace`, not its bases.
UNREACHABLE_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
    ConnectionClosedError,
    HTTPClientError,
)


# The base classes that the app hands to show_unavailable, with ClientError, whose status
# decides between 503 and 500.
UNAVAILABLE_BASES = (RedisConnectionError, RedisTimeoutError, S3ConnectionError, HTTPClientError)


def status_of_error(error: Exception) -> int:
    """Return the status of the response the app's exception handlers make for `error`."""
    if isinstance(error, ClientError):
        return 503 if _http_status(error) >= 500 else 500
    if isinstance(error, UNAVAILABLE_BASES):
        return 503
    return getattr(error, "status_code", 500)


def show_unavailable(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """Respond 503 with Retry-After when Redis or S3 is unreachable or failing.

    An S3 error response below 500, such as AccessDenied, is a fault of ours and gets 500.
    """
    if isinstance(error, ClientError) and _http_status(error) < 500:
        return show_error(request, error)
    logger.warning("%s %s: service unavailable: %r", request.method, request.url.path, error)
    text = ERROR_TEXTS[HTTP_503_SERVICE_UNAVAILABLE]
    message = f"{text.problem} {text.next_step}"
    headers = {"Retry-After": str(UNAVAILABLE_RETRY_SECONDS)}
    if _expects_json(request):
        return Response(
            {"error": message}, status_code=HTTP_503_SERVICE_UNAVAILABLE, headers=headers
        )
    if _is_htmx(request):
        return Response(
            message,
            status_code=HTTP_503_SERVICE_UNAVAILABLE,
            headers=headers,
            media_type="text/plain",
        )
    context = {
        "status_code": HTTP_503_SERVICE_UNAVAILABLE,
        "reason": HTTPStatus.SERVICE_UNAVAILABLE.phrase,
        "text": text,
        **_page_context(request),
    }
    return Template(
        "error.html", context=context, status_code=HTTP_503_SERVICE_UNAVAILABLE, headers=headers
    )


def _http_status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500))
