"""The object client: reads, writes and deletes on SeaweedFS, its errors and its retries."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
from aiohttp import web
from botocore.exceptions import ClientError, EndpointConnectionError

from gallery.embedded import HOST, free_port
from gallery.settings import Settings
from gallery.storage import Storage

# Bodies of every size class: empty, one network read, and many reads.
SIZES = (0, 1, 70_000, 5_000_000)


def new_key() -> str:
    return f"objects-test/{secrets.token_hex(8)}/a b+ü.bin"


@pytest.mark.parametrize("size", SIZES)
async def test_write_read_delete_round_trip(store: Storage, size: int):
    key = new_key()
    body = os.urandom(size)
    metadata = {"owner": "u1", "filename": "a%20b%C3%BC.jpg", "created-at": "1764876543.25"}

    await store.write(
        key, body, content_type="image/webp", metadata=metadata, cache_control="private"
    )
    stored = await store.read_object(key, max_bytes=size)

    assert stored is not None
    assert stored.body == body
    assert (stored.info.size, stored.info.content_type) == (size, "image/webp")
    assert stored.info.metadata == metadata
    assert await store.delete([key]) == 1
    assert await store.read_object(key, max_bytes=size) is None
    # A second delete of the same key succeeds, as S3's does.
    assert await store.delete([key]) == 1


async def test_object_over_the_limit_is_not_read(store: Storage):
    key = new_key()
    await store.write(key, b"x" * 1000, content_type="image/jpeg", metadata={})

    stored = await store.read_object(key, max_bytes=999)

    assert stored is not None
    assert stored.body is None
    assert stored.info.size == 1000


async def test_wrong_secret_raises_signature_error(settings: Settings):
    wrong = replace(settings, aws_secret_access_key=settings.aws_secret_access_key + "x")

    async with Storage.open(wrong) as store:
        with pytest.raises(ClientError) as raised:
            await store.read_object(new_key(), max_bytes=10)

    assert raised.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


async def test_unreachable_s3_raises_endpoint_connection_error(settings: Settings):
    closed = replace(settings, s3_endpoint_url=f"http://{HOST}:{free_port()}")

    async with Storage.open(closed) as store:
        with pytest.raises(EndpointConnectionError):
            await store.write(new_key(), b"x", content_type="image/jpeg", metadata={})


@asynccontextmanager
async def fake_s3(handler: Callable[[web.Request], web.StreamResponse]) -> AsyncIterator[str]:
    """Serve `handler` for every path on 127.0.0.1 and hand over its URL."""
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port).start()
    try:
        yield f"http://{HOST}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def store_on_fake_s3(
    settings: Settings, handler: Callable[[web.Request], web.StreamResponse]
) -> AsyncIterator[Storage]:
    """Hand over a Storage whose S3 endpoint is a fake that serves `handler`."""
    async with (
        fake_s3(handler) as endpoint_url,
        Storage.open(replace(settings, s3_endpoint_url=endpoint_url)) as store,
    ):
        yield store


def slow_down(failures: int, requests: list[str]) -> Callable[[web.Request], web.StreamResponse]:
    """Respond with 503 SlowDown to the first `failures` requests, then 200."""

    async def handle(request: web.Request) -> web.StreamResponse:
        requests.append(request.method)
        if len(requests) <= failures:
            body = "<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
            return web.Response(status=503, text=body, content_type="application/xml")
        return web.Response(status=200)

    return handle


async def test_503_is_tried_again(settings: Settings):
    requests: list[str] = []

    async with store_on_fake_s3(settings, slow_down(2, requests)) as store:
        await store.write(new_key(), b"x", content_type="image/jpeg", metadata={})

    assert requests == ["PUT", "PUT", "PUT"]


async def test_503_on_every_try_raises_its_code(settings: Settings):
    requests: list[str] = []

    async with store_on_fake_s3(settings, slow_down(10, requests)) as store:
        with pytest.raises(ClientError) as raised:
            await store.delete([new_key()])

    assert requests == ["DELETE"] * 3
    assert raised.value.response["Error"] == {"Code": "SlowDown", "Message": "Reduce your rate"}


@pytest.mark.parametrize("size", [99, 100, 101])
async def test_body_without_length_is_counted_against_the_limit(settings: Settings, size: int):
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, size, 30):
            await response.write(b"y" * min(30, size - start))
        await response.write_eof()
        return response

    async with store_on_fake_s3(settings, chunked) as store:
        stored = await store.read_object(new_key(), max_bytes=100)

    assert stored is not None
    assert stored.body == (b"y" * size if size <= 100 else None)


async def test_proxy_from_environment_carries_requests(settings: Settings, monkeypatch):
    requests: list[str] = []
    async with fake_s3(slow_down(0, requests)) as proxy_url:
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        # Nothing listens at the endpoint itself, so only the proxy can respond.
        unreachable = replace(settings, s3_endpoint_url=f"http://{HOST}:{free_port()}")
        async with Storage.open(unreachable) as store:
            await store.write(new_key(), b"x", content_type="image/jpeg", metadata={})

        monkeypatch.setenv("NO_PROXY", HOST)
        async with Storage.open(unreachable) as store:
            with pytest.raises(EndpointConnectionError):
                await store.delete([new_key()])

    assert requests == ["PUT"]
