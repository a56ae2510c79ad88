"""Exception handlers that turn expected errors into pages or htmx responses."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.response import Redirect, Template
from litestar.status_codes import HTTP_401_UNAUTHORIZED, HTTP_404_NOT_FOUND


def redirect_to_signin(request: Request[Any, Any, Any], _: HTTPException) -> Response[Any]:
    """Send a visitor without a session to the sign-in page, through htmx when it asked."""
    signin_url = request.app.route_reverse("accounts:signin-page")
    if request.headers.get("hx-request") == "true":
        headers = {"HX-Redirect": signin_url}
        return Response("Sign in to continue.", status_code=HTTP_401_UNAUTHORIZED, headers=headers)
    return Redirect(signin_url)


def show_not_found(request: Request[Any, Any, Any], error: HTTPException) -> Response[Any]:
    if request.headers.get("hx-request") == "true":
        return Response(error.detail, status_code=HTTP_404_NOT_FOUND, media_type="text/plain")
    context = {"message": error.detail}
    return Template("not_found.html", context=context, status_code=HTTP_404_NOT_FOUND)
