"""The gallery pages: the grid, upload forms, tiles that follow their job, and delete."""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from litestar import Request, Response, Router, delete, get, post
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.plugins.htmx import HTMXRequest, HTMXTemplate
from litestar.response import Redirect, Template
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_303_SEE_OTHER,
    HTTP_400_BAD_REQUEST,
    HTTP_403_FORBIDDEN,
    HTTP_429_TOO_MANY_REQUESTS,
)

from gallery import index, jobs, limits, metrics, quotas, shares, storage
from gallery.accounts import current_user, require_user
from gallery.index import State, Upload
from gallery.settings import Settings
from gallery.storage import Storage

logger = logging.getLogger(__name__)

MAX_FILENAME_LENGTH = 255

# The type of every rendition the worker makes.
RENDITION_TYPE = "image/webp"

# Seconds in the Retry-After header when too many uploads are pending.
PENDING_RETRY_SECONDS = 5


@dataclass(frozen=True)
class Tile:
    """An upload as the grid shows it, with its thumbnail URLs once it is ready."""

    upload: Upload
    thumbnail_url: str | None = None
    thumbnail_2x_url: str | None = None


@dataclass
class UploadRequest:
    filename: str
    content_type: str
    size: int


async def make_tiles(uploads: list[Upload], store: Storage) -> list[Tile]:
    """Make the tiles for uploads, with 1x and 2x thumbnail URLs for the ready ones.

    The URLs are signed in process, so this sends no request to S3. Inside one URL window
    they are the same on every call, so the browser shows its cached thumbnails.
    """
    tiles = []
    for upload in uploads:
        if upload.state != State.READY:
            tiles.append(Tile(upload))
            continue
        url = await store.presign_get(
            storage.thumbnail_key(upload.user_id, upload.id), content_type=RENDITION_TYPE
        )
        url_2x = await store.presign_get(
            storage.thumbnail_2x_key(upload.user_id, upload.id), content_type=RENDITION_TYPE
        )
        tiles.append(Tile(upload, url, url_2x))
    return tiles


async def _owned_upload(
    redis: ArqRedis, user_id: str, image_id: str, *, ready: bool = False
) -> Upload:
    """Return the user's upload, or raise 404 when it is another's, missing, or not ready."""
    upload = await index.get_owned_upload(redis, user_id, image_id)
    if upload is None or (ready and upload.state != State.READY):
        raise NotFoundException("No such image.")
    return upload


def _user_id(request: Request[Any, Any, Any]) -> str:
    user = current_user(request)
    assert user is not None, "the require_user guard lets only signed-in users through"
    return user.id


@get("/", name="images:home")
async def show_home(request: Request[Any, Any, Any]) -> Redirect:
    if current_user(request) is None:
        return Redirect(request.app.route_reverse("accounts:signin-page"))
    return Redirect(request.app.route_reverse("images:gallery"))


@get("/images", name="images:gallery")
async def list_images(
    request: HTMXRequest,
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
    settings: NamedDependency[Settings],
    before: FromQuery[str | None] = None,
) -> Template:
    """Render the gallery page, or with `before` and HX-Request only the next page of tiles."""
    user_id = _user_id(request)
    uploads, next_cursor = await index.list_grid(
        redis, user_id, before=before, limit=settings.page_size
    )
    context = {
        "tiles": await make_tiles(uploads, store),
        "next_cursor": next_cursor,
        "count": await index.count_grid(redis, user_id),
        "user": current_user(request),
        "settings": settings,
        "allowed_types": storage.ALLOWED_UPLOAD_TYPES,
    }
    if request.htmx and before:
        return HTMXTemplate(template_name="_grid_page.html", context=context)
    context |= await _upload_limits(redis, user_id, settings)
    return Template("gallery.html", context=context)


async def _upload_limits(redis: ArqRedis, user_id: str, settings: Settings) -> dict[str, Any]:
    """Return the upload page's quota line and the largest file a form may be signed for."""
    quota, usage = await quotas.get_quota_and_usage(redis, user_id, settings)
    space_left = usage.space_left(quota)
    largest = settings.max_upload_bytes
    if space_left is not None:
        largest = min(largest, space_left)
    return {"quota_text": quotas.describe(quota, usage), "max_file_bytes": largest}


@post("/uploads", name="images:create-upload")
async def create_upload(
    request: Request[Any, Any, Any],
    data: JSONBody[UploadRequest],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
    settings: NamedDependency[Settings],
) -> Response[dict[str, Any]]:
    """Sign a POST form for one file; the browser sends the file to S3 with it."""
    user_id = _user_id(request)
    problem = _check_upload_request(data, settings)
    if problem:
        return Response({"error": problem}, status_code=HTTP_400_BAD_REQUEST)

    limit_name = f"upload-forms:{user_id}"
    wait = await limits.seconds_until_allowed(redis, limit_name, settings.upload_forms_per_minute)
    if wait:
        logger.warning("user %s is over the upload form rate limit", user_id)
        message = f"Too many uploads at once. Wait {wait} seconds, then try again."
        return _too_many_requests(message, wait)
    await limits.record(redis, limit_name, window_seconds=60)
    try:
        upload = await index.create_upload(
            redis,
            user_id=user_id,
            filename=clean_filename(data.filename),
            content_type=data.content_type,
            # The form accepts exactly the size the page reported, so S3 refuses any other.
            max_bytes=data.size,
            form_seconds=settings.upload_form_seconds,
            max_pending=settings.max_pending_uploads,
        )
    except index.TooManyPendingUploads:
        logger.warning("user %s has %d uploads pending", user_id, settings.max_pending_uploads)
        message = (
            f"{settings.max_pending_uploads} uploads are still being checked. "
            "Wait for them to finish, then try again."
        )
        return _too_many_requests(message, PENDING_RETRY_SECONDS)
    try:
        await quotas.reserve(
            redis, settings, user_id, upload.id, upload.max_bytes, upload.form_expires_at
        )
    except quotas.OverQuota as over:
        await index.delete_upload(redis, upload)
        logger.warning("user %s is over quota: %s", user_id, over)
        message = f"This file does not fit in your quota. {over} Delete images to free space."
        return Response({"error": message}, status_code=HTTP_403_FORBIDDEN)
    form = await store.presign_upload(
        storage.incoming_key(user_id, upload.id),
        content_type=upload.content_type,
        owner=user_id,
        max_bytes=upload.max_bytes,
        expires_in=settings.upload_form_seconds,
    )
    logger.info("issued upload form %s for user %s", upload.id, user_id)
    await metrics.count(redis, "gallery_upload_forms_issued_total")
    complete_url = request.app.route_reverse("images:complete-upload", upload_id=upload.id)
    body = {"id": upload.id, "url": form.url, "fields": form.fields, "complete_url": complete_url}
    return Response(body)


def _too_many_requests(message: str, retry_after: int) -> Response[dict[str, Any]]:
    headers = {"Retry-After": str(retry_after)}
    return Response({"error": message}, status_code=HTTP_429_TOO_MANY_REQUESTS, headers=headers)


def clean_filename(filename: str) -> str:
    """Return a file name without control characters, trimmed, at most 255 characters."""
    printable = "".join(char for char in filename if unicodedata.category(char) != "Cc")
    return printable.strip()[:MAX_FILENAME_LENGTH]


def _check_upload_request(data: UploadRequest, settings: Settings) -> str | None:
    """Return what is wrong with a request for an upload form, in words for the user."""
    if not clean_filename(data.filename):
        return "The file has no name."
    if data.content_type not in storage.ALLOWED_UPLOAD_TYPES:
        return "Only JPEG, PNG, WebP, GIF, HEIC and TIFF images can be uploaded."
    if not 1 <= data.size <= settings.max_upload_bytes:
        limit_mib = settings.max_upload_bytes / (1024 * 1024)
        return f"Files must be between 1 byte and {limit_mib:g} MiB."
    return None


@post("/uploads/{upload_id:str}/complete", name="images:complete-upload", status_code=HTTP_200_OK)
async def complete_upload(
    request: HTMXRequest,
    upload_id: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
) -> Template | Redirect:
    """Queue verification of a file the browser has posted to S3, and return its tile."""
    user_id = _user_id(request)
    upload = await index.get_owned_upload(redis, user_id, upload_id)
    if upload is None:
        raise NotFoundException("No such upload.")
    if await index.mark_uploaded(redis, upload):
        await quotas.hold(redis, user_id, upload.id)
        await jobs.enqueue_verify(redis, upload.id)
        await metrics.count(redis, "gallery_uploads_completed_total", source="browser")
    if not request.htmx:
        return Redirect(request.app.route_reverse("images:gallery"), status_code=HTTP_303_SEE_OTHER)
    tiles = await make_tiles([upload], store)
    return HTMXTemplate(template_name="_tile.html", context={"tile": tiles[0]})


@get("/images/{image_id:str}/tile", name="images:tile")
async def show_tile(
    request: HTMXRequest,
    image_id: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
) -> Template | Redirect:
    """Render one tile; a tile still processing polls this until its job is done."""
    upload = await _owned_upload(redis, _user_id(request), image_id)
    if not request.htmx:
        return Redirect(request.app.route_reverse("images:gallery"))
    tiles = await make_tiles([upload], store)
    return HTMXTemplate(template_name="_tile.html", context={"tile": tiles[0]})


@get("/images/{image_id:str}/view", name="images:view")
async def view_image(
    request: HTMXRequest,
    image_id: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
) -> Template:
    """Show one image at display size, with its name and a download link."""
    upload = await _owned_upload(redis, _user_id(request), image_id, ready=True)
    display_url = await store.presign_get(
        storage.display_key(upload.user_id, upload.id), content_type=RENDITION_TYPE
    )
    context = {"upload": upload, "display_url": display_url, "user": current_user(request)}
    return Template("view.html", context=context)


@get("/images/{image_id:str}/original", name="images:original")
async def download_original(
    request: Request[Any, Any, Any],
    image_id: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
) -> Redirect:
    """Send the browser to a short-lived URL that downloads the original file."""
    upload = await _owned_upload(redis, _user_id(request), image_id, ready=True)
    url = await store.presign_get(
        storage.original_key(upload.user_id, upload.id),
        content_type=upload.content_type,
        download_name=upload.filename,
    )
    return Redirect(url)


@delete("/images/{image_id:str}", name="images:delete", status_code=HTTP_200_OK)
async def delete_image(
    request: HTMXRequest,
    image_id: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
) -> Response[str]:
    """Delete an image's objects and index entry; htmx swaps the tile for the empty body."""
    user_id = _user_id(request)
    upload = await _owned_upload(redis, user_id, image_id)
    await store.delete(storage.image_keys(user_id, upload.id))
    await index.delete_upload(redis, upload)
    await quotas.release(redis, user_id, upload.id)
    await shares.remove_image(redis, upload.id)
    logger.info("deleted image %s of user %s", upload.id, user_id)
    return Response("", media_type="text/html")


router = Router(
    path="/",
    guards=[require_user],
    route_handlers=[
        list_images,
        create_upload,
        complete_upload,
        show_tile,
        view_image,
        download_original,
        delete_image,
    ],
)
