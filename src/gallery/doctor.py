"""Checks of the configured S3 bucket: private, enforcing upload forms, with CORS and lifecycle.

Each check sends the requests that a browser or a stranger could send to the S3 endpoint
that browsers reach. Forms and URLs are signed by the app's own Storage methods, so the
policy under test is the one the app hands out. Objects the checks write live under
CHECK_PREFIX and are deleted when the checks end.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from botocore.exceptions import BotoCoreError, ClientError

from gallery import storage
from gallery.settings import Settings
from gallery.storage import Storage, UploadForm

logger = logging.getLogger(__name__)

CHECK_PREFIX = "doctor/"
CHECK_BODY = b"gallery doctor check object\n"
CHECK_CONTENT_TYPE = "image/jpeg"
CHECK_OWNER = "doctor"
# The checks sign forms for this size limit, so the oversized file stays small.
CHECK_MAX_BYTES = 1024
# botocore writes a form's expiry in whole seconds, so a 1 s form has expired 2 s later.
EXPIRED_FORM_SECONDS = 1
EXPIRED_FORM_WAIT_SECONDS = 2.0
REQUEST_TIMEOUT_SECONDS = 15.0

# S3 rejects a request that lacks permission with 403 AccessDenied, and some servers with 401.
REJECTED_STATUSES = (401, 403)


class CheckFailed(Exception):
    """Error for a bucket that did not behave as a check expected, described in the message."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    problem: str | None = None
    # An advisory check reports a gap that the gallery covers another way, so it warns.
    advisory: bool = False

    @property
    def passed(self) -> bool:
        return self.problem is None

    @property
    def failed(self) -> bool:
        return not self.passed and not self.advisory

    def line(self) -> str:
        """Return `PASS name`, `FAIL name: problem`, or `WARN name: problem` if advisory."""
        if self.passed:
            return f"PASS {self.name}"
        return f"{'WARN' if self.advisory else 'FAIL'} {self.name}: {self.problem}"


@dataclass
class Probe:
    """State shared by the checks: the app's storage, an HTTP client and the keys written."""

    store: Storage
    settings: Settings
    http: httpx.AsyncClient
    written_keys: list[str] = field(default_factory=list)

    def new_key(self) -> str:
        """Return a fresh key under CHECK_PREFIX, recorded for deletion after the checks."""
        key = f"{CHECK_PREFIX}{secrets.token_hex(12)}"
        self.written_keys.append(key)
        return key

    @property
    def bucket_url(self) -> str:
        """The bucket's path-style URL on the endpoint that browsers reach."""
        return f"{self.settings.presign_endpoint_url.rstrip('/')}/{quote(self.store.bucket)}"

    def object_url(self, key: str) -> str:
        return f"{self.bucket_url}/{quote(key)}"

    async def sign_form(self, key: str, *, expires_in: int = 60) -> UploadForm:
        return await self.store.presign_upload(
            key,
            content_type=CHECK_CONTENT_TYPE,
            owner=CHECK_OWNER,
            max_bytes=CHECK_MAX_BYTES,
            expires_in=expires_in,
        )

    async def post_form(
        self, form: UploadForm, body: bytes = CHECK_BODY, changed: dict[str, str] | None = None
    ) -> httpx.Response:
        """Post a file with the form as a browser does, with `changed` fields replaced or added."""
        return await self.http.post(
            form.url,
            data={**form.fields, **(changed or {})},
            files={"file": ("upload", body, "application/octet-stream")},
        )

    async def write_object(self) -> str:
        key = self.new_key()
        await self.store.write(key, CHECK_BODY, content_type="text/plain", metadata={})
        return key


Check = Callable[[Probe], Awaitable[None]]


async def run_checks(settings: Settings) -> list[CheckResult]:
    """Run every check concurrently against the configured bucket, then delete their objects."""
    # httpx logs every request URL at INFO, and presigned URLs must stay out of the logs.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_SECONDS)
    async with Storage.open(settings) as store, httpx.AsyncClient(timeout=timeout) as http:
        probe = Probe(store, settings, http)
        try:
            return list(await asyncio.gather(*(_run(name, check, probe) for name, check in CHECKS)))
        finally:
            await _delete_written(probe)


async def _run(name: str, check: Check, probe: Probe) -> CheckResult:
    advisory = name in ADVISORY_CHECKS
    try:
        await check(probe)
    except CheckFailed as error:
        return CheckResult(name, str(error), advisory)
    except (httpx.HTTPError, ClientError, BotoCoreError) as error:
        return CheckResult(name, f"{type(error).__name__}: {error}", advisory)
    # A bug in one check must not stop the others, so it fails only its own line.
    except Exception as error:
        logger.exception("check %s raised an unexpected error", name)
        return CheckResult(name, f"unexpected {type(error).__name__}: {error}", advisory)
    return CheckResult(name)


async def _delete_written(probe: Probe) -> None:
    try:
        await probe.store.delete(probe.written_keys)
    except (ClientError, BotoCoreError) as error:
        logger.warning(
            "failed to delete the check objects under %s in bucket %s: %s",
            CHECK_PREFIX,
            probe.store.bucket,
            error,
        )


def _expect_rejected(response: httpx.Response, request: str) -> None:
    if response.status_code not in REJECTED_STATUSES:
        raise CheckFailed(
            f"{request} returned {response.status_code}, expected 403{_error_summary(response)}"
        )


def _error_summary(response: httpx.Response) -> str:
    """Return the S3 error code of a response as `(Code)`, or an empty string."""
    match = re.search(rb"<Code>([^<]{1,64})</Code>", response.content)
    return f" ({match.group(1).decode(errors='replace')})" if match else ""


async def _expect_absent(probe: Probe, key: str) -> None:
    if await probe.store.head(key) is not None:
        raise CheckFailed(f"the object {key} was stored")


async def check_anonymous_get(probe: Probe) -> None:
    key = await probe.write_object()

    response = await probe.http.get(probe.object_url(key))

    _expect_rejected(response, "an unsigned GET of an existing object")


async def check_anonymous_put(probe: Probe) -> None:
    key = probe.new_key()

    response = await probe.http.put(probe.object_url(key), content=CHECK_BODY)

    _expect_rejected(response, "an unsigned PUT")
    await _expect_absent(probe, key)


async def check_anonymous_list(probe: Probe) -> None:
    response = await probe.http.get(probe.bucket_url, params={"list-type": "2"})

    _expect_rejected(response, "an unsigned ListObjectsV2 of the bucket")


async def check_post_unmodified(probe: Probe) -> None:
    key = probe.new_key()
    form = await probe.sign_form(key)

    response = await probe.post_form(form)

    if not response.is_success:
        raise CheckFailed(
            f"the unmodified form returned {response.status_code}, expected 201"
            f"{_error_summary(response)}"
        )
    info = await probe.store.head(key)
    if info is None:
        raise CheckFailed(f"the form returned {response.status_code} but stored no object")
    if info.size != len(CHECK_BODY):
        raise CheckFailed(f"the stored object has {info.size} bytes, expected {len(CHECK_BODY)}")


async def check_post_over_max_size(probe: Probe) -> None:
    key = probe.new_key()
    form = await probe.sign_form(key)

    response = await probe.post_form(form, body=b"\0" * (CHECK_MAX_BYTES + 1))

    if not response.is_client_error:
        raise CheckFailed(
            f"a file of {CHECK_MAX_BYTES + 1} bytes on a form for at most {CHECK_MAX_BYTES} "
            f"returned {response.status_code}, expected 400{_error_summary(response)}"
        )
    await _expect_absent(probe, key)


async def check_post_changed_key(probe: Probe) -> None:
    signed_key = probe.new_key()
    other_key = probe.new_key()
    form = await probe.sign_form(signed_key)

    response = await probe.post_form(form, changed={"key": other_key})

    _expect_rejected(response, "a form posted with another key")
    await _expect_absent(probe, other_key)
    await _expect_absent(probe, signed_key)


async def check_post_changed_content_type(probe: Probe) -> None:
    key = probe.new_key()
    form = await probe.sign_form(key)

    response = await probe.post_form(form, changed={"Content-Type": "text/html"})

    _expect_rejected(response, "a form posted with Content-Type text/html")
    await _expect_absent(probe, key)


async def check_post_extra_metadata(probe: Probe) -> None:
    await _post_with_extra_field(probe, "x-amz-meta-extra", "1")


async def check_post_extra_cache_control(probe: Probe) -> None:
    # SeaweedFS 4.48 rejects an unsigned x-amz-* field but accepts this standard field.
    await _post_with_extra_field(probe, "Cache-Control", "public, max-age=31536000")


async def _post_with_extra_field(probe: Probe, name: str, value: str) -> None:
    key = probe.new_key()
    form = await probe.sign_form(key)

    response = await probe.post_form(form, changed={name: value})

    _expect_rejected(response, f"a form posted with the unsigned field {name}")
    await _expect_absent(probe, key)


async def check_post_expired(probe: Probe) -> None:
    key = probe.new_key()
    form = await probe.sign_form(key, expires_in=EXPIRED_FORM_SECONDS)
    await asyncio.sleep(EXPIRED_FORM_WAIT_SECONDS)

    response = await probe.post_form(form)

    _expect_rejected(response, f"a form posted {EXPIRED_FORM_WAIT_SECONDS:g} s after it expired")
    await _expect_absent(probe, key)


async def check_presigned_get(probe: Probe) -> None:
    key = await probe.write_object()
    url = await probe.store.presign_get(key, content_type="text/plain", expires_in=60)

    response = await probe.http.get(url)

    if response.status_code != 200:
        raise CheckFailed(
            f"a presigned GET returned {response.status_code}, expected 200"
            f"{_error_summary(response)}"
        )
    if response.content != CHECK_BODY:
        raise CheckFailed("a presigned GET returned a body that differs from the stored object")


async def check_tampered_get(probe: Probe) -> None:
    key = await probe.write_object()
    url = await probe.store.presign_get(key, content_type="text/plain", expires_in=60)
    tampered_url = _tamper_signature(url)

    untampered = await probe.http.get(url)
    tampered = await probe.http.get(tampered_url)

    # A 403 for the tampered URL proves nothing unless the same URL works untampered.
    if untampered.status_code != 200:
        raise CheckFailed(f"the untampered presigned GET returned {untampered.status_code}")
    _expect_rejected(tampered, "a presigned GET with one character of its signature changed")


def _tamper_signature(url: str) -> str:
    """Change one hex digit of X-Amz-Signature, leaving every other byte of the URL as it is."""
    match = re.search(r"[?&]X-Amz-Signature=([0-9a-f]+)", url)
    if match is None:
        raise CheckFailed("the presigned GET URL has no X-Amz-Signature parameter")
    position = match.start(1)
    replacement = "1" if url[position] == "0" else "0"
    return url[:position] + replacement + url[position + 1 :]


async def check_cors(probe: Probe) -> None:
    origin = probe.settings.app_url
    try:
        rules = await probe.store.bucket_cors_rules()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "NoSuchCORSConfiguration":
            raise
        raise CheckFailed(
            f"bucket {probe.store.bucket} has no CORS rules. Run `gallery init-bucket`."
        ) from None

    for rule in rules:
        origins = rule.get("AllowedOrigins", [])
        if (origin in origins or "*" in origins) and "POST" in rule.get("AllowedMethods", []):
            return
    raise CheckFailed(
        f"no CORS rule of bucket {probe.store.bucket} allows POST from {origin}. Run "
        "`gallery init-bucket` with GALLERY_PUBLIC_URL set to the address people open."
    )


async def check_lifecycle_expires_incoming(probe: Probe) -> None:
    rules = await probe.store.bucket_lifecycle_rules()
    expiring = [rule for rule in rules if _is_enabled(rule) and "Expiration" in rule]
    if not expiring:
        raise CheckFailed(
            f"bucket {probe.store.bucket} has no enabled lifecycle rule that expires objects. "
            "Run `gallery init-bucket`."
        )

    sample_key = storage.incoming_key("user", "upload")
    tags = await _upload_tags(probe)
    if any(_rule_selects(rule, sample_key, tags, probe.settings) for rule in expiring):
        return
    described = "; ".join(
        f"{rule.get('ID', '(no ID)')}: {_describe_filter(rule)}" for rule in expiring
    )
    raise CheckFailed(
        f"upload keys such as {sample_key}, with tags {tags or 'none'}, match no enabled "
        f"expiring rule ({described})"
    )


async def check_lifecycle_aborts_multipart(probe: Probe) -> None:
    rules = await probe.store.bucket_lifecycle_rules()

    for rule in rules:
        if not (_is_enabled(rule) and "AbortIncompleteMultipartUpload" in rule):
            continue
        prefix, tags, larger_than, smaller_than = _filter_parts(rule)
        if prefix == "" and not tags and larger_than is None and smaller_than is None:
            return
    raise CheckFailed(
        f"bucket {probe.store.bucket} has no enabled lifecycle rule for every key that aborts "
        "incomplete multipart uploads. Run `gallery init-bucket`."
    )


async def _upload_tags(probe: Probe) -> dict[str, str]:
    """Upload with the app's form and return the tags that S3 stored with the object."""
    key = probe.new_key()
    response = await probe.post_form(await probe.sign_form(key))
    if not response.is_success:
        raise CheckFailed(
            f"an upload with an unmodified form returned {response.status_code}"
            f"{_error_summary(response)}, so the tags of uploads are unknown"
        )
    return await probe.store.object_tags(key)


def _is_enabled(rule: dict[str, Any]) -> bool:
    return rule.get("Status") == "Enabled"


def _filter_parts(rule: dict[str, Any]) -> tuple[str, dict[str, str], int | None, int | None]:
    """Return a rule's prefix, tags and object size bounds, from any form of its filter."""
    if "Filter" not in rule:
        # The older form of a rule: a bare Prefix beside its ID, without a Filter.
        return rule.get("Prefix", ""), {}, None, None
    rule_filter = rule["Filter"]
    if "And" in rule_filter:
        rule_filter = rule_filter["And"]
    tags = rule_filter.get("Tags", [])
    if "Tag" in rule_filter:
        tags = [rule_filter["Tag"]]
    return (
        rule_filter.get("Prefix", ""),
        {tag["Key"]: tag["Value"] for tag in tags},
        rule_filter.get("ObjectSizeGreaterThan"),
        rule_filter.get("ObjectSizeLessThan"),
    )


def _rule_selects(rule: dict[str, Any], key: str, tags: dict[str, str], settings: Settings) -> bool:
    """Return whether a rule selects this key with these tags, at every allowed upload size."""
    prefix, rule_tags, larger_than, smaller_than = _filter_parts(rule)
    if not key.startswith(prefix):
        return False
    if any(tags.get(name) != value for name, value in rule_tags.items()):
        return False
    if larger_than is not None and larger_than >= 1:
        return False
    return smaller_than is None or smaller_than > settings.max_upload_bytes


def _describe_filter(rule: dict[str, Any]) -> str:
    prefix, tags, larger_than, smaller_than = _filter_parts(rule)
    parts = [f"prefix {prefix!r}"]
    if tags:
        parts.append(f"tags {tags}")
    if larger_than is not None:
        parts.append(f"size > {larger_than}")
    if smaller_than is not None:
        parts.append(f"size < {smaller_than}")
    return ", ".join(parts)


async def check_least_privilege(probe: Probe) -> None:
    """Warn when the credentials have rights on the bucket's settings, beyond its objects.

    The app needs object rights, listing and the bucket's location. Credentials that may
    read the bucket's ACL were given bucket rights as well (s3:* or s3:Get*, or a SeaweedFS
    admin), which usually include changing its policy or deleting it.
    """
    if await probe.store.may_read_bucket_acl():
        raise CheckFailed(
            "these credentials may read the bucket's ACL (s3:GetBucketAcl), so they likely "
            "may also change its policy or delete it, which the app does not need; give the "
            "app the least-privilege policy in docs/deploy.md and run init-bucket with "
            "other credentials"
        )


CHECKS: list[tuple[str, Check]] = [
    ("anonymous-get-rejected", check_anonymous_get),
    ("anonymous-put-rejected", check_anonymous_put),
    ("anonymous-list-rejected", check_anonymous_list),
    ("post-unmodified-accepted", check_post_unmodified),
    ("post-over-max-size-rejected", check_post_over_max_size),
    ("post-changed-key-rejected", check_post_changed_key),
    ("post-changed-content-type-rejected", check_post_changed_content_type),
    ("post-extra-metadata-rejected", check_post_extra_metadata),
    ("post-extra-cache-control-rejected", check_post_extra_cache_control),
    ("post-expired-rejected", check_post_expired),
    ("presigned-get-accepted", check_presigned_get),
    ("tampered-get-rejected", check_tampered_get),
    ("cors-allows-app-origin", check_cors),
    ("lifecycle-expires-incoming", check_lifecycle_expires_incoming),
    ("lifecycle-aborts-multipart", check_lifecycle_aborts_multipart),
    ("credentials-least-privilege", check_least_privilege),
]

# A standard header field outside the policy, such as Cache-Control, lands only on the
# incoming object: the worker writes the original again with its verified type alone, so
# such a header never reaches a viewer. SeaweedFS 4.48 accepts it, where AWS S3 rejects it.
# Credentials with more rights than needed are a risk, not a hole, so that check warns.
ADVISORY_CHECKS = {"post-extra-cache-control-rejected", "credentials-least-privilege"}
