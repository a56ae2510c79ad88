"""Session-wide test fixtures: the photo corpus and the real services the suite runs on."""

import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gallery import index
from gallery.app import create_app
from gallery.embedded import EmbeddedRedis, EmbeddedS3
from gallery.logs import CONFIGURED_LOGGERS, GALLERY_HANDLER_NAME
from gallery.settings import Settings
from gallery.storage import Storage
from tests.support import TEST_MAX_UPLOAD_BYTES, TEST_PASSWORD, UserClient
from worker.settings import make_worker

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def logging_levels() -> dict[str, int]:
    """Hand over the levels of the loggers that `configure_logging` sets, before any test."""
    return {name: logging.getLogger(name).level for name in CONFIGURED_LOGGERS}


@pytest.fixture(autouse=True)
def restore_logging(logging_levels: dict[str, int]) -> Iterator[None]:
    """Undo the logging setup of each `gallery` command that a test or fixture runs.

    Without this, one command's levels would stay for the rest of the session, such as
    arq's job lines turned off, and its handler would write to a closed stream. Module
    fixtures run commands before a test starts, so the levels go back to the session's.
    """
    yield
    for name, level in logging_levels.items():
        logging.getLogger(name).setLevel(level)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == GALLERY_HANDLER_NAME]:
        root.removeHandler(handler)


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """Hand over the real photo corpus folder, or skip where this checkout has none.

    The folder is `GALLERY_CORPUS_DIR`, by default `../shared/corpus` beside the repository.
    CI always has it, so there a missing folder fails the test instead of skipping it.
    """
    path = Path(os.environ.get("GALLERY_CORPUS_DIR", REPO_ROOT.parent / "shared" / "corpus"))
    if path.is_dir():
        return path
    message = f"photo corpus not found at {path}; set GALLERY_CORPUS_DIR to its folder"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedS3]:
    """Hand over a SeaweedFS S3 server with a generated key pair, running for the session.

    Its `endpoint_url`, `access_key` and `secret_key` configure a client, and `client()`
    makes one. `object_only_keys` have rights on objects only, for least privilege.
    """
    server = EmbeddedS3(
        tmp_path_factory.mktemp("s3"),
        access_key=secrets.token_hex(10).upper(),
        secret_key=secrets.token_urlsafe(30),
        object_only_keys=(secrets.token_hex(10).upper(), secrets.token_urlsafe(30)),
    )
    with server:
        yield server


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Hand over `REDIS_URL` when set, otherwise the URL of a Valkey server for the session."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return

    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture(scope="session")
def settings(s3_server: EmbeddedS3, redis_url: str) -> Settings:
    """Hand over settings for the app and worker on the session's S3 and Redis servers."""
    return Settings(
        redis_url=redis_url,
        s3_endpoint_url=s3_server.endpoint_url,
        s3_bucket=f"test-{secrets.token_hex(4)}",
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        secret_key=secrets.token_urlsafe(32),
        max_upload_bytes=TEST_MAX_UPLOAD_BYTES,
    ).validated()


@pytest.fixture(scope="session")
async def store(settings: Settings) -> AsyncIterator[Storage]:
    """Hand over the storage module's client on the session's bucket, created on first use."""
    async with Storage.open(settings) as store:
        await store.ensure_bucket([settings.app_url])
        yield store


@pytest.fixture(scope="session")
async def redis(settings: Settings) -> AsyncIterator[ArqRedis]:
    """Hand over a client of the session's Redis that can also queue jobs, as the app's does."""
    client = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    yield client
    await client.aclose()


@pytest.fixture
def app(settings: Settings, store: Storage) -> Litestar:
    return create_app(settings)


@pytest.fixture
async def make_client(
    settings: Settings, store: Storage
) -> AsyncIterator[Callable[..., Awaitable[UserClient]]]:
    """Hand over a factory of test clients, each signed up as a new user.

    Each client gets its own app: a test client runs the app on its own event loop, and
    the session store's Redis client belongs to the loop it first ran on.
    """
    async with AsyncExitStack() as stack:

        async def make(
            username: str | None = None, app_settings: Settings | None = None
        ) -> UserClient:
            app = create_app(app_settings or settings)
            client = await stack.enter_async_context(AsyncTestClient(app))
            username = username or f"user{secrets.token_hex(4)}"
            await client.get("/signup")
            response = await client.post(
                "/signup",
                data={"username": username, "password": TEST_PASSWORD},
                headers={"x-csrftoken": client.cookies["csrftoken"]},
            )
            assert response.status_code == 200, response.text
            return UserClient(client, username)

        yield make


@pytest.fixture
async def client(make_client: Callable[..., Awaitable[UserClient]]) -> UserClient:
    """Hand over a test client signed in as a new user."""
    return await make_client()


@pytest.fixture
def run_worker(settings: Settings) -> Callable[[], Awaitable[None]]:
    """Hand over a function that runs a real arq worker until the queue is empty."""

    async def run() -> None:
        worker = make_worker(settings, burst=True, poll_delay=0.05, handle_signals=False)
        try:
            await worker.main()
        finally:
            await worker.close()

    return run


@pytest.fixture
async def forget_uploads(redis: ArqRedis) -> AsyncIterator[list[str]]:
    """Hand over a list of upload ids whose records are deleted after the test.

    For a test that leaves an upload unfinished on purpose: the session's Redis is shared,
    and a later test's sweep would otherwise find the upload and act on it.
    """
    upload_ids: list[str] = []
    yield upload_ids
    for upload_id in upload_ids:
        upload = await index.get_upload(redis, upload_id)
        if upload is not None:
            await index.delete_upload(redis, upload)
