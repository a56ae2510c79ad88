"""The S3 bucket: key layout, presigned upload forms and URLs, and object reads and writes.

This is the only module that talks to S3. Every key is derived here from a user id and an
image id that the server made, never from anything a client sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aioboto3
from botocore.config import Config
from botocore.exceptions import ClientError

from gallery.settings import Settings
from gallery.signing import GetUrlSigner, HeaderSigner, window_start
from gallery.storage.objects import ObjectClient, ObjectInfo, StoredObject

logger = logging.getLogger(__name__)

# Content types an upload form may be signed for. Never SVG or HTML, because a browser
# runs the scripts inside them. Browsers cannot show HEIC or TIFF, but only the worker's
# WebP renditions are ever shown.
ALLOWED_UPLOAD_TYPES = (
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/gif",
    "image/heic",
    "image/heif",
    "image/tiff",
)

# Error codes of a HEAD or GET of a key that does not exist.
_NOT_FOUND_CODES = ("404", "NoSuchKey", "NotFound")

# DeleteObjects takes at most this many keys per request.
DELETE_BATCH_SIZE = 1000

# The tag on an original in the trash, with the Unix time it went there, so that
# `gallery reindex` can put it back in the trash and not in the grid.
TRASHED_AT_TAG = "trashed-at"

# Renditions never change under their key, so a browser may keep them as long as it likes.
RENDITION_CACHE_CONTROL = "private, max-age=31536000, immutable"

# Lifecycle rules that ensure_bucket sets. S3 deletes upload objects that no worker
# finished, and the parts of multipart uploads never completed, this many days after they
# were created.
EXPIRE_INCOMING_RULE_ID = "expire-incoming-uploads"
ABORT_MULTIPART_RULE_ID = "abort-incomplete-multipart-uploads"
INCOMING_EXPIRY_DAYS = 1
MULTIPART_ABORT_DAYS = 1

# The ID of the CORS rule that ensure_bucket sets, which lets browsers on the gallery's
# origins post upload forms and load images. Rules with other IDs belong to the operator.
CORS_RULE_ID = "gallery-browser-uploads"
CORS_MAX_AGE_SECONDS = 3600

# Every upload lands under this prefix until the worker has checked it, so one lifecycle
# rule can expire what was never checked.
INCOMING_LIFECYCLE_PREFIX = "incoming/"


def incoming_key(user_id: str, upload_id: str) -> str:
    """Return the key a browser uploads to, before the worker has checked the file."""
    return f"{INCOMING_LIFECYCLE_PREFIX}{user_id}/{upload_id}"


# Every stored image lives under this prefix, in one folder per user.
IMAGES_PREFIX = "u/"


def user_folder(user_id: str) -> str:
    return f"{IMAGES_PREFIX}{user_id}/"


def original_key(user_id: str, image_id: str) -> str:
    return f"u/{user_id}/o/{image_id}"


def thumbnail_key(user_id: str, image_id: str) -> str:
    return f"u/{user_id}/t/{image_id}.webp"


def thumbnail_2x_key(user_id: str, image_id: str) -> str:
    return f"u/{user_id}/t2/{image_id}.webp"


def display_key(user_id: str, image_id: str) -> str:
    return f"u/{user_id}/d/{image_id}.webp"


def rendition_keys(user_id: str, image_id: str) -> list[str]:
    """Return the keys of the WebP renditions the worker makes of an image."""
    return [
        thumbnail_key(user_id, image_id),
        thumbnail_2x_key(user_id, image_id),
        display_key(user_id, image_id),
    ]


def image_keys(user_id: str, image_id: str) -> list[str]:
    """Return every key an image may have, whatever state it reached."""
    return [
        incoming_key(user_id, image_id),
        original_key(user_id, image_id),
        *rendition_keys(user_id, image_id),
    ]


@dataclass(frozen=True)
class UploadForm:
    """A presigned POST: the URL the browser posts to and the fields it must send."""

    url: str
    fields: dict[str, str]


class Storage:
    """One bucket, reached through two clients, an object client and a GET URL signer.

    The client for work and the object client, which reads, writes and deletes single
    objects for the worker at less cost, name the endpoint the server reaches. The
    presigning client, for upload forms, and the URL signer name the endpoint the browser
    reaches, because SigV4 signs the host. `clock` returns the Unix time that GET URLs are
    signed with. A Storage without clients, as benchmarks and tests make, only signs URLs.
    """

    def __init__(
        self,
        client: Any,
        presign_client: Any,
        settings: Settings,
        *,
        objects: ObjectClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._presign_client = presign_client
        self._objects = objects
        self.bucket = settings.s3_bucket
        self._settings = settings
        # The same endpoint, region and path-style addressing as the presigning client.
        self._url_signer = GetUrlSigner(**_signer_options(settings, settings.presign_endpoint_url))
        self.clock = clock

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Storage]:
        """Open the S3 clients for the lifetime of the context."""
        session = aioboto3.Session(
            aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=settings.aws_secret_access_key,
            region_name=settings.s3_region,
        )
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
        )
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(
                session.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)
            )
            presign_client = await stack.enter_async_context(
                session.client("s3", endpoint_url=settings.presign_endpoint_url, config=config)
            )
            http = await stack.enter_async_context(
                ObjectClient.open_session(settings.s3_endpoint_url)
            )
            signer = HeaderSigner(**_signer_options(settings, settings.s3_endpoint_url))
            yield cls(client, presign_client, settings, objects=ObjectClient(http, signer))

    async def ensure_bucket(self, allowed_origins: Iterable[str]) -> None:
        """Create the bucket if it is missing, keep it private and set its CORS and lifecycle.

        Only the gallery's own CORS and lifecycle rules, found by their IDs, are replaced,
        so rules that an operator added stay, and running it again is safe.
        """
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if _error_code(error) not in ("404", "NoSuchBucket", "NotFound"):
                raise
            await self._client.create_bucket(Bucket=self.bucket)
            logger.info("created bucket %s", self.bucket)
        await self._block_public_access()
        await self._put_cors_rule(cors_rule(allowed_origins))
        await self._put_lifecycle_rules()

    async def _block_public_access(self) -> None:
        try:
            await self._client.put_public_access_block(
                Bucket=self.bucket,
                PublicAccessBlockConfiguration={
                    "BlockPublicAcls": True,
                    "IgnorePublicAcls": True,
                    "BlockPublicPolicy": True,
                    "RestrictPublicBuckets": True,
                },
            )
        except ClientError as error:
            # SeaweedFS 4.48 returns 501 NotImplemented. Its buckets have no public ACL or
            # policy unless one is set, and `gallery doctor` checks anonymous access.
            if _error_code(error) != "NotImplemented":
                raise
            logger.info(
                "S3 does not implement PutPublicAccessBlock; bucket %s keeps its ACL and policy",
                self.bucket,
            )

    async def _put_cors_rule(self, rule: dict[str, Any]) -> None:
        # PutBucketCors replaces the whole configuration, so the operator's rules are read
        # and written back with ours.
        try:
            current = await self.bucket_cors_rules()
        except ClientError as error:
            if _error_code(error) != "NoSuchCORSConfiguration":
                raise
            current = []
        rules = merge_rules(current, [rule], is_ours=_is_our_cors_rule)
        await self._client.put_bucket_cors(
            Bucket=self.bucket, CORSConfiguration={"CORSRules": rules}
        )

    async def _put_lifecycle_rules(self) -> None:
        try:
            response = await self._read_lifecycle()
            rules = merge_rules(
                response.get("Rules", []), lifecycle_rules(), is_ours=_is_our_lifecycle_rule
            )
            extra = {}
            # AWS S3 sets this back to its default when a new configuration leaves it out.
            if "TransitionDefaultMinimumObjectSize" in response:
                extra["TransitionDefaultMinimumObjectSize"] = response[
                    "TransitionDefaultMinimumObjectSize"
                ]
            await self._client.put_bucket_lifecycle_configuration(
                Bucket=self.bucket, LifecycleConfiguration={"Rules": rules}, **extra
            )
        except ClientError as error:
            if _error_code(error) != "NotImplemented":
                raise
            logger.warning(
                "S3 does not implement PutBucketLifecycleConfiguration; bucket %s keeps "
                "abandoned uploads until the worker purges them",
                self.bucket,
            )

    async def check_bucket(self) -> None:
        """Raise unless the bucket exists and these credentials may use it."""
        await self._client.head_bucket(Bucket=self.bucket)

    async def may_read_bucket_acl(self) -> bool | None:
        """Return whether these credentials may read the bucket's ACL, or None when unknown.

        A read changes nothing, so `gallery doctor` can ask on any S3 service. Probing a
        write such as PutBucketPolicy with an invalid document is not safe: moto 5.2.5
        stores whatever it is sent.
        """
        try:
            await self._client.get_bucket_acl(Bucket=self.bucket)
        except ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if _error_code(error) in ("AccessDenied", "Forbidden") or status in (401, 403):
                return False
            return None
        return True

    async def bucket_cors_rules(self) -> list[dict[str, Any]]:
        response = await self._client.get_bucket_cors(Bucket=self.bucket)
        return response["CORSRules"]

    async def bucket_lifecycle_rules(self) -> list[dict[str, Any]]:
        """Return the bucket's lifecycle rules, or an empty list when it has none."""
        return (await self._read_lifecycle()).get("Rules", [])

    async def _read_lifecycle(self) -> dict[str, Any]:
        """Return the bucket's lifecycle configuration, or an empty dict when it has none."""
        try:
            return await self._client.get_bucket_lifecycle_configuration(Bucket=self.bucket)
        except ClientError as error:
            if _error_code(error) == "NoSuchLifecycleConfiguration":
                return {}
            raise

    async def object_tags(self, key: str) -> dict[str, str]:
        response = await self._client.get_object_tagging(Bucket=self.bucket, Key=key)
        return {tag["Key"]: tag["Value"] for tag in response["TagSet"]}

    async def tag_object(self, key: str, tags: dict[str, str]) -> bool:
        """Replace an object's tags with `tags`; False when the object does not exist."""
        tag_set = [{"Key": name, "Value": value} for name, value in tags.items()]
        try:
            if tag_set:
                await self._client.put_object_tagging(
                    Bucket=self.bucket, Key=key, Tagging={"TagSet": tag_set}
                )
            else:
                await self._client.delete_object_tagging(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _error_code(error) in _NOT_FOUND_CODES:
                return False
            raise
        return True

    async def presign_upload(
        self,
        key: str,
        *,
        content_type: str | None,
        owner: str,
        max_bytes: int,
        expires_in: int,
        redirect_url: str | None = None,
    ) -> UploadForm:
        """Sign a POST form that accepts one file at exactly this key.

        With a `content_type`, the form pins that one type. Without one, for a plain HTML
        form whose file type is unknown until it is posted, the form carries no type, and
        the caller must check the type S3 stored before it trusts the object. With a
        `redirect_url`, S3 sends the browser there after the upload (303), pinned exactly.
        """
        if content_type is not None and content_type not in ALLOWED_UPLOAD_TYPES:
            raise ValueError(f"content type {content_type!r} is not one of {ALLOWED_UPLOAD_TYPES}")
        fields = {"x-amz-meta-owner": owner}
        if content_type is not None:
            fields["Content-Type"] = content_type
        if redirect_url is None:
            fields["success_action_status"] = "201"
        else:
            fields["success_action_redirect"] = redirect_url
        # generate_presigned_post adds the exact bucket and key conditions itself.
        conditions: list[Any] = [
            ["content-length-range", 1, max_bytes],
            *({name: value} for name, value in fields.items()),
        ]
        form = await self._presign_client.generate_presigned_post(
            Bucket=self.bucket,
            Key=key,
            Fields=fields,
            Conditions=conditions,
            ExpiresIn=expires_in,
        )
        return UploadForm(url=form["url"], fields=form["fields"])

    async def presign_get(
        self,
        key: str,
        *,
        content_type: str,
        download_name: str | None = None,
        expires_in: int | None = None,
    ) -> str:
        """Sign a short-lived GET URL for one object, served as the given verified type.

        The object is shown inline, or downloaded under `download_name` when one is given.
        S3 sends the type and disposition chosen here, whatever the object's metadata contains.

        Without `expires_in`, the URL is signed at the start of the current URL window and
        lives `url_expiry_seconds` from there. So it is the same for every request inside
        the window, and lets the browser reuse its cached copy. With `expires_in`, it is
        signed now and lives exactly that long.
        """
        disposition = "inline" if download_name is None else attachment_disposition(download_name)
        query = (
            ("response-content-type", content_type),
            ("response-content-disposition", disposition),
        )
        if expires_in is None:
            expires_in = self._settings.url_expiry_seconds
            signed_at = window_start(self.clock(), self._settings.url_window_seconds)
        else:
            signed_at = int(self.clock())
        return self._url_signer.presign_get(
            key, signed_at=signed_at, expires_in=expires_in, query=query
        )

    async def head(self, key: str) -> ObjectInfo | None:
        """Return an object's size, type and metadata, or None when it does not exist."""
        try:
            response = await self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if _error_code(error) in _NOT_FOUND_CODES:
                return None
            raise
        return _object_info(response)

    async def read(self, key: str) -> bytes:
        response = await self._client.get_object(Bucket=self.bucket, Key=key)
        async with response["Body"] as body:
            return await body.read()

    async def read_object(self, key: str, *, max_bytes: int) -> StoredObject | None:
        """Return an object's info and bytes in one GET, or None when it does not exist.

        The bytes of an object larger than `max_bytes` are not read: its body is None.
        """
        assert self._objects is not None, "this Storage only signs URLs"
        return await self._objects.get(key, max_bytes=max_bytes)

    async def write(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str,
        metadata: dict[str, str],
        cache_control: str | None = None,
    ) -> None:
        assert self._objects is not None, "this Storage only signs URLs"
        await self._objects.put(
            key, body, content_type=content_type, metadata=metadata, cache_control=cache_control
        )

    async def delete(self, keys: Iterable[str]) -> int:
        """Delete objects in DeleteObjects batches; return how many keys were sent.

        One key takes a plain DELETE, which costs S3 and this process less than a batch.
        """
        pending = list(keys)
        if len(pending) == 1 and self._objects is not None:
            await self._objects.delete(pending[0])
            return 1
        for start in range(0, len(pending), DELETE_BATCH_SIZE):
            batch = pending[start : start + DELETE_BATCH_SIZE]
            response = await self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
            for error in response.get("Errors", []):
                logger.warning("could not delete %s: %s", error.get("Key"), error.get("Code"))
        return len(pending)

    async def list_keys(self, prefix: str) -> AsyncIterator[str]:
        """Yield every key under a prefix; for maintenance, never to render a page."""
        async for key, _ in self.list_objects(prefix):
            yield key

    async def list_folders(self, prefix: str) -> AsyncIterator[str]:
        """Yield the next level of folders under a prefix, such as `u/<user id>/` under `u/`."""
        paginator = self._client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            for item in page.get("CommonPrefixes", []):
                yield item["Prefix"]

    async def list_sizes(self, prefix: str) -> AsyncIterator[tuple[str, int]]:
        """Yield each key under a prefix with its size in bytes."""
        paginator = self._client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"], item["Size"]

    async def list_objects(self, prefix: str) -> AsyncIterator[tuple[str, float]]:
        """Yield each key under a prefix with its last-modified time as a Unix timestamp."""
        paginator = self._client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"], item["LastModified"].timestamp()


def cors_rule(allowed_origins: Iterable[str]) -> dict[str, Any]:
    """Return the CORS rule that `ensure_bucket` sets for the gallery's origins."""
    return {
        "ID": CORS_RULE_ID,
        "AllowedOrigins": list(allowed_origins),
        "AllowedMethods": ["POST", "GET"],
        "AllowedHeaders": ["*"],
        "MaxAgeSeconds": CORS_MAX_AGE_SECONDS,
    }


def _is_our_cors_rule(rule: dict[str, Any]) -> bool:
    if "ID" in rule:
        return rule["ID"] == CORS_RULE_ID
    # Versions of the gallery before CORS_RULE_ID wrote this same rule without an ID. One
    # without an ID and with exactly these methods, headers and max age is taken for it.
    return (
        sorted(rule.get("AllowedMethods", [])) == ["GET", "POST"]
        and rule.get("AllowedHeaders") == ["*"]
        and rule.get("MaxAgeSeconds") == CORS_MAX_AGE_SECONDS
        and not rule.get("ExposeHeaders")
    )


def _is_our_lifecycle_rule(rule: dict[str, Any]) -> bool:
    return rule.get("ID") in (EXPIRE_INCOMING_RULE_ID, ABORT_MULTIPART_RULE_ID)


def merge_rules(
    current: list[dict[str, Any]],
    ours: list[dict[str, Any]],
    *,
    is_ours: Callable[[dict[str, Any]], bool],
) -> list[dict[str, Any]]:
    """Return the bucket's rules with ours in place of the old ones, keeping every other rule.

    Ours take the place of the first old rule of ours, so an order the operator chose
    stays, and go at the end when the bucket has none of them.
    """
    merged: list[dict[str, Any]] = []
    placed = False
    for rule in current:
        if not is_ours(rule):
            merged.append(rule)
        elif not placed:
            merged.extend(ours)
            placed = True
    if not placed:
        merged.extend(ours)
    return merged


def lifecycle_rules() -> list[dict[str, Any]]:
    """Return the lifecycle rules that `ensure_bucket` sets on the bucket."""
    return [
        {
            "ID": EXPIRE_INCOMING_RULE_ID,
            "Filter": {"Prefix": INCOMING_LIFECYCLE_PREFIX},
            "Status": "Enabled",
            "Expiration": {"Days": INCOMING_EXPIRY_DAYS},
        },
        {
            "ID": ABORT_MULTIPART_RULE_ID,
            "Filter": {"Prefix": ""},
            "Status": "Enabled",
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": MULTIPART_ABORT_DAYS},
        },
    ]


def attachment_disposition(filename: str) -> str:
    """Return a Content-Disposition for a download that keeps a non-ASCII name.

    The plain `filename` is an ASCII fallback with quotes, backslashes and control
    characters replaced, so a name cannot add header parameters. `filename*` carries the
    exact name, percent-encoded as RFC 6266 and RFC 5987 describe.
    """
    fallback = "".join(
        char if " " <= char < "\x7f" and char not in '"\\' else "_" for char in filename
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _object_info(response: dict[str, Any]) -> ObjectInfo:
    return ObjectInfo(
        size=response["ContentLength"],
        content_type=response.get("ContentType", ""),
        metadata=response.get("Metadata", {}),
    )


def _signer_options(settings: Settings, endpoint_url: str) -> dict[str, str]:
    """Return a signer's arguments for `endpoint_url`, with path-style addressing."""
    return {
        "endpoint_url": endpoint_url,
        "bucket": settings.s3_bucket,
        "region": settings.s3_region,
        "access_key": settings.aws_access_key_id,
        "secret_key": settings.aws_secret_access_key,
        "addressing_style": "path",
    }


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))
