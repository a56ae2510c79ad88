"""The gallery pages: the grid, upload forms, tiles that follow their job, and delete."""

from __future__ import annotations

import asyncio
import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from botocore.exceptions import BotoCoreError, ClientError
from litestar import HttpMethod, Request, Response, Router, delete, get, post, route
from litestar.di import NamedDependency
from litestar.exceptions import ClientException, NotFoundException
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.plugins.htmx import HTMXRequest, HTMXTemplate
from litestar.response import Redirect, Template
from litestar.status_codes import (
    HTTP_200_OK,
    HTTP_303_SEE_OTHER,
    HTTP_400_BAD_REQUEST,
    HTTP_403_FORBIDDEN,
    HTTP_409_CONFLICT,
    HTTP_429_TOO_MANY_REQUESTS,
)

from gallery import arrivals, index, limits, metrics, quotas, shares, storage, trash
from gallery.accounts import current_user, require_user
from gallery.index import State, Upload
from gallery.settings import Settings
from gallery.storage import Storage
from gallery.tiles import RENDITION_TYPE, make_tiles

logger = logging.getLogger(__name__)

MAX_FILENAME_LENGTH = 255
# The maximum length of the extension, dot included, that shortening a file name keeps.
MAX_EXTENSION_LENGTH = 16

# Seconds in the Retry-After header when too many uploads are pending.
PENDING_RETRY_SECONDS = 5

# How long the gallery page waits for S3 to say which issued uploads have their file.
ARRIVAL_CHECK_SECONDS = 2.0


@dataclass
class UploadRequest:
    filename: str
    content_type: str
    size: int


async def owned_upload(
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
    trashed: FromQuery[str | None] = None,
) -> Template:
    """Render the gallery page, or with `before` and HX-Request only the next page of tiles.

    `trashed` names an image just moved to the trash by a form without JavaScript, for the
    message with Undo; it shows only when it names a trashed image of this user.
    """
    user_id = _user_id(request)
    if not before:
        await _queue_arrived_uploads(redis, store, user_id)
    uploads, next_cursor = await index.list_grid(
        redis, user_id, before=before, limit=settings.page_size
    )
    context = {
        "tiles": await make_tiles(uploads, store),
        "next_cursor": next_cursor,
        "user": current_user(request),
        "settings": settings,
        "allowed_types": storage.ALLOWED_UPLOAD_TYPES,
        "max_share_images": shares.MAX_IMAGES,
        "trashed": await _trashed_upload(redis, user_id, trashed),
    }
    if request.htmx and before:
        return HTMXTemplate(template_name="_grid_page.html", context=context)
    context |= await _summary_context(redis, user_id, settings)
    return Template("gallery.html", context=context)


@get("/images/summary", name="images:summary")
async def show_summary(
    request: HTMXRequest, redis: NamedDependency[ArqRedis], settings: NamedDependency[Settings]
) -> Template | Redirect:
    """Render the gallery page's image count, empty note and quota line, swapped out of band.

    The page requests this on the galleryChanged event, after uploads, deletes and the
    worker's checks.
    """
    if not request.htmx:
        return Redirect(request.app.route_reverse("images:gallery"))
    context = await _summary_context(redis, _user_id(request), settings)
    return HTMXTemplate(template_name="_summary.html", context=context)


async def _summary_context(redis: ArqRedis, user_id: str, settings: Settings) -> dict[str, Any]:
    counts = await index.count_images(redis, user_id)
    return {
        "count": counts.ready,
        "processing": counts.processing,
        "tiles_count": counts.tiles,
        **await upload_limits(redis, user_id, settings, trashed=counts.trashed),
    }


async def upload_limits(
    redis: ArqRedis, user_id: str, settings: Settings, *, trashed: int | None = None
) -> dict[str, Any]:
    """Return the upload page's quota line and the largest file a form may be signed for.

    `trashed` is the number of images in the trash, counted here when not given.
    """
    quota, usage = await quotas.get_quota_and_usage(redis, user_id, settings)
    space_left = usage.space_left(quota)
    largest = settings.max_upload_bytes
    if space_left is not None:
        largest = min(largest, space_left)
    if trashed is None:
        trashed = await index.count_trash(redis, user_id)
    return {
        "quota_text": quotas.describe(quota, usage, trashed),
        "max_file_bytes": largest,
        "max_mib": format_mib(largest),
    }


class UploadRefused(Exception):
    """A form request over a limit, with the message for the user and the HTTP status.

    `retry_after` is the seconds until a retry can succeed, or None when waiting does not
    help, as for a full quota.
    """

    def __init__(self, message: str, status_code: int, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after

    def response(self) -> Response[dict[str, Any]]:
        """Return the JSON response that upload.js reads the message from."""
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else {}
        body = {"error": self.message}
        return Response(body, status_code=self.status_code, headers=headers)


async def issue_upload(
    redis: ArqRedis,
    store: Storage,
    settings: Settings,
    user_id: str,
    *,
    filename: str,
    content_type: str | None,
    max_bytes: int,
    redirect_url: Callable[[str], str] | None = None,
) -> tuple[Upload, storage.UploadForm]:
    """Record an upload and sign its form, within the user's rate and pending limits.

    `redirect_url` makes the S3 redirect URL from the upload id, for a form without
    JavaScript. Raises UploadRefused when a limit is reached.
    """
    limit_name = f"upload-forms:{user_id}"
    wait = await limits.seconds_until_allowed(redis, limit_name, settings.upload_forms_per_minute)
    if wait:
        logger.warning("user %s is over the upload form rate limit", user_id)
        message = f"Too many uploads at once. Wait {wait} seconds, then try again."
        raise UploadRefused(message, HTTP_429_TOO_MANY_REQUESTS, wait)
    await limits.record(redis, limit_name, window_seconds=60)
    try:
        upload = await index.create_upload(
            redis,
            user_id=user_id,
            filename=filename,
            content_type=content_type or "",
            max_bytes=max_bytes,
            form_seconds=settings.upload_form_seconds,
            max_pending=settings.max_pending_uploads,
        )
    except index.TooManyPendingUploads:
        logger.warning("user %s has %d uploads pending", user_id, settings.max_pending_uploads)
        message = (
            f"{settings.max_pending_uploads} uploads are still being checked. "
            "Wait for them to finish, then try again."
        )
        raise UploadRefused(message, HTTP_429_TOO_MANY_REQUESTS, PENDING_RETRY_SECONDS) from None
    try:
        await quotas.reserve(redis, settings, user_id, upload.id, max_bytes, upload.form_expires_at)
    except quotas.OverQuota as over:
        await index.delete_upload(redis, upload)
        logger.warning("user %s is over quota: %s", user_id, over)
        message = f"This file does not fit in your quota. {over} Delete images to free space."
        raise UploadRefused(message, HTTP_403_FORBIDDEN) from None
    form = await store.presign_upload(
        storage.incoming_key(user_id, upload.id),
        content_type=content_type,
        owner=user_id,
        max_bytes=max_bytes,
        expires_in=settings.upload_form_seconds,
        redirect_url=redirect_url(upload.id) if redirect_url else None,
    )
    logger.info("issued upload form %s for user %s", upload.id, user_id)
    await metrics.count(redis, "gallery_upload_forms_issued_total")
    return upload, form


@post("/uploads", name="images:create-upload")
async def create_upload(
    request: Request[Any, Any, Any],
    data: JSONBody[UploadRequest],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
    settings: NamedDependency[Settings],
) -> Response[dict[str, Any]]:
    """Sign a POST form for one file; the browser sends the file to S3 with it."""
    problem = _check_upload_request(data, settings)
    if problem:
        return Response({"error": problem}, status_code=HTTP_400_BAD_REQUEST)
    try:
        upload, form = await issue_upload(
            redis,
            store,
            settings,
            _user_id(request),
            filename=clean_filename(data.filename),
            content_type=data.content_type,
            # The form accepts exactly the size the page reported, so S3 refuses any other.
            max_bytes=data.size,
        )
    except UploadRefused as refused:
        return refused.response()
    body = {
        "id": upload.id,
        "url": form.url,
        "fields": form.fields,
        "expires_at": upload.form_expires_at,
        "complete_url": request.app.route_reverse("images:complete-upload", upload_id=upload.id),
        "cancel_url": request.app.route_reverse("images:cancel-upload", upload_id=upload.id),
    }
    return Response(body)


async def _queue_arrived_uploads(redis: ArqRedis, store: Storage, user_id: str) -> None:
    """Queue the user's issued uploads whose file is in S3 though "done" never came.

    A reload or a closed tab just after a file reached S3 loses the page's "done" request.
    The sweep finds such a file only once its form has expired, minutes later. The gallery
    page looks on each load, so the photo shows up on the reload. One HEAD request per issued
    upload, at most `max_pending_uploads` of them, and none when there are none.
    """
    issued = await index.list_issued(redis, user_id)
    if not issued:
        return
    heads = asyncio.gather(
        *(store.head(storage.incoming_key(user_id, upload.id)) for upload in issued)
    )
    try:
        found = await asyncio.wait_for(heads, ARRIVAL_CHECK_SECONDS)
    except (TimeoutError, ClientError, BotoCoreError) as error:
        # The grid does not need S3: it shows without these, and the sweep finds them.
        logger.warning("user %s: skipped the check of issued uploads: %r", user_id, error)
        return
    for upload, info in zip(issued, found, strict=True):
        if info is not None and await arrivals.accept_arrived(redis, store, upload, info):
            await metrics.count(redis, "gallery_uploads_completed_total", source="gallery_page")


async def _trashed_upload(redis: ArqRedis, user_id: str, image_id: str | None) -> Upload | None:
    if not image_id:
        return None
    upload = await index.get_owned_upload(redis, user_id, image_id)
    return upload if upload is not None and upload.state == State.TRASHED else None


def format_mib(size: int) -> str:
    """Return a byte count in MiB as the pages name limits, such as "25" or "2.5"."""
    return f"{round(size / (1024 * 1024), 1):g}"


# Characters that reorder or hide text: "\u202egpj.exe" would show as "exe.jpg".
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff"
)


def clean_filename(filename: str) -> str:
    """Return a file name without control or direction characters, trimmed, at most 255.

    Joiners stay: scripts such as Persian and Devanagari need them. A longer name is cut
    before its extension, so "long….jpg" still ends in ".jpg".
    """
    printable = "".join(
        char
        for char in filename
        if unicodedata.category(char) != "Cc" and char not in _BIDI_CONTROLS
    ).strip()
    if len(printable) <= MAX_FILENAME_LENGTH:
        return printable
    stem, dot, extension = printable.rpartition(".")
    suffix = dot + extension
    if not stem or len(suffix) > MAX_EXTENSION_LENGTH:
        return printable[:MAX_FILENAME_LENGTH]
    return stem[: MAX_FILENAME_LENGTH - len(suffix)].rstrip() + suffix


def _check_upload_request(data: UploadRequest, settings: Settings) -> str | None:
    """Return what is wrong with a request for an upload form, in words for the user."""
    if not clean_filename(data.filename):
        return "The file has no name."
    if data.content_type not in storage.ALLOWED_UPLOAD_TYPES:
        return "Only JPEG, PNG, WebP, GIF, HEIC and TIFF images can be uploaded."
    if not 1 <= data.size <= settings.max_upload_bytes:
        return f"Files must be between 1 byte and {format_mib(settings.max_upload_bytes)} MiB."
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
    if await arrivals.accept_arrived(redis, store, upload, None):
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
    upload = await owned_upload(redis, _user_id(request), image_id)
    if not request.htmx:
        return Redirect(request.app.route_reverse("images:gallery"))
    tiles = await make_tiles([upload], store)
    # A tile whose check has ended changes the counts and the quota.
    headers = {} if upload.is_processing else trash.GALLERY_CHANGED
    return HTMXTemplate(template_name="_tile.html", context={"tile": tiles[0]}, headers=headers)


@delete("/uploads/{upload_id:str}", name="images:cancel-upload", status_code=HTTP_200_OK)
async def cancel_upload(
    request: Request[Any, Any, Any],
    upload_id: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
) -> Response[str]:
    """Drop an upload whose file was never reported done, with any object already posted.

    The page sends this when the user cancels, and before it retries with a new form.
    """
    upload = await index.get_owned_upload(redis, _user_id(request), upload_id)
    if upload is None or upload.state != State.ISSUED:
        raise NotFoundException("No such upload waiting for its file.")
    if not await trash.delete_forever(redis, store, upload):
        raise NotFoundException("No such upload waiting for its file.")
    return Response("", media_type="text/plain")


@get("/images/{image_id:str}/view", name="images:view")
async def view_image(
    request: HTMXRequest,
    image_id: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
    settings: NamedDependency[Settings],
) -> Template:
    """Show one image at display size, or how far its check has got while it is not ready.

    From a tile or a step in the overlay, htmx gets the overlay alone; opened by its URL,
    it is a page, which refreshes itself while the image is being checked.
    """
    upload = await owned_upload(redis, _user_id(request), image_id)
    context: dict[str, Any] = {"upload": upload, "user": current_user(request)}
    if upload.state != State.READY:
        return Template("status.html", context=context)

    newer, older = await index.grid_neighbours(redis, upload.user_id, upload.id)
    display_width, display_height = fit_within(upload.width, upload.height, settings.display_size)
    context |= {
        "display_url": await store.presign_get(
            storage.display_key(upload.user_id, upload.id), content_type=RENDITION_TYPE
        ),
        "newer": newer,
        "older": older,
        "display_width": display_width,
        "display_height": display_height,
        "size_text": format_size(upload.size),
        "overlay": request.headers.get("x-viewer") == "overlay",
    }
    if request.htmx and not request.htmx.history_restore_request:
        return HTMXTemplate(template_name="_viewer.html", context=context)
    return Template("view.html", context=context)


def fit_within(width: int, height: int, box: int) -> tuple[int, int]:
    """Return the size of an image scaled to fit a square box, never enlarged."""
    scale = min(1.0, box / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def format_size(size: int) -> str:
    """Return a byte count as people read it: "812 KiB" or "3.4 MiB"."""
    if size < 1024 * 1024:
        return f"{max(1, round(size / 1024))} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


@get("/images/{image_id:str}/original", name="images:original")
async def download_original(
    request: Request[Any, Any, Any],
    image_id: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
) -> Redirect:
    """Send the browser to a short-lived URL that downloads the original file."""
    upload = await owned_upload(redis, _user_id(request), image_id, ready=True)
    url = await store.presign_get(
        storage.original_key(upload.user_id, upload.id),
        content_type=upload.content_type,
        download_name=upload.filename,
    )
    return Redirect(url)


@route(
    "/images/{image_id:str}",
    http_method=[HttpMethod.DELETE, HttpMethod.POST],
    name="images:delete",
    status_code=HTTP_200_OK,
)
async def delete_image(
    request: HTMXRequest,
    image_id: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
) -> Response[str] | Redirect:
    """Delete forever an image in the trash, a rejected one, or an upload still processing.

    htmx swaps the tile for the response, which is empty but for a note after Delete forever.
    A ready image gets a 409 and stays: a trash page open since before a restore in another
    tab still offers Delete forever. POST is for the trash page's form without JavaScript,
    which cannot send DELETE.
    """
    upload = await owned_upload(redis, _user_id(request), image_id)
    deleted = upload.state != State.READY and await trash.delete_forever(redis, store, upload)
    if not deleted:
        # Ready, or restored since it was read; a 404 when another request deleted it.
        await owned_upload(redis, _user_id(request), image_id)
        message = f"{upload.filename} is in your gallery, not in the trash, so it was not deleted."
        if request.htmx:
            return Response(message, status_code=HTTP_409_CONFLICT, media_type="text/plain")
        raise ClientException(message, status_code=HTTP_409_CONFLICT)
    if not request.htmx:
        # Back to the page that showed the image: Dismiss and Cancel are in the grid.
        back = "trash:list" if upload.state == State.TRASHED else "images:gallery"
        return Redirect(request.app.route_reverse(back), status_code=HTTP_303_SEE_OTHER)
    # A trashed image is deleted from the trash page, which counts down. The gallery page
    # fetches its counts and quota line again.
    if upload.state == State.TRASHED:
        return HTMXTemplate(
            template_name="_deleted_forever.html",
            context={"upload": upload},
            headers=trash.count_changed(-1),
        )
    return Response("", media_type="text/html", headers=trash.GALLERY_CHANGED)


router = Router(
    path="/",
    guards=[require_user],
    route_handlers=[
        list_images,
        show_summary,
        create_upload,
        complete_upload,
        cancel_upload,
        show_tile,
        view_image,
        download_original,
        delete_image,
    ],
)
