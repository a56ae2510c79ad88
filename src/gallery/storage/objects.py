"""GET, PUT and DELETE of single objects, signed by our own signer and sent with aiohttp.

The worker makes six such requests per upload, in the process that also runs its event
loop. In bench/object_requests.py on the 2-core machine of docs/benchmarks.md,
aiobotocore used 1.0 to 3.8 ms of CPU per request and this client 0.2 to 1.5 ms. botocore
resolves endpoint rules, runs event hooks and builds a user agent for each request.
Errors are botocore's exceptions, so callers handle them as they handle the rest of the
client's: ClientError for an error response, and EndpointConnectionError or
HTTPClientError when S3 cannot be reached.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import ssl
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
from botocore.exceptions import ClientError, EndpointConnectionError, HTTPClientError
from botocore.httpsession import get_cert_path
from yarl import URL

from gallery.signing import HeaderSigner

logger = logging.getLogger(__name__)

# Tries of one request when S3 cannot be reached or responds with one of these statuses,
# as in botocore's standard retry mode.
MAX_ATTEMPTS = 3
RETRY_STATUSES = frozenset({500, 502, 503, 504})
# The wait before try n + 1 is random, up to this many seconds times 2 ** (n - 1).
RETRY_BASE_SECONDS = 0.1

# botocore's defaults are 60 s for both. A connection to S3 takes far less.
CONNECT_TIMEOUT_SECONDS = 10
READ_TIMEOUT_SECONDS = 60
# Connections kept open to S3, botocore's max_pool_connections default.
MAX_CONNECTIONS = 10

METADATA_PREFIX = "x-amz-meta-"

T = TypeVar("T")

_ERROR_FIELD = re.compile(rb"<(Code|Message)>([^<]*)</\1>")


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    content_type: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class StoredObject:
    info: ObjectInfo
    # None when the object was larger than the limit it was read with.
    body: bytes | None


async def _read_nothing(response: aiohttp.ClientResponse) -> None:
    # Reading the empty body returns the connection to the pool.
    await response.read()


class ObjectClient:
    """Single-object requests to one bucket over one aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, signer: HeaderSigner) -> None:
        self._session = session
        self._signer = signer

    @classmethod
    def open_session(cls, endpoint_url: str) -> aiohttp.ClientSession:
        """Return a session for `endpoint_url` with botocore's proxy and CA settings.

        The proxy comes from HTTP_PROXY, HTTPS_PROXY and NO_PROXY, read once here, and an
        HTTPS endpoint is verified against AWS_CA_BUNDLE when it is set, otherwise
        botocore's bundle. aiohttp's own trust_env is off: it reads the environment and
        ~/.netrc in a thread for every request, and netrc credentials would clash with the
        signature's Authorization header.
        """
        context: ssl.SSLContext | bool = False
        if endpoint_url.startswith("https:"):
            context = ssl.create_default_context(
                cafile=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)
            )
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, ssl=context),
            timeout=aiohttp.ClientTimeout(
                sock_connect=CONNECT_TIMEOUT_SECONDS, sock_read=READ_TIMEOUT_SECONDS
            ),
            proxy=_environment_proxy(endpoint_url),
            # The signature covers the headers sent, so aiohttp must add none of its own.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )

    async def get(self, key: str, *, max_bytes: int) -> StoredObject | None:
        """Return an object's info and bytes, or None when it does not exist.

        The bytes of an object larger than `max_bytes` are not read: its body is None.
        """
        return await self._send(
            "GET",
            key,
            operation="GetObject",
            read=lambda response: _read_limited(response, max_bytes),
        )

    async def put(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str,
        metadata: Mapping[str, str],
        cache_control: str | None = None,
    ) -> None:
        headers = {"Content-Type": content_type}
        if cache_control:
            headers["Cache-Control"] = cache_control
        headers.update({METADATA_PREFIX + name: value for name, value in metadata.items()})
        await self._send("PUT", key, operation="PutObject", headers=headers, body=body)

    async def delete(self, key: str) -> None:
        """Delete one object. Deleting a key that does not exist succeeds too."""
        await self._send("DELETE", key, operation="DeleteObject")

    async def _send(
        self,
        method: str,
        key: str,
        *,
        operation: str,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        read: Callable[[aiohttp.ClientResponse], Awaitable[T]] = _read_nothing,
    ) -> T | None:
        """Send one request, in up to MAX_ATTEMPTS tries.

        Returns what `read` makes of a successful response, or None for a GET of a key that
        does not exist.
        """
        for attempt in range(1, MAX_ATTEMPTS + 1):
            url, signed = self._signer.sign(method, key, headers=headers or {}, body=body)
            try:
                async with self._session.request(
                    method, URL(url, encoded=True), headers=signed, data=body or None
                ) as response:
                    if method == "GET" and response.status == 404:
                        return None
                    if response.status < 300:
                        return await read(response)
                    await self._raise_or_wait(response, operation, key, attempt)
            except (aiohttp.ClientConnectionError, TimeoutError) as error:
                await self._wait_or_raise(error, url, attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _raise_or_wait(
        self, response: aiohttp.ClientResponse, operation: str, key: str, attempt: int
    ) -> None:
        """Wait before the next try of a request S3 failed, or raise its ClientError."""
        body = await response.read()
        fields = {name.decode(): value.decode() for name, value in _ERROR_FIELD.findall(body)}
        code = fields.get("Code") or str(response.status)
        if response.status in RETRY_STATUSES and attempt < MAX_ATTEMPTS:
            logger.info(
                "S3 returned %s %s for %s of %s; trying again",
                response.status,
                code,
                operation,
                key,
            )
            await _backoff(attempt)
            return
        error = {"Code": code, "Message": fields.get("Message", response.reason or "")}
        metadata = {"HTTPStatusCode": response.status, "HTTPHeaders": dict(response.headers)}
        raise ClientError({"Error": error, "ResponseMetadata": metadata}, operation)

    async def _wait_or_raise(self, error: Exception, url: str, attempt: int) -> None:
        """Wait before the next try after a connection failure, or raise it as botocore does."""
        if attempt < MAX_ATTEMPTS:
            logger.info("S3 request to %s failed with %r; trying again", url, error)
            await _backoff(attempt)
            return
        if isinstance(error, aiohttp.ClientConnectorError):
            raise EndpointConnectionError(endpoint_url=url) from error
        raise HTTPClientError(error=error) from error


def _environment_proxy(endpoint_url: str) -> str | None:
    """Return the proxy URL that the environment names for `endpoint_url`, if any."""
    parts = urlsplit(endpoint_url)
    if urllib.request.proxy_bypass_environment(parts.hostname or ""):
        return None
    return urllib.request.getproxies_environment().get(parts.scheme)


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(random.uniform(0, RETRY_BASE_SECONDS * 2 ** (attempt - 1)))


async def _read_limited(response: aiohttp.ClientResponse, max_bytes: int) -> StoredObject:
    """Read a GET response's body unless it is over `max_bytes`, which leaves it unread."""
    info = _object_info(response.headers)
    if info.size > max_bytes:
        return StoredObject(info, None)
    if "Content-Length" in response.headers:
        return StoredObject(info, await response.read())
    # Without a length, chunks are counted as they arrive.
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > max_bytes:
            return StoredObject(replace(info, size=size), None)
        chunks.append(chunk)
    return StoredObject(replace(info, size=size), b"".join(chunks))


def _object_info(headers: Mapping[str, str]) -> ObjectInfo:
    metadata = {
        name[len(METADATA_PREFIX) :].lower(): value
        for name, value in headers.items()
        if name.lower().startswith(METADATA_PREFIX)
    }
    return ObjectInfo(
        size=int(headers.get("Content-Length", "0")),
        content_type=headers.get("Content-Type", ""),
        metadata=metadata,
    )
