"""The worker's renditions in the bucket, the grid's previews and the viewer page."""

from __future__ import annotations

import html
import io
import re
from pathlib import Path

import httpx
from PIL import Image

from gallery import index, storage
from gallery.index import State
from tests.support import make_jpeg

# Content types by file extension, as the upload page sends them.
CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".heic": "image/heic",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}


async def _image_size(store, key: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(await store.read(key))) as image:
        assert image.format == "WEBP"
        return image.size


async def test_worker_stores_three_renditions(client, run_worker, store, redis):
    upload_id = await client.upload(make_jpeg(3600, 2400), "wide.jpg")

    await run_worker()

    user_id = (await index.get_upload(redis, upload_id)).user_id
    assert await _image_size(store, storage.thumbnail_key(user_id, upload_id)) == (256, 171)
    assert await _image_size(store, storage.thumbnail_2x_key(user_id, upload_id)) == (512, 341)
    assert await _image_size(store, storage.display_key(user_id, upload_id)) == (1600, 1067)
    for key in storage.rendition_keys(user_id, upload_id):
        info = await store.head(key)
        assert info.content_type == "image/webp", key


async def test_small_image_is_never_enlarged(client, run_worker, store, redis):
    upload_id = await client.upload(make_jpeg(120, 80), "small.jpg")

    await run_worker()

    user_id = (await index.get_upload(redis, upload_id)).user_id
    for key in storage.rendition_keys(user_id, upload_id):
        assert await _image_size(store, key) == (120, 80), key


async def test_tile_has_2x_source_and_placeholder(client, run_worker):
    upload_id = await client.upload(make_jpeg(1200, 900), "dense.jpg")
    await run_worker()

    tile = (await client.tile(upload_id)).text
    srcset = html.unescape(re.search(r'srcset="([^"]+)"', tile).group(1))
    placeholder = re.search(r'class="placeholder" src="([^"]+)"', tile)
    urls = [part.rsplit(" ", 1) for part in srcset.split(", ")]
    async with httpx.AsyncClient() as http:
        answers = [await http.get(url) for url, _ in urls]

    assert [density for _, density in urls] == ["1x", "2x"]
    assert [answer.status_code for answer in answers] == [200, 200]
    with Image.open(io.BytesIO(answers[1].content)) as image:
        assert image.size == (512, 384)
    assert placeholder is not None
    assert placeholder.group(1).startswith("data:image/webp;base64,")
    assert len(placeholder.group(1)) < 400


async def test_viewer_shows_display_image(client, run_worker):
    upload_id = await client.upload(make_jpeg(2400, 1600), "big.jpg")
    await run_worker()

    page = await client.http.get(f"/images/{upload_id}/view")
    url = html.unescape(re.search(r'class="display" src="([^"]+)"', page.text).group(1))
    async with httpx.AsyncClient() as http:
        display = await http.get(url)

    assert page.status_code == 200
    assert "2400 × 1600 px" in page.text
    assert display.status_code == 200
    assert display.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(display.content)) as image:
        assert image.size == (1600, 1067)


async def test_viewer_of_other_image_404_unready_shows_status(make_client, run_worker):
    alice = await make_client()
    bob = await make_client()
    ready_id = await alice.upload(make_jpeg())
    await run_worker()
    processing_id = await alice.upload(make_jpeg())

    other = await bob.http.get(f"/images/{ready_id}/view")
    unready = await alice.http.get(f"/images/{processing_id}/view")

    assert other.status_code == 404
    # An image still being checked gets the status page, which reloads itself.
    assert unready.status_code == 200
    assert 'http-equiv="refresh"' in unready.text
    assert 'class="display"' not in unready.text


def _corpus_files(corpus_dir: Path, *folders: str) -> list[Path]:
    return sorted(
        path
        for folder in folders
        for path in (corpus_dir / folder).iterdir()
        if path.suffix.lower() in CONTENT_TYPES
    )


async def test_every_corpus_photo_becomes_ready(client, run_worker, redis, corpus_dir):
    files = _corpus_files(corpus_dir, "cameras", "gps", "mobile", "orientation", "heic", "tiff")
    assert len(files) >= 30

    ids = {
        path.name: await client.upload(
            path.read_bytes(), path.name, CONTENT_TYPES[path.suffix.lower()]
        )
        for path in files
    }
    await run_worker()

    states = {name: (await index.get_upload(redis, upload_id)) for name, upload_id in ids.items()}
    not_ready = {name: (u.state, u.reason) for name, u in states.items() if u.state != State.READY}
    assert not_ready == {}


async def test_broken_corpus_files_end_ready_or_rejected(client, run_worker, redis, corpus_dir):
    files = _corpus_files(corpus_dir, "broken")
    assert files

    ids = [await client.upload(path.read_bytes(), path.name, "image/jpeg") for path in files]
    await run_worker()

    for upload_id in ids:
        upload = await index.get_upload(redis, upload_id)
        assert upload.state in (State.READY, State.REJECTED), upload
