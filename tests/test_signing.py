"""The GET URL signer against botocore and SeaweedFS, URL windows, and the grid's requests."""

from __future__ import annotations

import calendar
import datetime
import html
import re
from dataclasses import replace
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from gallery import storage
from gallery.settings import Settings, SettingsError
from gallery.signing import MAX_EXPIRES_SECONDS, GetUrlSigner, HeaderSigner, window_start
from gallery.storage import Storage, attachment_disposition
from tests.support import HTMX, make_jpeg, seed_grid

ACCESS_KEY = "AKIDEXAMPLE0123456789"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "FwoGZXIvYXdzEJr//////////wEaDH+token/with=padding=="

# A time that botocore reads from botocore.auth.get_current_datetime, and ours as Unix time.
FROZEN_TIME = datetime.datetime(2024, 2, 29, 23, 59, 58)
FROZEN_UNIX_TIME = calendar.timegm(FROZEN_TIME.utctimetuple())

# Keys that differ once percent-encoded, or that a careless signer normalizes.
AWKWARD_KEYS = [
    "plain.webp",
    "a b.webp",
    "a+b.webp",
    "100%.webp",
    "100%25.webp",
    "%2F%20already-encoded",
    "ü.jpg",
    "日本語/写真.jpg",
    "emoji-😀.png",
    "a//b",
    "/leading-slash",
    "//two-leading-slashes",
    "trailing-slash/",
    "trailing-slashes//",
    "~tilde/~file~",
    "question?.jpg",
    "hash#tag.jpg",
    "a=b",
    "a&b",
    "a=b&c=d?e#f",
    "dot/./segment/../up",
    "semicolon;comma,colon:at@bang!quote'(paren)*star$dollar",
    'back\\slash"quote<angle>{brace}|pipe^caret`tick',
    " space at both ends ",
    "tab\tnewline\ncontrol\x7f",
    "x" * 1024,
    "ü" * 512,
    "u/0123456789abcdef/t/0190a1b2c3d4e5f60123456789abcdef.webp",
]

# Each case: our signer's endpoint and addressing style, and the same for botocore.
# botocore builds the virtual-host AWS URL itself from the region when it has no endpoint.
ENDPOINTS = {
    "path-style-local": ("http://127.0.0.1:8333", "path", "us-east-1", "http://127.0.0.1:8333"),
    "virtual-host-aws": ("https://s3.eu-west-2.amazonaws.com", "virtual", "eu-west-2", None),
    "path-style-custom-domain": (
        "https://photos.example.test:8443",
        "path",
        "us-east-1",
        "https://photos.example.test:8443",
    ),
    "virtual-host-custom-domain": (
        "https://photos.example.test:8443",
        "virtual",
        "us-east-1",
        "https://photos.example.test:8443",
    ),
    "default-port-and-path-prefix": (
        "https://Photos.Example.test:443/s3/",
        "path",
        "us-east-1",
        "https://Photos.Example.test:443/s3/",
    ),
}


def botocore_client(endpoint_url: str | None, style: str, region: str, token: str | None) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        aws_session_token=token,
        config=Config(signature_version="s3v4", s3={"addressing_style": style}),
    )


def botocore_url(client: Any, key: str, disposition: str, *, expires_in: int = 600) -> str:
    params = {
        "Bucket": "gallery",
        "Key": key,
        "ResponseContentType": "image/webp",
        "ResponseContentDisposition": disposition,
    }
    with mock.patch("botocore.auth.get_current_datetime", return_value=FROZEN_TIME):
        return client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_in)


def our_url(
    signer: GetUrlSigner,
    key: str,
    disposition: str,
    *,
    signed_at: int = FROZEN_UNIX_TIME,
    expires_in: int = 600,
) -> str:
    query = (("response-content-type", "image/webp"), ("response-content-disposition", disposition))
    return signer.presign_get(key, signed_at=signed_at, expires_in=expires_in, query=query)


def query_value(url: str, name: str) -> str:
    return parse_qs(urlsplit(url).query)[name][0]


def tamper_signature(url: str) -> str:
    signature = query_value(url, "X-Amz-Signature")
    changed = ("1" if signature[0] == "0" else "0") + signature[1:]
    return url.replace(f"X-Amz-Signature={signature}", f"X-Amz-Signature={changed}")


async def fetch(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.get(url)


@pytest.mark.parametrize("token", [None, SESSION_TOKEN], ids=["no-token", "session-token"])
@pytest.mark.parametrize("endpoint", ENDPOINTS.values(), ids=ENDPOINTS.keys())
def test_signer_matches_botocore_byte_for_byte(endpoint, token):
    our_endpoint, style, region, botocore_endpoint = endpoint
    signer = GetUrlSigner(
        endpoint_url=our_endpoint,
        bucket="gallery",
        region=region,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        session_token=token,
        addressing_style=style,
    )
    client = botocore_client(botocore_endpoint, style, region, token)

    for key in AWKWARD_KEYS:
        for disposition in ("inline", attachment_disposition(key)):
            expected = botocore_url(client, key, disposition)

            assert our_url(signer, key, disposition) == expected, (key, disposition)


# The requests the worker signs in headers: method, headers and body.
HEADER_REQUESTS = [
    ("GET", {}, b""),
    ("DELETE", {}, b""),
    (
        "PUT",
        {
            "Content-Type": "image/webp",
            "Cache-Control": "private,  max-age=31536000, immutable ",
            "x-amz-meta-owner": "0123456789abcdef",
            "x-amz-meta-filename": "a%20b%C3%BC.jpg",
            "x-amz-meta-placeholder": "data:image/webp;base64,UklGRh4AAABXRUJQVlA4",
        },
        bytes(range(256)) * 40,
    ),
]


@pytest.mark.parametrize("token", [None, SESSION_TOKEN], ids=["no-token", "session-token"])
@pytest.mark.parametrize("endpoint", ENDPOINTS.values(), ids=ENDPOINTS.keys())
def test_header_signer_matches_botocore_byte_for_byte(endpoint, token):
    our_endpoint, style, region, _ = endpoint
    signer = HeaderSigner(
        endpoint_url=our_endpoint,
        bucket="gallery",
        region=region,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        session_token=token,
        addressing_style=style,
    )
    botocore_signer = S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY, token), "s3", region)

    for key in AWKWARD_KEYS:
        for method, headers, body in HEADER_REQUESTS:
            url, signed = signer.sign(method, key, headers=headers, body=body, now=FROZEN_UNIX_TIME)
            unsigned = {name: value for name, value in signed.items() if name != "Authorization"}
            request = AWSRequest(method=method, url=url, data=body, headers=unsigned)
            # botocore signs the body over HTTPS too when the request context enables it, as ours does.
            request.context["payload_signing_enabled"] = True
            with mock.patch("botocore.auth.get_current_datetime", return_value=FROZEN_TIME):
                botocore_signer.add_auth(request)

            assert signed["Authorization"] == request.headers["Authorization"], (method, key)
            assert signed["x-amz-content-sha256"] == request.headers["X-Amz-Content-SHA256"]


def test_signer_matches_botocore_across_days_and_expiries():
    signer = GetUrlSigner(
        endpoint_url="http://127.0.0.1:8333",
        bucket="gallery",
        region="us-east-1",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
    )
    client = botocore_client("http://127.0.0.1:8333", "path", "us-east-1", None)
    cases = [(FROZEN_TIME, 600), (FROZEN_TIME + datetime.timedelta(seconds=2), 1)]
    cases.append((FROZEN_TIME + datetime.timedelta(days=1), MAX_EXPIRES_SECONDS))

    for moment, expires_in in cases:
        with mock.patch("botocore.auth.get_current_datetime", return_value=moment):
            expected = client.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": "gallery",
                    "Key": "a b",
                    "ResponseContentType": "image/webp",
                    "ResponseContentDisposition": "inline",
                },
                ExpiresIn=expires_in,
            )
        signed_at = calendar.timegm(moment.utctimetuple())

        ours = our_url(signer, "a b", "inline", signed_at=signed_at, expires_in=expires_in)

        assert ours == expected, moment


@pytest.mark.parametrize("expires_in", [0, MAX_EXPIRES_SECONDS + 1])
def test_signer_rejects_expiry_outside_sigv4_range(expires_in):
    signer = GetUrlSigner(
        endpoint_url="http://127.0.0.1:8333",
        bucket="gallery",
        region="us-east-1",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
    )

    with pytest.raises(ValueError, match=f"expires_in={expires_in} is invalid"):
        our_url(signer, "k", "inline", expires_in=expires_in)


@pytest.mark.parametrize(
    ("endpoint_url", "bucket", "message"),
    [
        ("https://photos.example.test", "my.bucket", "cannot be addressed virtual-host style"),
        ("https://photos.example.test", "Upper", "cannot be addressed virtual-host style"),
        ("http://127.0.0.1:8333", "gallery", "is an IP address"),
        ("ftp://photos.example.test", "gallery", "is invalid: expected http:// or https://"),
    ],
)
def test_signer_rejects_unusable_endpoint_or_bucket(endpoint_url, bucket, message):
    with pytest.raises(ValueError, match=message):
        GetUrlSigner(
            endpoint_url=endpoint_url,
            bucket=bucket,
            region="us-east-1",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            addressing_style="virtual",
        )


# Keys SeaweedFS stores as they are: it treats "//", a leading "/" and "." segments as paths,
# and rejects a path segment over 255 bytes.
SEAWEEDFS_KEYS = [
    "signing/a b+c.webp",
    "signing/100%.webp",
    "signing/ü/日本語.webp",
    "signing/~tilde",
    "signing/question?hash#equals=amp&.webp",
    "signing/" + "/".join(["long-segment-" + "x" * 200] * 4),
]


def seaweedfs_signer(settings: Settings) -> GetUrlSigner:
    return GetUrlSigner(
        endpoint_url=settings.s3_endpoint_url,
        bucket=settings.s3_bucket,
        region=settings.s3_region,
        access_key=settings.aws_access_key_id,
        secret_key=settings.aws_secret_access_key,
    )


@pytest.mark.parametrize("key", SEAWEEDFS_KEYS)
async def test_signed_url_works_on_seaweedfs(store, settings, key):
    body = f"object at {key}".encode()
    await store.write(key, body, content_type="application/octet-stream", metadata={})
    signer = seaweedfs_signer(settings)
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    url = our_url(signer, key, "inline", signed_at=now)

    response = await fetch(url)
    tampered = await fetch(tamper_signature(url))
    retyped = await fetch(url.replace("image%2Fwebp", "text%2Fhtml"))

    assert response.status_code == 200
    assert response.content == body
    assert response.headers["content-type"] == "image/webp"
    assert response.headers["content-disposition"] == "inline"
    assert tampered.status_code == 403
    assert retyped.status_code == 403


async def test_url_for_other_key_or_expired_is_403(store, settings):
    await store.write("signing/first", b"first", content_type="text/plain", metadata={})
    await store.write("signing/second", b"second", content_type="text/plain", metadata={})
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    url = await store.presign_get("signing/first", content_type="text/plain")
    signer = seaweedfs_signer(settings)
    expired = signer.presign_get("signing/first", signed_at=now - 120, expires_in=60)

    other_key = await fetch(url.replace("signing/first", "signing/second"))
    too_late = await fetch(expired)

    assert (await fetch(url)).content == b"first"
    assert other_key.status_code == 403
    assert too_late.status_code == 403


def test_window_start_rounds_down():
    assert window_start(1_000_000.0, 300) == 999_900
    assert window_start(999_900.0, 300) == 999_900
    assert window_start(999_899.99, 300) == 999_600


def url_lifetime(url: str, now: float) -> float:
    """Return how many seconds after `now` a presigned URL stays valid."""
    signed = datetime.datetime.strptime(query_value(url, "X-Amz-Date"), "%Y%m%dT%H%M%SZ")
    signed_at = calendar.timegm(signed.timetuple())
    return signed_at + int(query_value(url, "X-Amz-Expires")) - now


async def test_windowed_url_lives_at_least_expiry_minus_window(settings):
    window_settings = replace(settings, url_expiry_seconds=600, url_window_seconds=300)
    # 2023-11-14 22:15:00 UTC, the start of a 300 s window.
    start = 1_700_000_100

    for offset in (0, 1, 150.5, 299, 299.999):
        now = start + offset
        store = Storage(None, None, window_settings, clock=lambda now=now: now)

        url = await store.presign_get("u/x/t/y.webp", content_type="image/webp")

        assert query_value(url, "X-Amz-Date") == "20231114T221500Z", offset
        assert query_value(url, "X-Amz-Expires") == "600", offset
        assert url_lifetime(url, now) > 600 - 300, offset


async def test_explicit_expiry_signs_at_current_second(settings):
    now = 1_700_000_123.75
    store = Storage(None, None, settings, clock=lambda: now)

    url = await store.presign_get("doctor/x", content_type="text/plain", expires_in=60)

    assert query_value(url, "X-Amz-Date") == "20231114T221523Z"
    assert query_value(url, "X-Amz-Expires") == "60"


@pytest.mark.parametrize(
    ("expiry", "window"), [("600", "600"), ("600", "601"), ("600", "0"), ("100", "300")]
)
def test_url_window_not_below_expiry_is_rejected(expiry, window):
    environ = {"GALLERY_URL_EXPIRY_SECONDS": expiry, "GALLERY_URL_WINDOW_SECONDS": window}

    with pytest.raises(SettingsError, match=f"GALLERY_URL_WINDOW_SECONDS={window} is out of"):
        Settings.from_env(environ)


def test_default_url_window_is_below_default_expiry():
    settings = Settings.from_env({})

    assert 1 <= settings.url_window_seconds < settings.url_expiry_seconds


def thumbnail_urls(page: str) -> list[str]:
    """List the presigned thumbnail URLs in a page, in order, unescaped."""
    urls = re.findall(r'(https?://[^"\s]+)', page)
    return [html.unescape(url) for url in urls if "/t/" in url or "/t2/" in url]


async def test_renders_in_one_window_share_urls(make_client, settings, run_worker):
    window_settings = replace(settings, url_expiry_seconds=3600, url_window_seconds=60)
    client = await make_client(app_settings=window_settings)
    await client.upload(make_jpeg(300, 200, (10, 120, 200)), "first.jpg")
    await client.upload(make_jpeg(200, 300, (200, 120, 10)), "second.jpg")
    await run_worker()
    store = client.http.app.state.store
    # The window before the current one, so that no URL is signed in the future.
    previous_window = window_start(datetime.datetime.now(datetime.UTC).timestamp(), 60) - 60

    store.clock = lambda: previous_window + 1
    first = await client.http.get("/images")
    store.clock = lambda: previous_window + 59.9
    second = await client.http.get("/images")
    store.clock = lambda: previous_window + 60
    third = await client.http.get("/images")

    first_urls = thumbnail_urls(first.text)
    third_urls = thumbnail_urls(third.text)
    # A 1x and a 2x thumbnail URL for each of the two tiles.
    assert len(set(first_urls)) == 4
    assert thumbnail_urls(second.text) == first_urls
    assert len(set(third_urls)) == 4
    assert set(third_urls).isdisjoint(first_urls)
    for url in {*first_urls, *third_urls}:
        response = await fetch(url)
        assert response.status_code == 200, url
        assert response.headers["content-type"] == "image/webp", url
        assert response.headers["cache-control"] == storage.RENDITION_CACHE_CONTROL, url


class ForbiddenS3Client:
    """An S3 client stand-in that records and rejects every use."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        raise AssertionError(f"S3 client method {name} was used while rendering the grid")


class RedisRequestLog:
    """Records the commands that one Redis client sends, one entry per round trip."""

    def __init__(self, redis: Any) -> None:
        self.round_trips: list[list[str]] = []
        original_execute_command = redis.execute_command
        original_pipeline = redis.pipeline

        async def execute_command(*args: Any, **options: Any) -> Any:
            self.round_trips.append([str(args[0]).upper()])
            return await original_execute_command(*args, **options)

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = original_pipeline(*args, **kwargs)
            original_execute = pipe.execute

            async def execute(*execute_args: Any, **execute_kwargs: Any) -> Any:
                names = [str(command[0]).upper() for command, _ in pipe.command_stack]
                self.round_trips.append(names)
                return await original_execute(*execute_args, **execute_kwargs)

            pipe.execute = execute
            return pipe

        redis.execute_command = execute_command
        redis.pipeline = pipeline


async def test_grid_renders_from_index_without_s3(client, redis, settings):
    user_id = (await redis.get(f"gallery:username:{client.username.lower()}")).decode()
    await seed_grid(redis, user_id, settings.page_size + 5, ready=True)
    app_state = client.http.app.state
    forbidden = ForbiddenS3Client()
    app_state.store._client = forbidden
    app_state.store._presign_client = forbidden
    log = RedisRequestLog(app_state.queue)

    page = await client.http.get("/images")
    page_requests = log.round_trips.copy()
    cursor = page.text.split("?before=")[1].split('"')[0]
    log.round_trips.clear()
    fragment = await client.http.get(f"/images?before={cursor}", headers=HTMX)

    assert page.status_code == 200
    assert fragment.status_code == 200
    assert forbidden.calls == []
    assert len(set(thumbnail_urls(page.text))) == 2 * settings.page_size
    assert len(set(thumbnail_urls(fragment.text))) == 2 * 5
    page_records = ["HGETALL"] * settings.page_size
    quota_and_usage = ["HGETALL", "HGETALL", "ZRANGEBYSCORE", "HGETALL"]
    counts = ["ZCARD", "ZCOUNT", "SCARD", "ZCARD"]
    # The user's issued uploads, whose files the page looks for in S3: none here.
    issued = ["ZRANGE"]
    expected = [issued, ["ZRANGE"], page_records, counts, quota_and_usage]
    assert sorted(page_requests) == sorted(expected)
    assert sorted(log.round_trips) == sorted([["ZRANGE"], ["HGETALL"] * 5])
