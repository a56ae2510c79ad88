"""Thumbnails of the EXIF orientation photos, made through the presigned upload and the worker."""

from __future__ import annotations

import html
import io
from pathlib import Path

import httpx
from PIL import ExifTags, Image

from gallery import index
from gallery.index import State
from tests.support import UserClient, grey_signature, mean_difference

SHAPES = ("Landscape", "Portrait")

# Orientation 1 means "stored upright", so these files' thumbnails are the references.
REFERENCE_NAMES = {shape: f"{shape}_1.jpg" for shape in SHAPES}

# Mean absolute difference, in grey levels from 0 to 255, between 16x16 greyscale copies of
# two thumbnails, below which they show the same scene the same way up. Every thumbnail
# made here differs from its reference by less than 1, and each turned or mirrored copy
# of a reference differs from it by more than 30.
SAME_PICTURE_MAX_DIFFERENCE = 8

# Upright size of each shape's photo in pixels, whatever Orientation tag the file carries.
UPRIGHT_SIZES = {"Landscape": (1800, 1200), "Portrait": (1200, 1800)}


def image_difference(first: Image.Image, second: Image.Image) -> float:
    return mean_difference(grey_signature(first), grey_signature(second))


def with_invalid_orientation(path: Path) -> bytes:
    """Re-encode a photo as a JPEG whose EXIF Orientation is 9, a value EXIF does not define."""
    with Image.open(path) as image:
        exif = image.getexif()
        exif[ExifTags.Base.Orientation] = 9
        output = io.BytesIO()
        image.save(output, "JPEG", quality=95, exif=exif)
    return output.getvalue()


def read_orientation_photos(corpus_dir: Path) -> dict[str, bytes]:
    """Read every corpus orientation photo, plus one with Orientation 9 per shape."""
    folder = corpus_dir / "orientation"
    photos = {}
    for shape in SHAPES:
        for orientation in range(9):
            name = f"{shape}_{orientation}.jpg"
            photos[name] = (folder / name).read_bytes()
        photos[f"{shape}_9.jpg"] = with_invalid_orientation(folder / REFERENCE_NAMES[shape])
    return photos


async def upload_and_process(
    client: UserClient, run_worker, photos: dict[str, bytes]
) -> dict[str, str]:
    """Upload every photo, run the worker once, and return each photo's upload id."""
    upload_ids = {name: await client.upload(data, name) for name, data in photos.items()}
    await run_worker()
    return upload_ids


async def fetch_thumbnail(client: UserClient, upload_id: str) -> Image.Image:
    """Fetch a ready tile's thumbnail through the presigned GET URL in its HTML."""
    tile = await client.tile(upload_id)
    assert 'class="tile tile-ready"' in tile.text, tile.text
    url = html.unescape(tile.text.split('<img src="')[1].split('"')[0])

    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(url)

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/webp"
    thumbnail = Image.open(io.BytesIO(response.content), formats=["WEBP"])
    thumbnail.load()
    return thumbnail


async def test_every_orientation_gives_upright_thumbnail(client, run_worker, redis, corpus_dir):
    photos = read_orientation_photos(corpus_dir)
    for shape in SHAPES:
        with Image.open(io.BytesIO(photos[f"{shape}_9.jpg"])) as invalid:
            assert invalid.getexif()[ExifTags.Base.Orientation] == 9

    upload_ids = await upload_and_process(client, run_worker, photos)
    thumbnails = {
        name: await fetch_thumbnail(client, upload_id) for name, upload_id in upload_ids.items()
    }

    for name, upload_id in upload_ids.items():
        shape = name.split("_")[0]
        upload = await index.get_upload(redis, upload_id)
        reference = thumbnails[REFERENCE_NAMES[shape]]
        assert upload.state == State.READY, f"{name}: {upload.reason}"
        assert (upload.width, upload.height) == UPRIGHT_SIZES[shape], name
        assert thumbnails[name].size == reference.size, name
    differences = {
        name: image_difference(thumbnail, thumbnails[REFERENCE_NAMES[name.split("_")[0]]])
        for name, thumbnail in thumbnails.items()
    }
    turned = {
        name: difference
        for name, difference in differences.items()
        if difference >= SAME_PICTURE_MAX_DIFFERENCE
    }
    assert turned == {}


async def test_turned_reference_thumbnail_does_not_match(client, run_worker, corpus_dir):
    folder = corpus_dir / "orientation"
    photos = {name: (folder / name).read_bytes() for name in REFERENCE_NAMES.values()}

    upload_ids = await upload_and_process(client, run_worker, photos)

    for name, upload_id in upload_ids.items():
        reference = await fetch_thumbnail(client, upload_id)
        for transpose in Image.Transpose:
            difference = image_difference(reference.transpose(transpose), reference)
            assert difference > SAME_PICTURE_MAX_DIFFERENCE, f"{name} {transpose.name}"
