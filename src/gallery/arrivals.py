"""Files that reached S3: move their uploads on to the worker's check.

Four paths find such a file: the page's "done" request, S3's redirect after a form
without JavaScript, the gallery page, and the worker's sweep. All go through
`accept_arrived`, which also takes the file's type when its form pinned none.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis

from gallery import index, jobs, quotas, storage
from gallery.index import Upload
from gallery.storage import ObjectInfo, Storage

logger = logging.getLogger(__name__)

# The file name's extension for each allowed type, added to the name of an upload whose
# form was signed before the file was chosen.
EXTENSIONS = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/heic": ".heic",
    "image/heif": ".heif",
    "image/tiff": ".tiff",
}

REASON_TYPE_NOT_ALLOWED = "only JPEG, PNG, WebP, GIF, HEIC and TIFF images can be uploaded"


async def accept_arrived(
    redis: Redis, store: Storage, upload: Upload, info: ObjectInfo | None
) -> bool:
    """Queue the check of an issued upload whose file `info` describes; False when another
    request or the sweep moved the upload on first.

    The page's "done" request passes no `info`: its form pinned the type, and the worker
    reads the file anyway.

    The form without JavaScript is signed before the file is chosen, so it pins no type
    and its upload has none. S3 stored the type the browser gave the file part, as
    SeaweedFS 4.48 does, and that type is taken here. NOTE: a service that stores another
    type, such as binary/octet-stream, gets every such upload rejected. A type outside the
    allowlist is rejected here, and the worker then checks that the bytes decode as the
    type taken.
    """
    if not await index.mark_uploaded(redis, upload):
        return False
    await quotas.hold(redis, upload.user_id, upload.id)
    if not upload.content_type and info is not None:
        content_type = info.content_type.split(";")[0].strip().lower()
        if content_type not in storage.ALLOWED_UPLOAD_TYPES:
            await store.delete([storage.incoming_key(upload.user_id, upload.id)])
            await index.mark_rejected(redis, upload, REASON_TYPE_NOT_ALLOWED)
            await quotas.release(redis, upload.user_id, upload.id)
            logger.warning("upload %s: posted type %r is not allowed", upload.id, content_type)
            return True
        filename = upload.filename + EXTENSIONS[content_type]
        await index.set_type_and_name(redis, upload, content_type=content_type, filename=filename)
    await jobs.enqueue_verify(redis, upload.id)
    return True
