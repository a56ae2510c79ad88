"""Test helpers: a signed-in test client that uploads through the real presigned form."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from litestar.testing import AsyncTestClient
from PIL import Image

from gallery import index
from gallery.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_PASSWORD = "correct horse battery staple"
TEST_MAX_UPLOAD_BYTES = 5 * 1024 * 1024
HTMX = {"HX-Request": "true"}
# Variables of .env.example that only docker-compose.yml reads, for its own servers.
COMPOSE_ONLY_VARIABLES = ("VALKEY_PASSWORD",)


def make_jpeg(
    width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 40, 40)
) -> bytes:
    """Return a small JPEG of one colour."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def grey_signature(image: Image.Image) -> bytes:
    """Return a 16x16 greyscale copy of an image as bytes, for comparing what images show."""
    return image.convert("L").resize((16, 16), Image.Resampling.BOX).tobytes()


def mean_difference(first: bytes, second: bytes) -> float:
    """Return the mean absolute difference of two grey signatures, from 0 to 255."""
    return sum(abs(a - b) for a, b in zip(first, second, strict=True)) / len(first)


def webp_chunk_ids(data: bytes) -> list[str]:
    """List the RIFF chunk ids of a WebP file in order."""
    chunk_ids = []
    position = 12
    while position + 8 <= len(data):
        chunk_id = data[position : position + 4].decode("latin-1")
        (length,) = struct.unpack("<I", data[position + 4 : position + 8])
        chunk_ids.append(chunk_id)
        position += 8 + length + length % 2
    return chunk_ids


async def post_to_s3(
    form: dict[str, Any],
    data: bytes,
    *,
    fields: dict[str, str] | None = None,
    url: str | None = None,
) -> httpx.Response:
    """Post a file with a presigned form, as a browser does, optionally with changed fields."""
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(
            url or form["url"],
            data={**form["fields"], **(fields or {})},
            files={"file": ("upload", data, "application/octet-stream")},
        )


@dataclass
class UserClient:
    """A test client signed in as one user."""

    http: AsyncTestClient[Any]
    username: str

    @property
    def csrf(self) -> dict[str, str]:
        return {"x-csrftoken": self.http.cookies["csrftoken"]}

    async def request_form(self, filename: str, content_type: str, size: int) -> httpx.Response:
        body = {"filename": filename, "content_type": content_type, "size": size}
        return await self.http.post("/uploads", json=body, headers=self.csrf)

    async def complete(self, upload_id: str) -> httpx.Response:
        return await self.http.post(f"/uploads/{upload_id}/complete", headers={**self.csrf, **HTMX})

    async def upload(
        self, data: bytes, filename: str = "photo.jpg", content_type: str = "image/jpeg"
    ) -> str:
        """Upload through the real presigned form and report it done; return the upload id."""
        response = await self.request_form(filename, content_type, len(data))
        assert response.status_code == 201, response.text
        form = response.json()
        posted = await post_to_s3(form, data)
        assert posted.status_code == 201, posted.text
        completed = await self.complete(form["id"])
        assert completed.status_code == 200, completed.text
        return form["id"]

    async def tile(self, image_id: str) -> httpx.Response:
        return await self.http.get(f"/images/{image_id}/tile", headers=HTMX)

    async def delete(self, image_id: str) -> httpx.Response:
        return await self.http.delete(f"/images/{image_id}", headers={**self.csrf, **HTMX})


async def seed_grid(redis: Any, user_id: str, count: int, *, ready: bool = False) -> list[str]:
    """Put `count` uploads in a user's grid through the index, with no objects behind them."""
    created = []
    for _ in range(count):
        upload = await index.create_upload(
            redis,
            user_id=user_id,
            filename="seed.jpg",
            content_type="image/jpeg",
            max_bytes=1,
            form_seconds=60,
            max_pending=10**6,
        )
        await index.mark_uploaded(redis, upload)
        if ready:
            await index.mark_ready(
                redis, upload, content_type="image/jpeg", width=64, height=48, size=1
            )
        created.append(upload.id)
    return created


@contextmanager
def gallery_process(
    command: str, settings: Settings, log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `python -m gallery.cli COMMAND` with these settings, and stop it with SIGTERM."""
    log_path.parent.mkdir(exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gallery.cli", command],
            cwd=REPO_ROOT,
            env={**os.environ, **settings.to_env()},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
