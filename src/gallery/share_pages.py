"""Share link pages: making and managing links for their owner, and the shared pages.

The shared pages are public: anyone with a link's token opens them without an account.
Every image URL on them is signed at that page view and lives `share_url_expiry_seconds`,
with no URL window. So when a link is revoked or expires, or an image is deleted, its
image URLs stop working at most that long after the last page view.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from litestar import Request, Router, get, post
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException, TooManyRequestsException
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Template
from litestar.status_codes import (
    HTTP_201_CREATED,
    HTTP_303_SEE_OTHER,
    HTTP_400_BAD_REQUEST,
    HTTP_409_CONFLICT,
)

from gallery import accounts, index, limits, shares, storage
from gallery.accounts import current_user, require_user
from gallery.index import State, Upload
from gallery.settings import Settings
from gallery.shares import Share
from gallery.storage import Storage
from gallery.tiles import RENDITION_TYPE, Tile, make_tiles

logger = logging.getLogger(__name__)

# The one message for a token that never existed, has expired or was revoked.
LINK_NOT_FOUND = "This link does not exist, has expired or was revoked."

# The choices offered for a new link's expiry and for extending one, in seconds.
EXPIRY_CHOICES = (
    (shares.HOUR, "1 hour"),
    (shares.DAY, "1 day"),
    (3 * shares.DAY, "3 days"),
    (shares.DEFAULT_EXPIRY_SECONDS, "7 days"),
    (14 * shares.DAY, "14 days"),
    (shares.MAX_EXPIRY_SECONDS, "30 days"),
)

# Thumbnails of each link on the manage page; the rest are counted.
MANAGE_THUMBNAILS = 8

# Search engines must not index a shared page, should a link ever be posted publicly.
NO_INDEX = {"X-Robots-Tag": "noindex, nofollow"}


@dataclass(frozen=True)
class ShareRow:
    """One link as the manage page lists it."""

    share: Share
    status: str
    tiles: list[Tile]
    image_count: int


def format_time(timestamp: float) -> str:
    """Format a Unix time for a page, in UTC because the server does not know the reader's zone."""
    return time.strftime("%d %b %Y, %H:%M UTC", time.gmtime(timestamp))


def format_duration(seconds: float) -> str:
    """Say roughly how long `seconds` is, rounded to the largest unit that fits."""
    for unit_seconds, unit in ((shares.DAY, "day"), (shares.HOUR, "hour"), (60, "minute")):
        if seconds >= unit_seconds:
            count = round(seconds / unit_seconds)
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return "less than a minute"


def _user_id(request: Request[Any, Any, Any]) -> str:
    user = current_user(request)
    assert user is not None, "the require_user guard lets only signed-in users through"
    return user.id


def _clean_title(title: str) -> str:
    printable = "".join(char for char in title if unicodedata.category(char) != "Cc")
    return printable.strip()[: shares.MAX_TITLE_LENGTH]


async def _selected_uploads(redis: ArqRedis, user_id: str, image_ids: list[str]) -> list[Upload]:
    """Return the user's ready uploads with these ids, or raise 404 when one is not."""
    unique_ids = list(dict.fromkeys(image_ids))[: shares.MAX_IMAGES + 1]
    uploads = await index.get_uploads(redis, unique_ids)
    owned = [u for u in uploads if u.user_id == user_id and u.state == State.READY]
    if len(owned) != len(unique_ids):
        raise NotFoundException("A selected image was not found. Go back and select again.")
    return owned


@dataclass(frozen=True)
class SelectionProblem:
    """Why a selection cannot be shared: a heading for the page, then what to do."""

    heading: str
    message: str


def _selection_problem(image_ids: list[str]) -> SelectionProblem | None:
    count = len(set(image_ids))
    if count == 0:
        return SelectionProblem(
            "No photos selected",
            "Select at least one photo in your gallery, then choose “Share selected”.",
        )
    if count > shares.MAX_IMAGES:
        return SelectionProblem(
            "Too many photos selected",
            f"A link can hold at most {shares.MAX_IMAGES} photos, and {count} were selected. "
            "Clear some of them in your gallery, then choose “Share selected” again.",
        )
    return None


def _selection_page(request: Request[Any, Any, Any], problem: SelectionProblem) -> Template:
    context = {"user": current_user(request), "problem": problem}
    return Template("share_selection.html", context=context, status_code=HTTP_400_BAD_REQUEST)


def _new_share_page(
    request: Request[Any, Any, Any],
    tiles: list[Tile],
    error: str | None,
    status_code: int,
    **values: Any,
) -> Template:
    context = {
        "user": current_user(request),
        "tiles": tiles,
        "error": error,
        "expiry_choices": EXPIRY_CHOICES,
        "title": values.get("title", "Shared photos"),
        "expires_in": values.get("expires_in", shares.DEFAULT_EXPIRY_SECONDS),
        "allow_originals": values.get("allow_originals", False),
        "show_name": values.get("show_name", False),
    }
    return Template("share_new.html", context=context, status_code=status_code)


@get("/shares/new", name="shares:new")
async def show_new_share(
    request: Request[Any, Any, Any],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
) -> Template:
    """Show the form for a new link to the images selected in the grid or the viewer."""
    image_ids = request.query_params.getall("image_id", [])
    problem = _selection_problem(image_ids)
    if problem:
        return _selection_page(request, problem)
    uploads = await _selected_uploads(redis, _user_id(request), image_ids)
    return _new_share_page(request, await make_tiles(uploads, store), None, 200)


@post("/shares", name="shares:create", status_code=HTTP_201_CREATED)
async def create_share(
    request: Request[Any, Any, Any],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
    settings: NamedDependency[Settings],
) -> Template:
    """Make a link to the selected images and show it, the only time it can be seen."""
    user = current_user(request)
    assert user is not None, "the require_user guard lets only signed-in users through"
    form = await request.form()
    image_ids = form.getall("image_id", [])
    selection_problem = _selection_problem(image_ids)
    if selection_problem:
        return _selection_page(request, selection_problem)
    uploads = await _selected_uploads(redis, user.id, image_ids)
    title = _clean_title(form.get("title", ""))
    expires_in = _parse_seconds(form.get("expires_in", ""))
    values = {
        "title": title,
        "expires_in": expires_in,
        "allow_originals": form.get("allow_originals") == "on",
        "show_name": form.get("show_name") == "on",
    }

    problem = _link_problem(title, expires_in)
    if problem:
        tiles = await make_tiles(uploads, store)
        return _new_share_page(request, tiles, problem, HTTP_400_BAD_REQUEST, **values)
    try:
        share, token = await shares.create_share(
            redis,
            user_id=user.id,
            image_ids=[upload.id for upload in uploads],
            title=title,
            expires_in=expires_in,
            allow_originals=values["allow_originals"],
            owner_name=user.username if values["show_name"] else "",
            max_active=settings.max_active_shares,
        )
    except shares.TooManyActiveShares:
        logger.warning("user %s has %d active share links", user.id, settings.max_active_shares)
        problem = (
            f"You already have {settings.max_active_shares} active links. "
            "Revoke one on the Shared links page, then try again."
        )
        tiles = await make_tiles(uploads, store)
        return _new_share_page(request, tiles, problem, HTTP_409_CONFLICT, **values)
    logger.info("user %s shared %d images as share %s", user.id, len(uploads), share.id)
    link = settings.app_url + request.app.route_reverse("shared:page", token=token)
    context = {
        "user": user,
        "share": share,
        "link": link,
        "expires": format_time(share.expires_at),
    }
    return Template("share_created.html", context=context, status_code=HTTP_201_CREATED)


def _parse_seconds(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        return 0


def _link_problem(title: str, expires_in: int) -> str | None:
    if not title:
        return "Give the link a title."
    if not shares.MIN_EXPIRY_SECONDS <= expires_in <= shares.MAX_EXPIRY_SECONDS:
        return "Choose an expiry from 1 hour to 30 days."
    return None


@get("/shares", name="shares:list")
async def list_shares(
    request: Request[Any, Any, Any],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
    capped: FromQuery[str | None] = None,
) -> Template:
    """List the user's links with their images, expiry, views, and revoke and extend forms.

    `capped` names a link that Extend could not move as far as requested, for a message.
    """
    user_id = _user_id(request)
    now = time.time()
    rows = []
    for share in await shares.list_user_shares(redis, user_id):
        uploads = _visible(await _share_uploads(redis, share), share)
        tiles = await make_tiles(uploads[:MANAGE_THUMBNAILS], store)
        rows.append(ShareRow(share, _status(share, now), tiles, len(uploads)))
    context = {
        "capped": _capped_share(rows, capped, now),
        "rows": rows,
        "user": current_user(request),
        "extend_choices": EXPIRY_CHOICES,
        "default_extend": shares.DEFAULT_EXPIRY_SECONDS,
        "format_time": format_time,
        "format_duration": format_duration,
        "now": now,
    }
    return Template("shares.html", context=context)


def _capped_share(rows: list[ShareRow], share_id: str | None, now: float) -> Share | None:
    """Return the open link `share_id` names while its expiry is within an hour of the limit.

    The note then disappears on a reload once the limit has moved on by an hour.
    """
    limit = now + shares.MAX_EXPIRY_SECONDS
    for row in rows:
        near_limit = row.share.expires_at > limit - shares.HOUR
        if row.share.id == share_id and row.status == "open" and near_limit:
            return row.share
    return None


def _status(share: Share, now: float) -> str:
    if share.revoked_at:
        return "revoked"
    if now >= share.expires_at:
        return "expired"
    return "open"


async def _owned_share(redis: ArqRedis, request: Request[Any, Any, Any], share_id: str) -> Share:
    share = await shares.get_owned_share(redis, _user_id(request), share_id)
    if share is None:
        raise NotFoundException("No such link.")
    return share


@post("/shares/{share_id:str}/revoke", name="shares:revoke")
async def revoke_share(
    request: Request[Any, Any, Any], share_id: FromPath[str], redis: NamedDependency[ArqRedis]
) -> Redirect:
    """Stop a link opening; its image URLs already handed out expire within minutes."""
    share = await _owned_share(redis, request, share_id)
    await shares.revoke(redis, share)
    logger.info("user %s revoked share %s", share.user_id, share.id)
    return Redirect(request.app.route_reverse("shares:list"), status_code=HTTP_303_SEE_OTHER)


@post("/shares/{share_id:str}/extend", name="shares:extend")
async def extend_share(
    request: Request[Any, Any, Any], share_id: FromPath[str], redis: NamedDependency[ArqRedis]
) -> Redirect | Template:
    """Move an open link's expiry later, to at most 30 days from now."""
    share = await _owned_share(redis, request, share_id)
    form = await request.form()
    seconds = _parse_seconds(form.get("seconds", ""))
    if not shares.MIN_EXPIRY_SECONDS <= seconds <= shares.MAX_EXPIRY_SECONDS:
        return _extend_error(request, "Choose how long to extend the link by: 1 hour to 30 days.")
    requested = share.expires_at + seconds
    expires_at = await shares.extend(redis, share, seconds)
    if expires_at is None:
        message = "This link was revoked or has expired. Make a new one instead."
        return _extend_error(request, message)
    logger.info("user %s extended share %s", share.user_id, share.id)
    list_url = request.app.route_reverse("shares:list")
    # The 30-day limit cut the extension short, or the link was at the limit already.
    if expires_at < requested:
        return Redirect(f"{list_url}?capped={share.id}", status_code=HTTP_303_SEE_OTHER)
    return Redirect(list_url, status_code=HTTP_303_SEE_OTHER)


def _extend_error(request: Request[Any, Any, Any], message: str) -> Template:
    context = {"user": current_user(request), "message": message}
    return Template("share_error.html", context=context, status_code=HTTP_400_BAD_REQUEST)


async def _share_uploads(redis: ArqRedis, share: Share) -> list[Upload]:
    return await index.get_uploads(redis, await shares.list_image_ids(redis, share.id))


def _visible(uploads: list[Upload], share: Share) -> list[Upload]:
    """Keep the ready images of the share's owner: a trashed or deleted image never shows."""
    return [u for u in uploads if u.state == State.READY and u.user_id == share.user_id]


async def _open_share(
    request: Request[Any, Any, Any], redis: ArqRedis, settings: Settings, token: str
) -> Share:
    """Return the share a token opens after counting the view against the address's limit.

    Raises 429 when the address is over its limit, and 404 for a token that never existed,
    has expired or was revoked, after the same steps for all three, and for a link whose
    owner's account is disabled.
    """
    address = request.client.host if request.client else "unknown"
    limit_name = f"share-views:{address}"
    wait = await limits.seconds_until_allowed(redis, limit_name, settings.share_views_per_minute)
    if wait:
        logger.warning("share page views throttled for %s", address)
        raise TooManyRequestsException(
            f"Too many page views from your address. Wait {wait} seconds, then reload.",
            headers={"Retry-After": str(wait)},
        )
    await limits.record(redis, limit_name, window_seconds=60)
    share = await shares.find_open_share(redis, token)
    # A disabled owner's links return the same 404 as unknown ones until it is enabled again.
    if share is None or await accounts.is_disabled(redis, share.user_id):
        raise NotFoundException(LINK_NOT_FOUND)
    return share


async def _shared_tiles(uploads: list[Upload], store: Storage, expires_in: int) -> list[Tile]:
    """Make tiles whose thumbnail URLs are signed now and live exactly `expires_in` seconds."""
    tiles = []
    for upload in uploads:
        urls = [
            await store.presign_get(key, content_type=RENDITION_TYPE, expires_in=expires_in)
            for key in (
                storage.thumbnail_key(upload.user_id, upload.id),
                storage.thumbnail_2x_key(upload.user_id, upload.id),
            )
        ]
        tiles.append(Tile(upload, *urls))
    return tiles


def _shared_context(share: Share, token: str, now: float) -> dict[str, Any]:
    return {
        "share": share,
        "token": token,
        "expires": format_time(share.expires_at),
        "expires_in": format_duration(share.expires_at - now),
    }


@get("/s/{token:str}", name="shared:page")
async def show_shared(
    request: Request[Any, Any, Any],
    token: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
    settings: NamedDependency[Settings],
) -> Template:
    """Show a shared link's images as a grid, to anyone with the link."""
    share = await _open_share(request, redis, settings, token)
    uploads = _visible(await _share_uploads(redis, share), share)
    tiles = await _shared_tiles(uploads, store, settings.share_url_expiry_seconds)
    await shares.record_view(redis, share)
    context = {**_shared_context(share, token, time.time()), "tiles": tiles}
    return Template("shared.html", context=context, headers=NO_INDEX)


async def _shared_upload(redis: ArqRedis, share: Share, image_id: str) -> Upload:
    """Return an image of the share, or raise 404 when the share does not show it."""
    upload = await index.get_upload(redis, image_id)
    in_share = await shares.has_image(redis, share.id, image_id)
    if upload is None or not in_share or not _visible([upload], share):
        raise NotFoundException("This link has no such photo.")
    return upload


@get("/s/{token:str}/{image_id:str}", name="shared:view")
async def view_shared_image(
    request: Request[Any, Any, Any],
    token: FromPath[str],
    image_id: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
    settings: NamedDependency[Settings],
) -> Template:
    """Show one shared image at display size, with links to the previous and next ones."""
    share = await _open_share(request, redis, settings, token)
    upload = await _shared_upload(redis, share, image_id)
    visible_ids = [u.id for u in _visible(await _share_uploads(redis, share), share)]
    position = visible_ids.index(upload.id)
    display_url = await store.presign_get(
        storage.display_key(upload.user_id, upload.id),
        content_type=RENDITION_TYPE,
        expires_in=settings.share_url_expiry_seconds,
    )
    context = {
        **_shared_context(share, token, time.time()),
        "upload": upload,
        "display_url": display_url,
        "position": position + 1,
        "count": len(visible_ids),
        "previous_id": visible_ids[position - 1] if position > 0 else None,
        "next_id": visible_ids[position + 1] if position + 1 < len(visible_ids) else None,
    }
    return Template("shared_view.html", context=context, headers=NO_INDEX)


@get("/s/{token:str}/{image_id:str}/original", name="shared:original")
async def download_shared_original(
    request: Request[Any, Any, Any],
    token: FromPath[str],
    image_id: FromPath[str],
    redis: NamedDependency[ArqRedis],
    store: NamedDependency[Storage],
    settings: NamedDependency[Settings],
) -> Redirect:
    """Send the browser to a short-lived URL of the original, when the link allows it."""
    share = await _open_share(request, redis, settings, token)
    if not share.allow_originals:
        raise NotFoundException("This link does not offer original files.")
    upload = await _shared_upload(redis, share, image_id)
    url = await store.presign_get(
        storage.original_key(upload.user_id, upload.id),
        content_type=upload.content_type,
        download_name=upload.filename,
        expires_in=settings.share_url_expiry_seconds,
    )
    return Redirect(url, headers=NO_INDEX)


owner_router = Router(
    path="/",
    guards=[require_user],
    route_handlers=[show_new_share, create_share, list_shares, revoke_share, extend_share],
)

# Deliberately without a guard: these pages open with a link's token alone.
# tests/test_security.py lists them among the public routes.
public_router = Router(
    path="/",
    route_handlers=[show_shared, view_shared_image, download_shared_original],
    opt={"public": True},
)
