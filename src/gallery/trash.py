"""The trash: images deleted from the grid, kept until restored, deleted forever or purged.

`delete_forever` is the one place where an image's objects and record are removed for good.
The delete buttons, the trash page, cancelled uploads and the purge job all go through it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from arq.connections import ArqRedis
from litestar import Request, Router, get, post
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, FromQuery
from litestar.plugins.htmx import HTMXRequest
from litestar.response import Redirect, Template
from litestar.status_codes import HTTP_200_OK, HTTP_303_SEE_OTHER
from redis.asyncio import Redis

from gallery import index, quotas, shares, storage
from gallery.accounts import current_user, require_user
from gallery.index import State, Upload
from gallery.settings import Settings
from gallery.storage import Storage
from gallery.tiles import make_tiles

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 24 * 3600

# The most trashed images the trash page lists.
TRASH_PAGE_LIMIT = 500


async def delete_forever(redis: Redis, store: Storage, upload: Upload) -> bool:
    """Delete an image's objects, then its record, grid and trash entries, for good.

    Returns False, deleting nothing, when the image is ready or gone, for example when it
    was restored in another tab after the caller read it. The record is claimed first, so a restore cannot
    come between the check and the delete. The objects go before the record, so a failure
    leaves a record that the next attempt finds again instead of objects that nothing
    points to. After such a failure the claim is taken back, so the image can still be
    restored.
    """
    if not await index.claim_delete(redis, upload):
        return False
    try:
        await store.delete(storage.image_keys(upload.user_id, upload.id))
    except BaseException:
        await index.release_delete(redis, upload)
        raise
    await index.delete_upload(redis, upload)
    await quotas.release(redis, upload.user_id, upload.id)
    await shares.remove_image(redis, upload.id)
    logger.info("deleted image %s of user %s forever", upload.id, upload.user_id)
    return True


async def purge_expired(
    redis: Redis, store: Storage, *, retention_days: int, now: float | None = None
) -> int:
    """Delete forever the images that went to the trash over `retention_days` ago.

    Returns how many it deleted.
    """
    cutoff = (time.time() if now is None else now) - retention_days * SECONDS_PER_DAY
    expired = await index.expired_trash(redis, cutoff)
    deleted = 0
    for upload in expired:
        # Restored since the listing: it is back in the grid and stays.
        if upload.state == State.TRASHED and await delete_forever(redis, store, upload):
            deleted += 1
    return deleted


def _user_id(request: Request[Any, Any, Any]) -> str:
    user = current_user(request)
    assert user is not None, "the require_user guard lets only signed-in users through"
    return user.id


async def _owned(redis: Redis, request: Request[Any, Any, Any], image_id: str) -> Upload:
    upload = await index.get_owned_upload(redis, _user_id(request), image_id)
    if upload is None:
        raise NotFoundException("No such image.")
    return upload


async def _tag_trashed(store: Storage, upload: Upload, trashed_at: float | None) -> bool:
    """Tag the original with the time it went to the trash, or untag it for None.

    Returns False when the original does not exist.
    """
    tags = {} if trashed_at is None else {storage.TRASHED_AT_TAG: repr(trashed_at)}
    return await store.tag_object(storage.original_key(upload.user_id, upload.id), tags)


def count_changed(delta: int) -> dict[str, str]:
    """Return the htmx header that triggers the trash page's countChanged event with `delta`."""
    return {"HX-Trigger": json.dumps({"countChanged": delta})}


# The htmx header after a change to the grid or the quota, on which the gallery page
# fetches its image count and quota line again.
GALLERY_CHANGED = {"HX-Trigger": "galleryChanged"}


@get("/trash", name="trash:list")
async def show_trash(
    request: Request[Any, Any, Any],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
    settings: NamedDependency[Settings],
    restored: FromQuery[str | None] = None,
) -> Template:
    """List the user's trashed images, with Restore and Delete forever on each.

    `restored` names an image just restored by a form without JavaScript, for a message;
    it shows only when it names a ready image of this user.
    """
    user_id = _user_id(request)
    uploads = await index.list_trash(redis, user_id, limit=TRASH_PAGE_LIMIT)
    restored_upload = await index.get_owned_upload(redis, user_id, restored) if restored else None
    if restored_upload is not None and restored_upload.state != State.READY:
        restored_upload = None
    context = {
        "restored": restored_upload,
        "tiles": await make_tiles(uploads, store),
        "count": await index.count_trash(redis, user_id),
        "retention_days": settings.trash_retention_days,
        "user": current_user(request),
    }
    return Template("trash.html", context=context)


@post("/images/{image_id:str}/trash", name="trash:move", status_code=HTTP_200_OK)
async def move_to_trash(
    request: HTMXRequest,
    image_id: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
) -> Template | Redirect:
    """Move a ready image to the trash; the page shows a message with Undo.

    The original is tagged first, so the trash survives a rebuild of the index from the
    bucket. If Redis fails after that, the image stays in the grid with the tag until the
    user tries again.
    """
    upload = await _owned(redis, request, image_id)
    trashed_at = time.time()
    if upload.state != State.READY or not await _tag_trashed(store, upload, trashed_at):
        raise NotFoundException("That image is not in your gallery.")
    if not await index.trash_upload(redis, upload, now=trashed_at):
        raise NotFoundException("That image is not in your gallery.")
    logger.info("moved image %s of user %s to the trash", upload.id, upload.user_id)
    gallery_url = request.app.route_reverse("images:gallery")
    if not request.htmx:
        return Redirect(f"{gallery_url}?trashed={upload.id}", status_code=HTTP_303_SEE_OTHER)
    context = {"upload": upload, "in_place": True}
    return Template("_trashed.html", context=context, headers=GALLERY_CHANGED)


@post("/images/{image_id:str}/restore", name="trash:restore", status_code=HTTP_200_OK)
async def restore_image(
    request: HTMXRequest,
    image_id: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
    back_to: FromQuery[str | None] = None,
) -> Template | Redirect:
    """Take an image out of the trash, back to its place in the grid.

    Undo in the grid gets the tile back, with a note in place of the Undo notice. The trash
    page gets its entry removed. Without JavaScript, the browser goes back to the gallery
    when `back_to` is "gallery", and otherwise to the trash page.
    """
    upload = await _owned(redis, request, image_id)
    if upload.state != State.TRASHED or not await _tag_trashed(store, upload, None):
        raise NotFoundException("That image is not in the trash.")
    if not await index.untrash_upload(redis, upload):
        raise NotFoundException("That image is not in the trash.")
    logger.info("restored image %s of user %s", upload.id, upload.user_id)
    if not request.htmx:
        if back_to == "gallery":
            gallery_url = request.app.route_reverse("images:gallery")
            return Redirect(gallery_url, status_code=HTTP_303_SEE_OTHER)
        trash_url = request.app.route_reverse("trash:list")
        return Redirect(f"{trash_url}?restored={upload.id}", status_code=HTTP_303_SEE_OTHER)
    if request.htmx.target == f"trashed-{upload.id}":
        tiles = await make_tiles([upload], store)
        return Template("_undone.html", context={"tile": tiles[0]}, headers=GALLERY_CHANGED)
    context = {"upload": upload}
    return Template("_restored.html", context=context, headers=count_changed(-1))


router = Router(
    path="/", guards=[require_user], route_handlers=[show_trash, move_to_trash, restore_image]
)
