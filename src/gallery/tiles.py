"""Tiles: uploads as the grid and the trash show them, with presigned thumbnail URLs."""

from __future__ import annotations

from dataclasses import dataclass

from gallery import storage
from gallery.index import State, Upload
from gallery.storage import Storage

# The type of every rendition the worker makes.
RENDITION_TYPE = "image/webp"

# States whose thumbnails exist in the bucket.
STATES_WITH_THUMBNAILS = (State.READY, State.TRASHED)


@dataclass(frozen=True)
class Tile:
    """An upload as the grid shows it, with its thumbnail URLs once it is ready."""

    upload: Upload
    thumbnail_url: str | None = None
    thumbnail_2x_url: str | None = None


async def make_tiles(uploads: list[Upload], store: Storage) -> list[Tile]:
    """Make the tiles for uploads, with 1x and 2x thumbnail URLs where thumbnails exist.

    The URLs are signed in process, so this sends no request to S3. Inside one URL window
    they are the same on every call, so the browser shows its cached thumbnails.
    """
    tiles = []
    for upload in uploads:
        if upload.state not in STATES_WITH_THUMBNAILS:
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
