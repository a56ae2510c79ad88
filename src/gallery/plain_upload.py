"""Uploading without JavaScript: a plain form that posts to S3, which redirects back here.

S3 appends `bucket`, `key` and `etag` to the redirect URL, and anyone can forge that query
string, so it is ignored. The upload id is in the redirect URL's path, which the form's
policy pins exactly, and the app acts only on an issued upload of the signed-in user.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from arq.connections import ArqRedis
from litestar import Request, Router, get
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import Redirect, Template
from litestar.status_codes import HTTP_303_SEE_OTHER

from gallery import arrivals, images, index, storage
from gallery.accounts import current_user, require_user
from gallery.index import State, Upload
from gallery.settings import Settings
from gallery.storage import Storage

logger = logging.getLogger(__name__)


def _user_id(request: Request[Any, Any, Any]) -> str:
    user = current_user(request)
    assert user is not None, "the require_user guard lets only signed-in users through"
    return user.id


def _plain_form_key(user_id: str) -> str:
    """Return the key of the id of the user's latest upload issued by the plain form page."""
    return f"{index.PREFIX}:plain-form:{user_id}"


@get("/uploads/new", name="images:upload-page")
async def show_upload_form(
    request: Request[Any, Any, Any],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
    settings: NamedDependency[Settings],
) -> Template:
    """Sign a form for one file of any allowed type and show it as a plain HTML form.

    A reload signs the form of the user's last plain upload again while it is unused and
    has at least half its time left, so reloads take no further pending slot or quota. The
    browser does not tell S3 the file's name, so the photo is named by its upload time.
    """
    user_id = _user_id(request)
    context: dict[str, Any] = {
        "user": current_user(request),
        "form_minutes": max(1, settings.upload_form_seconds // 60),
        **await images.upload_limits(redis, user_id, settings),
    }

    def redirect_url(upload_id: str) -> str:
        path = request.app.route_reverse("images:upload-done", upload_id=upload_id)
        return f"{settings.app_url}{path}"

    unused = await _unused_plain_upload(redis, store, settings, user_id)
    if unused is not None:
        return await _show_form_again(store, unused, context, redirect_url(unused.id))

    try:
        upload, form = await images.issue_upload(
            redis,
            store,
            settings,
            user_id,
            filename=time.strftime("Photo %Y-%m-%d %H.%M.%S", time.gmtime()),
            content_type=None,
            max_bytes=context["max_file_bytes"],
            redirect_url=redirect_url,
        )
    except images.UploadRefused as refused:
        context["error"] = refused.message
        headers = {"Retry-After": str(refused.retry_after)} if refused.retry_after else {}
        return Template(
            "upload.html", context=context, status_code=refused.status_code, headers=headers
        )
    await redis.set(_plain_form_key(user_id), upload.id, ex=settings.upload_form_seconds)
    return Template("upload.html", context=context | {"form": form})


async def _show_form_again(
    store: Storage, upload: Upload, context: dict[str, Any], redirect_url: str
) -> Template:
    """Sign an issued upload's form again, with the same key, size limit and expiry time."""
    seconds_left = int(upload.form_expires_at - time.time())
    form = await store.presign_upload(
        storage.incoming_key(upload.user_id, upload.id),
        content_type=None,
        owner=upload.user_id,
        max_bytes=upload.max_bytes,
        expires_in=seconds_left,
        redirect_url=redirect_url,
    )
    context |= {
        "form": form,
        "form_minutes": max(1, seconds_left // 60),
        "max_mib": images.format_mib(upload.max_bytes),
    }
    return Template("upload.html", context=context)


async def _unused_plain_upload(
    redis: ArqRedis, store: Storage, settings: Settings, user_id: str
) -> Upload | None:
    """Return the user's last plain-form upload when its form can be shown again.

    Its form must have at least half its time left, and no file may have been posted with
    it yet, because a second file would replace the first at the same key.
    """
    upload_id = await redis.get(_plain_form_key(user_id))
    if upload_id is None:
        return None
    upload = await index.get_owned_upload(redis, user_id, upload_id.decode())
    if upload is None or upload.state != State.ISSUED:
        return None
    if upload.form_expires_at - time.time() < settings.upload_form_seconds / 2:
        return None
    if await store.head(storage.incoming_key(user_id, upload.id)) is not None:
        return None
    return upload


@get("/uploads/{upload_id:str}/done", name="images:upload-done")
async def finish_plain_upload(
    request: Request[Any, Any, Any],
    upload_id: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
) -> Redirect:
    """Queue the check of a file posted with the plain form, then show its status page.

    A GET, because S3 redirects the browser here. It changes only an issued upload of the
    signed-in user, and only once its object exists, so a forged or repeated request can at
    most queue the check that the real one would have queued.
    """
    upload = await images.owned_upload(redis, _user_id(request), upload_id)
    if upload.state == State.ISSUED:
        # Not posted yet, or a forged redirect: the status page waits, and the worker's sweep
        # deletes the upload once its form has expired.
        info = await store.head(storage.incoming_key(upload.user_id, upload.id))
        if info is not None:
            await arrivals.accept_arrived(redis, store, upload, info)
    status_url = request.app.route_reverse("images:view", image_id=upload.id)
    return Redirect(status_url, status_code=HTTP_303_SEE_OTHER)


router = Router(
    path="/", guards=[require_user], route_handlers=[show_upload_form, finish_plain_upload]
)
