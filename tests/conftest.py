"""Session-wide test fixtures: the photo corpus and the real services the suite runs on."""

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from gallery.embedded import EmbeddedRedis, EmbeddedS3

REPO_ROOT = Path(__file__).resolve().parents[1]


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
    makes one.
    """
    server = EmbeddedS3(
        tmp_path_factory.mktemp("s3"),
        access_key=secrets.token_hex(10).upper(),
        secret_key=secrets.token_urlsafe(30),
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
