"""Hostile uploads through the real presigned form, SeaweedFS and a real arq worker."""

from __future__ import annotations

import html
import io
import logging
import math
import os
import re
import struct
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
from PIL import ExifTags, Image

from gallery import index, storage
from gallery.settings import Settings
from tests.support import HTMX, post_to_s3, webp_chunk_ids
from worker.settings import make_worker

# The peak resident set size that a process-pool child of the worker may reach while it
# rejects a decompression bomb.
MAX_POOL_PEAK_BYTES = 300 * 1024 * 1024

# How far the peak of a child that rejects a bomb may rise above that of a child that
# processed a 64x48 JPEG. Decoding the smaller bomb alone would take 100 MB.
MAX_BOMB_PEAK_ABOVE_BASELINE_BYTES = 40 * 1024 * 1024

FORM_TYPE_MESSAGE = "Only JPEG, PNG, WebP, GIF, HEIC and TIFF images can be uploaded."

SVG = (
    b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b'<rect width="10" height="10" fill="red"/><script>alert(document.cookie)</script></svg>'
)
APPENDED_HTML = b"<html><script>alert(1)</script></html>"

# RFC 7230 token and quoted-string, the parts of an RFC 6266 Content-Disposition.
TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
QUOTED_STRING = r'"(?:[^"\\]|\\.)*"'
DISPOSITION_PARAMETER = re.compile(rf"\s*;\s*({TOKEN})\s*=\s*({TOKEN}|{QUOTED_STRING})\s*")


@dataclass(frozen=True)
class WorkerRun:
    """What a measured worker run did: its job counters and its pool children's peak RSS."""

    jobs_complete: int
    jobs_failed: int
    jobs_retried: int
    pool_peak_bytes: dict[int, int]


def pool_children_peak_bytes() -> dict[int, int]:
    """Read VmHWM, the peak resident set size, of each spawned child of this process."""
    peaks = {}
    for status_path in Path("/proc").glob("[0-9]*/status"):
        try:
            status = status_path.read_text()
            command_line = (status_path.parent / "cmdline").read_bytes()
        except OSError:
            # The process ended between the listing and the read.
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        is_child = int(fields["PPid"]) == os.getpid()
        if is_child and b"spawn_main" in command_line:
            peaks[int(fields["Pid"])] = int(fields["VmHWM"].split()[0]) * 1024
    return peaks


@pytest.fixture
def run_measured_worker(settings: Settings) -> Callable[[], Awaitable[WorkerRun]]:
    """Hand over a function that runs a real arq worker until the queue is empty.

    It reads the peak memory of the pool children that the worker started just before it
    shuts the pool down, because a child's /proc entry goes away once the pool joins it.
    getrusage(RUSAGE_CHILDREN) does see a joined child, but it keeps the largest child of
    the whole test session, so it cannot show the peak of one run.
    """

    async def run() -> WorkerRun:
        worker = make_worker(settings, burst=True, poll_delay=0.05, handle_signals=False)
        shut_down = worker.on_shutdown
        earlier_children = set(pool_children_peak_bytes())
        peaks: dict[int, int] = {}

        async def measure_then_shut_down(ctx):
            for pid, peak in pool_children_peak_bytes().items():
                if pid not in earlier_children:
                    peaks[pid] = peak
            await shut_down(ctx)

        worker.on_shutdown = measure_then_shut_down
        try:
            await worker.main()
        finally:
            await worker.close()
        return WorkerRun(worker.jobs_complete, worker.jobs_failed, worker.jobs_retried, peaks)

    return run


def zero_png(width: int, height: int, bit_depth: int, *, rgb: bool = False) -> bytes:
    """Build a greyscale or RGB PNG of zeros, compressing batches of rows, holding no image."""
    channels = 3 if rgb else 1
    row = bytes(1 + math.ceil(width * bit_depth * channels / 8))
    compressor = zlib.compressobj(9)
    rows_per_batch = 500
    batches = [compressor.compress(row * rows_per_batch) for _ in range(height // rows_per_batch)]
    image_data = b"".join(batches)
    image_data += compressor.compress(row * (height % rows_per_batch)) + compressor.flush()
    colour_type = 2 if rgb else 0
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", image_data)
        + png_chunk(b"IEND", b"")
    )


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode(image: Image.Image, image_format: str, **params: object) -> bytes:
    output = io.BytesIO()
    image.save(output, image_format, **params)
    return output.getvalue()


def marked_image(width: int, height: int) -> Image.Image:
    """Build a dark image with a white square in its top left corner."""
    image = Image.new("RGB", (width, height), (40, 40, 40))
    image.paste((255, 255, 255), (0, 0, height // 2, height // 2))
    return image


def parse_content_disposition(value: str) -> tuple[str, list[tuple[str, str]]]:
    """Split a Content-Disposition into its type and its parameters, as RFC 6266 reads it.

    Parameter names are lowercased and quoted values unescaped. Anything that does not
    parse fails the test.
    """
    disposition_type = re.match(TOKEN, value)
    assert disposition_type, value
    parameters = []
    position = disposition_type.end()
    while position < len(value):
        parameter = DISPOSITION_PARAMETER.match(value, position)
        assert parameter, f"cannot parse {value[position:]!r} in {value!r}"
        name, raw = parameter.groups()
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        parameters.append((name.lower(), raw))
        position = parameter.end()
    return disposition_type.group().lower(), parameters


def saved_filename(parameters: list[tuple[str, str]]) -> str:
    """Return the name a browser saves under: RFC 6266 prefers filename* to filename."""
    values = dict(parameters)
    if "filename*" in values:
        charset, _language, encoded = values["filename*"].split("'", 2)
        return unquote(encoded, encoding=charset, errors="strict")
    return values["filename"]


async def fetch(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.get(url)


def thumbnail_url(tile_html: str) -> str:
    return html.unescape(tile_html.split('<img src="')[1].split('"')[0])


async def user_id_of(redis, upload_id: str) -> str:
    return (await index.get_upload(redis, upload_id)).user_id


async def assert_pages_render(client, upload_id: str) -> None:
    tile = await client.tile(upload_id)
    gallery_page = await client.http.get("/images")
    gallery_fragment = await client.http.get("/images", headers=HTMX)

    assert tile.status_code == 200, tile.text
    assert gallery_page.status_code == 200, gallery_page.text
    assert gallery_fragment.status_code == 200, gallery_fragment.text


@pytest.mark.parametrize(
    ("width", "height", "bit_depth"),
    [(20000, 20000, 1), (10000, 10000, 8)],
    ids=["1-bit-20000x20000", "8-bit-10000x10000"],
)
async def test_pixel_bomb_is_rejected_before_decoding(
    client, run_measured_worker, store, redis, caplog, width, height, bit_depth
):
    caplog.set_level(logging.INFO)
    bomb = zero_png(width, height, bit_depth)
    assert len(bomb) < 200_000
    baseline_id = await client.upload(encode(marked_image(64, 48), "JPEG"), "small.jpg")
    baseline = await run_measured_worker()
    caplog.clear()

    upload_id = await client.upload(bomb, "bomb.png", "image/png")
    run = await run_measured_worker()

    assert (await index.get_upload(redis, baseline_id)).state == index.State.READY
    assert baseline.pool_peak_bytes
    assert run.pool_peak_bytes
    baseline_peak = max(baseline.pool_peak_bytes.values())
    bomb_peak = max(run.pool_peak_bytes.values())
    peaks = f"pool peak RSS {bomb_peak / 2**20:.0f} MiB, baseline {baseline_peak / 2**20:.0f} MiB"
    assert bomb_peak < MAX_POOL_PEAK_BYTES, peaks
    assert bomb_peak - baseline_peak < MAX_BOMB_PEAK_ABOVE_BASELINE_BYTES, peaks

    assert run.jobs_complete == 1
    assert run.jobs_failed == 0
    assert run.jobs_retried == 0
    messages = [record.getMessage() for record in caplog.records]
    assert len([m for m in messages if f"verify:{upload_id}:verify_upload(" in m]) == 1
    assert len([m for m in messages if f"upload {upload_id} of user" in m]) == 1
    assert any(f"upload {upload_id}: too large: " in m for m in messages)

    tile = await client.tile(upload_id)
    assert "Rejected: over the " in tile.text
    assert "-megapixel limit" in tile.text
    assert "<img" not in tile.text
    user_id = await user_id_of(redis, upload_id)
    for key in storage.image_keys(user_id, upload_id):
        assert await store.head(key) is None, key
    await assert_pages_render(client, upload_id)
    original = await client.http.get(f"/images/{upload_id}/original", follow_redirects=False)
    assert original.status_code == 404


async def test_pool_peak_memory_shows_a_decoded_image(client, run_measured_worker, redis):
    # A check that the measurement above can fail: this 36-megapixel RGB PNG is within
    # every limit, and its decoded pixels alone take 108 MB in the pool child.
    baseline_id = await client.upload(encode(marked_image(64, 48), "JPEG"), "small.jpg")
    baseline = await run_measured_worker()
    upload_id = await client.upload(zero_png(6000, 6000, 8, rgb=True), "large.png", "image/png")

    run = await run_measured_worker()

    assert (await index.get_upload(redis, baseline_id)).state == index.State.READY
    assert (await index.get_upload(redis, upload_id)).state == index.State.READY
    baseline_peak = max(baseline.pool_peak_bytes.values())
    peak = max(run.pool_peak_bytes.values())
    peaks = f"pool peak RSS {peak / 2**20:.0f} MiB, baseline {baseline_peak / 2**20:.0f} MiB"
    assert peak - baseline_peak > 100 * 1024 * 1024, peaks


async def test_upload_after_truncated_jpeg_is_processed(client, run_worker, store, redis):
    noise = Image.frombytes("RGB", (1500, 1000), os.urandom(1500 * 1000 * 3))
    data = encode(noise, "JPEG", quality=90)
    truncated = data[: len(data) * 7 // 10]
    valid = encode(marked_image(800, 400), "JPEG", quality=95)

    truncated_id = await client.upload(truncated, "noise.jpg")
    valid_id = await client.upload(valid, "marked.jpg")
    await run_worker()

    rejected_tile = await client.tile(truncated_id)
    assert "Rejected: corrupt or incomplete" in rejected_tile.text
    user_id = await user_id_of(redis, truncated_id)
    for key in storage.image_keys(user_id, truncated_id):
        assert await store.head(key) is None, key

    thumbnail = await fetch(thumbnail_url((await client.tile(valid_id)).text))
    assert thumbnail.status_code == 200
    with Image.open(io.BytesIO(thumbnail.content), formats=["WEBP"]) as image:
        assert image.size == (256, 128)
        assert image.convert("L").getpixel((20, 20)) > 230
        assert image.convert("L").getpixel((200, 100)) < 60
    await assert_pages_render(client, valid_id)


@pytest.mark.parametrize("content_type", ["image/svg+xml", "text/html"])
async def test_svg_form_request_gets_message(client, content_type):
    response = await client.request_form("drawing.svg", content_type, len(SVG))

    assert response.status_code == 400
    assert response.json()["error"] == FORM_TYPE_MESSAGE


async def test_s3_rejects_svg_type_on_png_form(client, store, redis):
    response = await client.request_form("drawing.png", "image/png", len(SVG))
    form = response.json()

    posted = await post_to_s3(form, SVG, fields={"Content-Type": "image/svg+xml"})

    assert posted.status_code == 403, posted.text
    user_id = await user_id_of(redis, form["id"])
    assert await store.head(storage.incoming_key(user_id, form["id"])) is None


async def test_svg_sent_as_png_is_never_served(client, run_worker, store, redis, settings):
    upload_id = await client.upload(SVG, "drawing.png", "image/png")
    processing_tile = await client.tile(upload_id)
    await run_worker()

    tile = await client.tile(upload_id)
    gallery_page = await client.http.get("/images")
    original = await client.http.get(f"/images/{upload_id}/original", follow_redirects=False)

    assert "Rejected: not an image" in tile.text
    for page in (processing_tile.text, tile.text, gallery_page.text):
        assert "<img" not in page
        assert settings.presign_endpoint_url not in page
        assert f"/{settings.s3_bucket}/" not in page
        assert "X-Amz-Signature" not in page
    assert original.status_code == 404
    assert "location" not in original.headers
    user_id = await user_id_of(redis, upload_id)
    for key in storage.image_keys(user_id, upload_id):
        assert await store.head(key) is None, key
    await assert_pages_render(client, upload_id)


async def test_png_with_appended_html_serves_no_html(client, run_worker):
    data = encode(marked_image(96, 48), "PNG") + APPENDED_HTML

    upload_id = await client.upload(data, "page.png", "image/png")
    await run_worker()
    tile = await client.tile(upload_id)
    thumbnail = await fetch(thumbnail_url(tile.text))
    download = await client.http.get(f"/images/{upload_id}/original", follow_redirects=False)
    original = await fetch(download.headers["location"])

    assert thumbnail.status_code == 200
    assert thumbnail.headers["content-type"] == "image/webp"
    assert APPENDED_HTML not in thumbnail.content
    assert b"<script" not in thumbnail.content
    assert download.status_code in (302, 303, 307)
    assert original.status_code == 200
    assert original.headers["content-type"] == "image/png"
    disposition_type, parameters = parse_content_disposition(
        original.headers["content-disposition"]
    )
    assert disposition_type == "attachment"
    assert saved_filename(parameters) == "page.png"
    # The original is kept byte for byte, so the HTML is still in it.
    assert original.content == data


async def test_gps_photo_thumbnails_carry_no_exif(client, run_worker, corpus_dir: Path):
    paths = sorted((corpus_dir / "gps").glob("*.jpg"))
    assert paths
    uploads = {}
    for path in paths:
        data = path.read_bytes()
        assert Image.open(io.BytesIO(data)).getexif().get_ifd(ExifTags.IFD.GPSInfo), path.name
        uploads[path.name] = await client.upload(data, path.name)

    await run_worker()

    for name, upload_id in uploads.items():
        thumbnail = await fetch(thumbnail_url((await client.tile(upload_id)).text))
        assert thumbnail.status_code == 200, name
        assert "EXIF" not in webp_chunk_ids(thumbnail.content), name
        assert "XMP " not in webp_chunk_ids(thumbnail.content), name
        assert b"Exif\0\0" not in thumbnail.content, name
        with Image.open(io.BytesIO(thumbnail.content), formats=["WEBP"]) as image:
            assert "exif" not in image.info, name
            assert not image.getexif(), name
            assert not image.getexif().get_ifd(ExifTags.IFD.GPSInfo), name


@pytest.mark.parametrize("filename", ["Fête © 写真.jpg", 'a"; filename=x.html.jpg'])
async def test_download_keeps_awkward_name_without_injection(client, run_worker, filename):
    data = encode(marked_image(64, 48), "JPEG")

    upload_id = await client.upload(data, filename)
    await run_worker()
    download = await client.http.get(f"/images/{upload_id}/original", follow_redirects=False)
    original = await fetch(download.headers["location"])

    assert original.status_code == 200
    assert original.content == data
    assert original.headers["content-type"] == "image/jpeg"
    disposition_type, parameters = parse_content_disposition(
        original.headers["content-disposition"]
    )
    assert disposition_type == "attachment"
    assert [name for name, _ in parameters] == ["filename", "filename*"]
    assert saved_filename(parameters) == filename
    fallback = dict(parameters)["filename"]
    assert fallback.endswith(".jpg")
    assert '"' not in fallback
