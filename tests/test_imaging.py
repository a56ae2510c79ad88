"""Tests of upload verification and thumbnails, on the real photo corpus and on generated files."""

import base64
import io
import json
import multiprocessing
import pickle
import random
import struct
import subprocess
import sys
import time
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from PIL import ExifTags, Image, ImageChops, ImageCms, ImageOps, ImageStat, PngImagePlugin

from gallery.imaging import (
    ALLOWED_TYPES,
    DEFAULT_MAX_ANIMATION_PIXELS,
    PLACEHOLDER_MAX_LENGTH,
    PLACEHOLDER_SIZE,
    ImageRejected,
    RejectionReason,
    Renditions,
    make_renditions,
)
from gallery.imaging.colour import convert_to_srgb
from gallery.imaging.heif import register_heif_opener
from tests.support import grey_signature, mean_difference, webp_chunk_ids

# These tests write HEIF files with Pillow, and decoding registers the HEIF opener only when
# the first HEIF upload arrives.
register_heif_opener()

MAX_PIXELS = 50_000_000

# Mean absolute difference, in grey levels from 0 to 255, between 16x16 greyscale copies of
# two pictures, below which they show the same scene the same way up. Thumbnails of the
# orientation photos differ from the upright original by less than 1, and a rotated or
# mirrored thumbnail differs by more than 30.
SAME_PICTURE_MAX_DIFFERENCE = 8

METADATA_CHUNKS = {"EXIF", "XMP ", "ICCP"}

# Limits with which make_renditions decodes a 512x512 JPEG at 1/8 scale, the draft path.
DRAFT_LIMITS = {"thumbnail_size": 16, "display_size": 64}

SVG = (
    b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
    b"<script>alert(1)</script></svg>"
)
HTML = b"<!DOCTYPE html><html><body><script>alert(document.cookie)</script></body></html>"


def encode(image: Image.Image, image_format: str, **params: object) -> bytes:
    output = io.BytesIO()
    image.save(output, image_format, **params)
    return output.getvalue()


def open_webp(data: bytes) -> Image.Image:
    """Decode a WebP completely, failing the test if it is not one."""
    image = Image.open(io.BytesIO(data), formats=["WEBP"])
    image.load()
    return image


def open_thumbnail(result: Renditions) -> Image.Image:
    return open_webp(result.thumbnail)


def assert_no_metadata(thumbnail: bytes) -> None:
    assert METADATA_CHUNKS.isdisjoint(webp_chunk_ids(thumbnail))
    assert not Image.open(io.BytesIO(thumbnail)).getexif()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """Build a PNG with a valid 8-bit RGB header of the given size and no pixel data at all."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")


def marked_image(width: int = 96, height: int = 48) -> Image.Image:
    """Build a dark image with a white square in its top left corner."""
    image = Image.new("RGB", (width, height), (40, 40, 40))
    image.paste((255, 255, 255), (0, 0, height // 2, height // 2))
    return image


def brightest_quadrant(image: Image.Image) -> str:
    quadrants = image.convert("L").resize((2, 2), Image.Resampling.BOX)
    names = {(0, 0): "top left", (1, 0): "top right", (0, 1): "bottom left", (1, 1): "bottom right"}
    brightest = max(names, key=quadrants.getpixel)
    return names[brightest]


def jpeg_with_orientation(orientation: int | None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    return encode(marked_image(), "JPEG", quality=95, exif=exif)


def s15_fixed16(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def xyz_tag(x: float, y: float, z: float) -> bytes:
    return b"XYZ \0\0\0\0" + s15_fixed16(x) + s15_fixed16(y) + s15_fixed16(z)


def linear_light_profile() -> bytes:
    """Build an ICC v2 display profile with sRGB primaries and gamma 1.0 curves.

    Pixel value 128 in this profile is 50% linear light, which is about 188 in sRGB.
    """
    gamma_one_curve = b"curv\0\0\0\0" + struct.pack(">I", 0)
    tags = [
        (b"wtpt", xyz_tag(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz_tag(0.4361, 0.2225, 0.0139)),
        (b"gXYZ", xyz_tag(0.3851, 0.7169, 0.0971)),
        (b"bXYZ", xyz_tag(0.1431, 0.0606, 0.7141)),
        (b"rTRC", gamma_one_curve),
        (b"gTRC", gamma_one_curve),
        (b"bTRC", gamma_one_curve),
    ]
    first_tag_offset = 128 + 4 + 12 * len(tags)
    tag_table = b""
    tag_data = b""
    for signature, data in tags:
        tag_table += signature + struct.pack(">II", first_tag_offset + len(tag_data), len(data))
        tag_data += data + b"\0" * (-len(data) % 4)

    size = first_tag_offset + len(tag_data)
    header = (
        struct.pack(">I", size)
        + b"\0" * 4
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 28
        + xyz_tag(0.9642, 1.0, 0.8249)[8:]
        + b"\0" * 48
    )
    return header + struct.pack(">I", len(tags)) + tag_table + tag_data


def animation(image_format: str) -> bytes:
    """Encode three frames, red, green and blue, of a 64x32 animation."""
    frames = [Image.new("RGB", (64, 32), colour) for colour in ("red", "lime", "blue")]
    if image_format == "GIF":
        frames = [frame.convert("P") for frame in frames]
    return encode(frames[0], image_format, save_all=True, append_images=frames[1:])


def noise_animation(image_format: str, frame_count: int, **params: object) -> bytes:
    """Encode an 8x8 animation of random frames, which no encoder merges into fewer frames."""
    generator = random.Random(frame_count)
    frames = [Image.frombytes("RGB", (8, 8), generator.randbytes(192)) for _ in range(frame_count)]
    return encode(frames[0], image_format, save_all=True, append_images=frames[1:], **params)


def gif_of_tiny_frames(
    frame_count: int, *, junk_between_frames: bytes = b"", canvas: tuple[int, int] = (100, 100)
) -> bytes:
    """Build a GIF, by default 100x100, whose frames are each one pixel, about 23 bytes a frame."""
    width, height = canvas
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    # A graphic control extension with a delay of 10 ms, then a 1x1 image descriptor.
    frame = (
        b"\x21\xf9\x04\x00\x01\x00\x00\x00"
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
        # LZW minimum code size 2, then one sub-block with the codes clear, 0 and end.
        + b"\x02\x02\x44\x01\x00"
    )
    return screen + (frame + junk_between_frames) * frame_count + b";"


def with_actl_frame_count(apng: bytes, frame_count: int) -> bytes:
    """Replace the frame count that an APNG declares in its acTL chunk."""
    start = apng.index(b"acTL") - 4
    (_, plays) = struct.unpack(">II", apng[start + 8 : start + 16])
    chunk = png_chunk(b"acTL", struct.pack(">II", frame_count, plays))
    return apng[:start] + chunk + apng[start + 20 :]


def noise_image(size: int = 512) -> Image.Image:
    """Build a noisy image, which compresses badly, so that truncation cuts into the pixels.

    The noise is the same on every run. Image.effect_noise is not, and of its JPEGs without
    an end marker about 1 in 25 decode without error, because libjpeg finishes the scan
    before it requests more data. Those decode to the same pixels as the complete file.
    """
    generator = random.Random(size)
    return Image.frombytes("RGB", (size, size), generator.randbytes(size * size * 3))


def orientation_exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif


def truncated_ifd_jpeg() -> bytes:
    # The IFD promises 65535 entries and ends after the count.
    exif = b"Exif\0\0II*\0\x08\0\0\0\xff\xff"
    return encode(marked_image(), "JPEG", exif=exif)


def orientation_with_five_values_jpeg() -> bytes:
    # One Orientation entry of type SHORT with a count of 5 and its values at offset 0, which
    # Pillow 13 reads as 18761.
    entry = struct.pack("<HHII", ExifTags.Base.Orientation, 3, 5, 0)
    exif = b"Exif\0\0II*\0\x08\0\0\0" + struct.pack("<H", 1) + entry + b"\0\0\0\0"
    return encode(marked_image(), "JPEG", exif=exif)


def png_with_bad_raw_exif_profile() -> bytes:
    # ImageMagick stores EXIF in a PNG text chunk as hex. This chunk is not hex, so Pillow 13
    # raises ValueError when it reads the EXIF.
    text = PngImagePlugin.PngInfo()
    text.add_text("Raw profile type exif", "\nexif\n      10\nnot hex at all\n")
    return encode(marked_image(), "PNG", pnginfo=text)


def mutated_copies(data: bytes, count: int, seed: int) -> list[bytes]:
    """Return truncated copies and copies with a few random bytes replaced."""
    generator = random.Random(seed)
    copies = []
    for _ in range(count):
        mutated = bytearray(data)
        if generator.random() < 0.3:
            del mutated[generator.randrange(len(mutated)) :]
        else:
            for _ in range(generator.randint(1, 8)):
                mutated[generator.randrange(len(mutated))] = generator.randrange(256)
        copies.append(bytes(mutated))
    return copies


def transparent_corner(mode: str) -> bytes:
    image = Image.new("RGBA", (64, 64), (0, 128, 255, 255))
    image.paste((0, 0, 0, 0), (0, 0, 16, 16))
    if mode == "P":
        palette_image = image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
        transparent_index = palette_image.getpixel((0, 0))
        return encode(palette_image, "PNG", transparency=transparent_index)
    return encode(image.convert(mode), "PNG")


def upright_fit(size: tuple[int, int], box: int) -> tuple[int, int]:
    """Return the size that fits `size` into a square `box` without enlarging it."""
    width, height = size
    scale = min(1.0, box / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def rendition_boxes(result: Renditions) -> dict[str, tuple[bytes, int]]:
    """Map each WebP rendition's name to its bytes and the box of the default sizes."""
    return {
        "display": (result.display, 1600),
        "thumbnail_2x": (result.thumbnail_2x, 512),
        "thumbnail": (result.thumbnail, 256),
    }


def open_placeholder(placeholder: str) -> Image.Image:
    prefix = "data:image/webp;base64,"
    assert placeholder.startswith(prefix)
    return open_webp(base64.b64decode(placeholder.removeprefix(prefix), validate=True))


def colour_signature(image: Image.Image) -> bytes:
    """Return a 16x16 RGB copy of an image as bytes, for comparing colours."""
    return image.convert("RGB").resize((16, 16), Image.Resampling.BOX).tobytes()


def max_difference(first: bytes, second: bytes) -> int:
    return max(abs(a - b) for a, b in zip(first, second, strict=True))


def on_white(image: Image.Image) -> Image.Image:
    """Composite an image onto white, as a page with a white background shows it."""
    background = Image.new("RGBA", image.size, "white")
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


def marked_with_orientation(image_format: str, orientation: int, size=(96, 48)) -> bytes:
    exif = orientation_exif(orientation)
    # pillow-heif writes the HEIF rotation and mirror properties only from EXIF bytes.
    if image_format == "HEIF":
        return encode(marked_image(*size), "HEIF", exif=exif.tobytes(), quality=90)
    return encode(marked_image(*size), image_format, exif=exif)


def without_jpeg_segment(data: bytes, marker: bytes) -> bytes:
    """Remove the first segment with the given two-byte marker from a JPEG."""
    start = data.index(marker)
    (length,) = struct.unpack(">H", data[start + 2 : start + 4])
    return data[:start] + data[start + 2 + length :]


def plain_cmyk_jpeg(ink: tuple[int, int, int, int]) -> bytes:
    """Encode a CMYK JPEG that stores plain ink values and has no Adobe APP14 segment."""
    # Pillow writes every CMYK JPEG with inverted values, so the inverse of the ink is saved.
    inverted = tuple(255 - value for value in ink)
    data = encode(Image.new("CMYK", (64, 64), inverted), "JPEG", quality=100)
    return without_jpeg_segment(data, b"\xff\xee")


def ycck_jpeg(ink: tuple[int, int, int, int]) -> bytes:
    """Encode a JPEG in Adobe's YCCK colour space, as Photoshop writes CMYK JPEGs.

    libjpeg turns YCbCr back into RGB, takes C, M and Y as 255 minus R, G and B, and
    leaves K. The result is in Adobe's inverted convention, so each ink is inverted first.
    """
    cyan, magenta, yellow, black = (255 - value for value in ink)
    luma, blue_difference, red_difference = (
        Image.new("RGB", (1, 1), (255 - cyan, 255 - magenta, 255 - yellow))
        .convert("YCbCr")
        .getpixel((0, 0))
    )
    stored = (luma, blue_difference, red_difference, black)
    # Pillow inverts the values it writes, and writes an APP14 segment with transform 0
    # (CMYK). Transform 2 declares YCCK.
    data = encode(Image.new("CMYK", (64, 64), tuple(255 - v for v in stored)), "JPEG", quality=100)
    transform = data.index(b"Adobe") + 11
    return data[:transform] + b"\x02" + data[transform + 1 :]


def horizontal_gradient(mode: str, maximum: float, width: int = 512) -> Image.Image:
    """Build a 64-row gradient from 0 on the left to `maximum` on the right in a wide mode."""
    values = [maximum * x / (width - 1) for x in range(width)]
    if mode == "F":
        row = struct.pack(f"<{width}f", *values)
    elif mode == "I":
        row = struct.pack(f"<{width}i", *map(round, values))
    else:
        byte_order = ">" if mode == "I;16B" else "<"
        row = struct.pack(f"{byte_order}{width}H", *map(round, values))
    return Image.frombytes(mode, (width, 64), row * 64)


def transparent_quadrant(kind: str) -> tuple[bytes, str]:
    """Encode a 1024x1024 blue image whose top left quadrant is fully transparent.

    The quadrant's colour channels are black, as many editors store them. Every rendition
    of the default sizes is resized from it.
    """
    image = Image.new("RGBA", (1024, 1024), (0, 90, 200, 255))
    image.paste((0, 0, 0, 0), (0, 0, 512, 512))
    if kind == "LA":
        return encode(image.convert("LA"), "PNG"), "image/png"
    if kind == "RGBA":
        return encode(image, "PNG"), "image/png"

    palette_image = Image.new("P", image.size, 1)
    palette_image.putpalette([0, 0, 0, 0, 90, 200])
    palette_image.paste(0, (0, 0, 512, 512))
    if kind == "P":
        return encode(palette_image, "PNG", transparency=0), "image/png"
    return encode(palette_image, "GIF", transparency=0), "image/gif"


@pytest.mark.parametrize("orientation", range(9))
@pytest.mark.parametrize("shape", ["Landscape", "Portrait"])
def test_oriented_photo_thumbnail_is_upright(corpus_dir: Path, shape: str, orientation: int):
    upright = Image.open(corpus_dir / "orientation" / f"{shape}_1.jpg")
    data = (corpus_dir / "orientation" / f"{shape}_{orientation}.jpg").read_bytes()

    result = make_renditions(data, "image/jpeg", max_pixels=MAX_PIXELS)

    thumbnail = open_thumbnail(result)
    assert (result.width, result.height) == upright.size
    assert max(thumbnail.size) == 256
    assert (thumbnail.width > thumbnail.height) == (upright.width > upright.height)
    difference = mean_difference(grey_signature(thumbnail), grey_signature(upright))
    assert difference < SAME_PICTURE_MAX_DIFFERENCE


@pytest.mark.parametrize("transpose", list(Image.Transpose))
@pytest.mark.parametrize("shape", ["Landscape", "Portrait"])
def test_orientation_check_detects_turned_thumbnail(
    corpus_dir: Path, shape: str, transpose: Image.Transpose
):
    upright = Image.open(corpus_dir / "orientation" / f"{shape}_1.jpg")
    data = (corpus_dir / "orientation" / f"{shape}_1.jpg").read_bytes()
    thumbnail = open_thumbnail(make_renditions(data, "image/jpeg", max_pixels=MAX_PIXELS))

    turned = thumbnail.transpose(transpose)

    difference = mean_difference(grey_signature(turned), grey_signature(upright))
    assert difference > SAME_PICTURE_MAX_DIFFERENCE


@pytest.mark.parametrize("folder", ["cameras", "gps", "mobile"])
def test_corpus_photos_make_clean_thumbnails(corpus_dir: Path, folder: str):
    paths = sorted((corpus_dir / folder).glob("*.jpg"))
    assert paths

    for path in paths:
        upright_size = ImageOps.exif_transpose(Image.open(path)).size

        result = make_renditions(path.read_bytes(), "image/jpeg", max_pixels=MAX_PIXELS)

        thumbnail = open_thumbnail(result)
        assert result.content_type == "image/jpeg", path.name
        assert (result.width, result.height) == upright_size, path.name
        assert max(thumbnail.size) == min(256, max(upright_size)), path.name
        assert_no_metadata(result.thumbnail)


def test_gps_photos_lose_their_location(corpus_dir: Path):
    paths = sorted((corpus_dir / "gps").glob("*.jpg"))
    assert paths

    for path in paths:
        assert Image.open(path).getexif().get_ifd(ExifTags.IFD.GPSInfo), path.name

        result = make_renditions(path.read_bytes(), "image/jpeg", max_pixels=MAX_PIXELS)

        assert "EXIF" not in webp_chunk_ids(result.thumbnail), path.name
        assert not open_thumbnail(result).getexif().get_ifd(ExifTags.IFD.GPSInfo), path.name


# The main scan of corrupted.jpg ends early. libjpeg fills its last 24 rows with grey and
# Pillow 13 raises no error, so it processes. The two others have no EXIF block, only a
# large XMP packet in APP1, which is no problem for Pillow.
@pytest.mark.parametrize(
    ("name", "size", "thumbnail_size"),
    [
        ("corrupted.jpg", (3648, 2736), (256, 192)),
        ("image00971.jpg", (636, 227), (256, 91)),
        ("image01137.jpg", (88, 64), (88, 64)),
    ],
)
def test_broken_corpus_file_processes(
    corpus_dir: Path, name: str, size: tuple[int, int], thumbnail_size: tuple[int, int]
):
    data = (corpus_dir / "broken" / name).read_bytes()

    result = make_renditions(data, "image/jpeg", max_pixels=MAX_PIXELS)

    assert (result.width, result.height) == size
    assert open_thumbnail(result).size == thumbnail_size
    assert_no_metadata(result.thumbnail)


@pytest.mark.parametrize("orientation", [None, 0, 1, 9, 255])
def test_invalid_orientation_keeps_stored_image(orientation: int | None):
    data = jpeg_with_orientation(orientation)

    result = make_renditions(data, "image/jpeg", max_pixels=MAX_PIXELS)

    thumbnail = open_thumbnail(result)
    assert (result.width, result.height) == (96, 48)
    assert thumbnail.size == (96, 48)
    assert brightest_quadrant(thumbnail) == "top left"


@pytest.mark.parametrize(
    ("orientation", "size", "quadrant"),
    [
        (2, (96, 48), "top right"),
        (3, (96, 48), "bottom right"),
        (6, (48, 96), "top right"),
        (8, (48, 96), "bottom left"),
    ],
)
def test_valid_orientation_turns_image_upright(
    orientation: int, size: tuple[int, int], quadrant: str
):
    data = jpeg_with_orientation(orientation)

    result = make_renditions(data, "image/jpeg", max_pixels=MAX_PIXELS)

    thumbnail = open_thumbnail(result)
    assert (result.width, result.height) == size
    assert thumbnail.size == size
    assert brightest_quadrant(thumbnail) == quadrant


@pytest.mark.parametrize(
    ("size", "display_size"),
    [
        # At 1/4 scale 940x500, at least 90% of the 1000 px box, so no resize follows.
        ((3760, 2000), (940, 500)),
        # At 1/4 scale 800x500, below 90%, so it decodes at 1/2 scale and resizes to fit.
        ((3200, 2000), (1000, 625)),
    ],
)
def test_display_keeps_draft_within_90_percent(size, display_size):
    data = encode(marked_image(*size), "JPEG")

    result = make_renditions(data, "image/jpeg", max_pixels=MAX_PIXELS, display_size=1000)

    assert open_webp(result.display).size == display_size
    assert open_webp(result.thumbnail_2x).size == upright_fit(size, 512)
    assert open_thumbnail(result).size == upright_fit(size, 256)
    assert (result.width, result.height) == size


def test_drafted_jpeg_is_turned_upright():
    # With a display size of 512, this 2048x1024 JPEG is decoded at 1/4 scale before it turns.
    data = encode(marked_image(2048, 1024), "JPEG", exif=orientation_exif(6))

    result = make_renditions(data, "image/jpeg", max_pixels=MAX_PIXELS, display_size=512)

    thumbnail = open_thumbnail(result)
    assert (result.width, result.height) == (1024, 2048)
    assert thumbnail.size == (128, 256)
    assert brightest_quadrant(thumbnail) == "top right"


@pytest.mark.parametrize(
    ("make_data", "claimed_type"),
    [
        (truncated_ifd_jpeg, "image/jpeg"),
        (orientation_with_five_values_jpeg, "image/jpeg"),
        (png_with_bad_raw_exif_profile, "image/png"),
    ],
)
def test_broken_exif_keeps_stored_image(make_data, claimed_type: str):
    data = make_data()

    result = make_renditions(data, claimed_type, max_pixels=MAX_PIXELS)

    assert (result.width, result.height) == (96, 48)
    assert brightest_quadrant(open_thumbnail(result)) == "top left"


@pytest.mark.parametrize(
    ("image_format", "params", "claimed_type"),
    [
        ("JPEG", {}, "image/jpeg"),
        ("JPEG", {"progressive": True}, "image/jpeg"),
        ("PNG", {}, "image/png"),
        ("GIF", {}, "image/gif"),
        ("WEBP", {}, "image/webp"),
        ("WEBP", {"lossless": True}, "image/webp"),
    ],
)
@pytest.mark.parametrize("kept_fraction", [0.5, 0.9])
def test_truncated_image_is_corrupt(
    image_format: str, params: dict, claimed_type: str, kept_fraction: float
):
    data = encode(noise_image(), image_format, **params)
    truncated = data[: int(len(data) * kept_fraction)]
    complete = make_renditions(data, claimed_type, max_pixels=MAX_PIXELS, **DRAFT_LIMITS)
    assert complete.width == 512

    with pytest.raises(ImageRejected) as rejection:
        make_renditions(truncated, claimed_type, max_pixels=MAX_PIXELS, **DRAFT_LIMITS)

    assert rejection.value.reason == RejectionReason.CORRUPT


def test_jpeg_without_end_marker_is_corrupt():
    data = encode(noise_image(), "JPEG")
    assert data.endswith(b"\xff\xd9")

    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data[:-2], "image/jpeg", max_pixels=MAX_PIXELS, **DRAFT_LIMITS)

    assert rejection.value.reason == RejectionReason.CORRUPT


@pytest.mark.parametrize("claimed_type", ALLOWED_TYPES)
def test_mutated_image_raises_only_rejection(claimed_type: str):
    exif = orientation_exif(6)
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] = "N"
    image = Image.effect_mandelbrot((120, 80), (-2, -1, 1, 1), 50).convert("RGB")
    data = encode(image, ALLOWED_TYPES[claimed_type], exif=exif)

    # Any exception other than ImageRejected fails the test on the spot.
    outcomes = set()
    for mutated in mutated_copies(data, count=300, seed=1):
        try:
            make_renditions(mutated, claimed_type, max_pixels=MAX_PIXELS)
        except ImageRejected as rejection:
            outcomes.add(rejection.reason)
        else:
            outcomes.add("processed")

    assert RejectionReason.CORRUPT in outcomes


@pytest.mark.parametrize(
    ("image_format", "claimed_type"),
    [
        ("PNG", "image/jpeg"),
        ("JPEG", "image/png"),
        ("GIF", "image/webp"),
        ("WEBP", "image/gif"),
    ],
)
def test_other_allowed_format_is_type_mismatch(image_format: str, claimed_type: str):
    data = encode(marked_image(), image_format)

    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, claimed_type, max_pixels=MAX_PIXELS)

    assert rejection.value.reason == RejectionReason.TYPE_MISMATCH
    assert image_format in rejection.value.detail
    assert claimed_type in rejection.value.detail
    assert rejection.value.message.startswith("the file is a ")


@pytest.mark.parametrize(
    "claimed_type", ["image/svg+xml", "image/bmp", "text/html", "IMAGE/PNG", ""]
)
def test_unlisted_claimed_type_is_mismatch(claimed_type: str):
    data = encode(marked_image(), "PNG")

    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, claimed_type, max_pixels=MAX_PIXELS)

    assert rejection.value.reason == RejectionReason.TYPE_MISMATCH


@pytest.mark.parametrize(
    ("data", "claimed_type"),
    [
        (SVG, "image/png"),
        (SVG, "image/svg+xml"),
        (HTML, "image/png"),
        (b"", "image/png"),
    ],
)
def test_markup_is_not_an_image(data: bytes, claimed_type: str):
    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, claimed_type, max_pixels=MAX_PIXELS)

    assert rejection.value.reason == RejectionReason.NOT_AN_IMAGE


def test_appended_html_stays_out_of_thumbnail():
    data = encode(marked_image(), "PNG") + HTML

    result = make_renditions(data, "image/png", max_pixels=MAX_PIXELS)

    assert open_thumbnail(result).size == (96, 48)
    assert HTML not in result.thumbnail
    assert b"<script" not in result.thumbnail


def test_multi_picture_jpeg_counts_as_jpeg():
    data = encode(marked_image(), "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    assert Image.open(io.BytesIO(data)).format == "MPO"

    result = make_renditions(data, "image/jpeg", max_pixels=MAX_PIXELS)

    assert result.content_type == "image/jpeg"
    assert brightest_quadrant(open_thumbnail(result)) == "top left"


def test_pixel_count_above_maximum_is_too_large():
    data = png_header_only(5000, 5000)

    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, "image/png", max_pixels=10_000_000)

    assert rejection.value.reason == RejectionReason.TOO_LARGE
    assert rejection.value.detail == "5000x5000 = 25000000 pixels exceeds the maximum of 10000000"
    assert rejection.value.message == "5000x5000 pixels, over the 10-megapixel limit"


def test_header_only_png_within_maximum_is_corrupt():
    # Decoding a header-only PNG fails. So "too large" for the bigger header-only PNGs
    # proves that their size was checked before any pixel was decoded.
    data = png_header_only(100, 100)

    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, "image/png", max_pixels=10_000_000)

    assert rejection.value.reason == RejectionReason.CORRUPT


# 30000x30000 is above twice Image.MAX_IMAGE_PIXELS, where Pillow raises
# DecompressionBombError. 10000x10000 is between the two, where Pillow only warns.
@pytest.mark.parametrize(("width", "height"), [(30000, 30000), (10000, 10000)])
def test_decompression_bomb_is_too_large(width: int, height: int):
    data = png_header_only(width, height)
    filters_before = list(warnings.filters)
    max_image_pixels_before = Image.MAX_IMAGE_PIXELS

    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, "image/png", max_pixels=10**10)

    assert rejection.value.reason == RejectionReason.TOO_LARGE
    assert "decompression bomb" in rejection.value.detail
    limit = f"{round(Image.MAX_IMAGE_PIXELS / 1_000_000, 1):g}"
    assert rejection.value.message == f"over the {limit}-megapixel limit"
    assert warnings.filters == filters_before
    assert Image.MAX_IMAGE_PIXELS == max_image_pixels_before


@pytest.mark.parametrize(
    ("image_format", "claimed_type"), [("GIF", "image/gif"), ("WEBP", "image/webp")]
)
def test_animation_thumbnail_shows_first_frame(image_format: str, claimed_type: str):
    data = animation(image_format)
    assert Image.open(io.BytesIO(data)).n_frames == 3

    result = make_renditions(data, claimed_type, max_pixels=MAX_PIXELS)

    thumbnail = open_thumbnail(result)
    red, green, blue = thumbnail.convert("RGB").getpixel((32, 16))
    assert getattr(thumbnail, "n_frames", 1) == 1
    assert red > 200
    assert green < 60
    assert blue < 60


@pytest.mark.parametrize(
    ("image_format", "params", "claimed_type"),
    [
        ("GIF", {}, "image/gif"),
        ("PNG", {}, "image/png"),
        ("WEBP", {"lossless": True}, "image/webp"),
        ("WEBP", {}, "image/webp"),
    ],
)
def test_animation_over_pixel_budget_is_too_large(
    image_format: str, params: dict, claimed_type: str
):
    data = noise_animation(image_format, 31, **params)
    assert Image.open(io.BytesIO(data)).n_frames == 31

    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, claimed_type, max_pixels=MAX_PIXELS, max_animation_pixels=30 * 8 * 8)

    assert rejection.value.reason == RejectionReason.TOO_LARGE
    expected = (
        f"{image_format} animation has more than 30 frames of 8x8 pixels, above the maximum"
        " of 1920 pixels in all frames"
    )
    assert rejection.value.detail == expected


def pillow_gif_with_extensions() -> bytes:
    # Comments, a loop count and a local colour table for each frame.
    return noise_animation("GIF", 12, loop=0, comment=b"made by a test", duration=40)


def gif_with_junk_between_frames() -> bytes:
    return gif_of_tiny_frames(12, junk_between_frames=b"\x00\x99junk")


def gif_with_long_frames() -> bytes:
    # Each frame's data spans many 255-byte sub-blocks.
    generator = random.Random(7)
    frames = [Image.frombytes("L", (200, 200), generator.randbytes(40000)) for _ in range(5)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


@pytest.mark.parametrize(
    "make_gif", [pillow_gif_with_extensions, gif_with_junk_between_frames, gif_with_long_frames]
)
def test_gif_frame_count_matches_pillow(make_gif):
    data = make_gif()
    image = Image.open(io.BytesIO(data))
    frame_count = image.n_frames
    budget = frame_count * image.width * image.height

    make_renditions(data, "image/gif", max_pixels=MAX_PIXELS, max_animation_pixels=budget)
    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, "image/gif", max_pixels=MAX_PIXELS, max_animation_pixels=budget - 1)

    assert frame_count > 1
    assert rejection.value.reason == RejectionReason.TOO_LARGE


def test_million_frame_gif_is_rejected_quickly():
    # Pillow's n_frames reads all 1,000,000 frame headers of this 23 MB file, which takes
    # seconds. The count stops after 207,361 frames of 100x100 pixels, one frame over the
    # default animation pixel budget.
    data = gif_of_tiny_frames(1_000_000)
    assert len(data) < 25 * 1024 * 1024

    # CPU time, because other programs on a shared machine stretch the wall-clock time.
    started = time.process_time()
    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, "image/gif", max_pixels=MAX_PIXELS)
    elapsed = time.process_time() - started

    assert rejection.value.reason == RejectionReason.TOO_LARGE
    assert elapsed < 0.5


def test_apng_default_image_counts_as_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "lime", "blue")]
    data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], default_image=True)
    assert Image.open(io.BytesIO(data)).n_frames == 3

    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, "image/png", max_pixels=MAX_PIXELS, max_animation_pixels=2 * 64)

    assert rejection.value.reason == RejectionReason.TOO_LARGE


def test_canvas_of_animation_counts_against_max_pixels():
    data = noise_animation("GIF", 3)

    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, "image/gif", max_pixels=63)

    assert rejection.value.reason == RejectionReason.TOO_LARGE
    assert rejection.value.detail == "8x8 = 64 pixels exceeds the maximum of 63"


def test_mutated_animated_gif_raises_only_rejection():
    data = noise_animation("GIF", 6, comment=b"comment", loop=0)
    # The budget allows 3 of the 6 frames of 8x8 pixels.
    budget = 3 * 8 * 8

    # Any exception other than ImageRejected, such as an IndexError from the frame count,
    # fails the test on the spot.
    outcomes = set()
    for mutated in mutated_copies(data, count=300, seed=2):
        try:
            make_renditions(
                mutated, "image/gif", max_pixels=MAX_PIXELS, max_animation_pixels=budget
            )
        except ImageRejected as rejection:
            outcomes.add(rejection.reason)
        else:
            outcomes.add("processed")

    assert RejectionReason.TOO_LARGE in outcomes
    assert RejectionReason.CORRUPT in outcomes or RejectionReason.NOT_AN_IMAGE in outcomes


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_png_transparency_is_kept(mode: str):
    data = transparent_corner(mode)

    result = make_renditions(data, "image/png", max_pixels=MAX_PIXELS)

    thumbnail = open_thumbnail(result)
    assert thumbnail.mode == "RGBA"
    assert thumbnail.getpixel((2, 2))[3] == 0
    assert thumbnail.getpixel((40, 40))[3] == 255


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95)

    result = make_renditions(data, "image/jpeg", max_pixels=MAX_PIXELS)

    thumbnail = open_thumbnail(result)
    red, green, blue = thumbnail.getpixel((32, 32))
    assert thumbnail.mode == "RGB"
    assert red > 230
    assert green < 30
    assert blue < 30


def test_16_bit_grey_keeps_brightness():
    data = encode(Image.new("I;16", (64, 64), 32768), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"

    result = make_renditions(data, "image/png", max_pixels=MAX_PIXELS)

    red, green, blue = open_thumbnail(result).getpixel((32, 32))
    assert 120 < red < 136
    assert red == green == blue


@pytest.mark.parametrize(
    ("image_format", "claimed_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg")]
)
def test_colour_profile_is_converted_to_srgb(image_format: str, claimed_type: str):
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    data = encode(grey, image_format, icc_profile=linear_light_profile(), quality=95)

    result = make_renditions(data, claimed_type, max_pixels=MAX_PIXELS)

    red, green, blue = open_thumbnail(result).getpixel((32, 32))
    assert 182 < red < 194
    assert red == green == blue
    assert "ICCP" not in webp_chunk_ids(result.thumbnail)


def test_broken_colour_profile_is_ignored():
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    data = encode(grey, "PNG", icc_profile=b"not an ICC profile" * 10)

    result = make_renditions(data, "image/png", max_pixels=MAX_PIXELS)

    red, _, _ = open_thumbnail(result).getpixel((32, 32))
    assert 124 < red < 132


def test_camera_srgb_profile_leaves_pixels_unchanged(corpus_dir: Path):
    # Through LittleCMS 2.19 this profile turns the red of bright greens from 0 to 1, so
    # equal bytes show that the conversion was skipped.
    profile = Image.open(corpus_dir / "cameras" / "Canon_40D.jpg").info["icc_profile"]
    green_levels = bytes(value for level in range(256) for value in (0, level, 0))
    image = Image.frombytes("RGB", (256, 1), green_levels)
    image.info["icc_profile"] = profile

    converted = convert_to_srgb(image)

    assert converted.tobytes() == green_levels


def test_display_p3_profile_is_applied(corpus_dir: Path):
    profile = Image.open(corpus_dir / "heic" / "IMG_5195.HEIC").info["icc_profile"]
    image = Image.new("RGB", (8, 8), (60, 160, 90))
    image.info["icc_profile"] = profile

    red, green, blue = convert_to_srgb(image).getpixel((4, 4))

    # This Display P3 green lies outside sRGB, and LittleCMS 2.19 converts it to (0, 163, 82).
    assert red < 10
    assert 155 < green < 171
    assert 74 < blue < 90


def test_profile_cache_is_kept_per_mode():
    # The padding makes this profile new to the process's cache of transforms.
    profile = linear_light_profile() + b"\0" * 8
    grey = encode(Image.new("L", (64, 64), 128), "PNG", icc_profile=profile)
    colour = encode(Image.new("RGB", (64, 64), (128, 128, 128)), "PNG", icc_profile=profile)

    grey_result = make_renditions(grey, "image/png", max_pixels=MAX_PIXELS)
    colour_result = make_renditions(colour, "image/png", max_pixels=MAX_PIXELS)

    # An RGB profile cannot convert a greyscale image, so it is ignored there only.
    grey_red, _, _ = open_thumbnail(grey_result).getpixel((32, 32))
    colour_red, _, _ = open_thumbnail(colour_result).getpixel((32, 32))
    assert 124 < grey_red < 132
    assert 182 < colour_red < 194


def test_profile_too_large_to_cache_is_applied():
    profile = linear_light_profile() + b"\0" * 70_000
    data = encode(Image.new("RGB", (64, 64), (128, 128, 128)), "PNG", icc_profile=profile)
    assert len(Image.open(io.BytesIO(data)).info["icc_profile"]) > 64 * 1024

    result = make_renditions(data, "image/png", max_pixels=MAX_PIXELS)

    red, green, blue = open_thumbnail(result).getpixel((32, 32))
    assert 182 < red < 194
    assert red == green == blue


def test_gps_exif_stays_out_of_thumbnail():
    exif = Image.Exif()
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 31.0, 12.0)
    data = encode(marked_image(), "JPEG", exif=exif)
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(ExifTags.IFD.GPSInfo)

    result = make_renditions(data, "image/jpeg", max_pixels=MAX_PIXELS)

    assert_no_metadata(result.thumbnail)


def test_thumbnail_is_antialiased():
    # One-pixel stripes average to mid grey. Nearest-neighbour sampling would keep
    # only black or only white stripes.
    stripes = Image.new("L", (1024, 1024), 0)
    for row in range(0, 1024, 2):
        stripes.paste(255, (0, row, 1024, row + 1))
    data = encode(stripes, "PNG")

    result = make_renditions(data, "image/png", max_pixels=MAX_PIXELS)

    red, green, blue = open_thumbnail(result).getpixel((128, 128))
    assert 100 < red < 156
    assert red == green == blue


def test_thumbnail_fits_requested_size():
    data = encode(marked_image(1000, 400), "PNG")

    result = make_renditions(data, "image/png", max_pixels=MAX_PIXELS, thumbnail_size=100)

    assert open_thumbnail(result).size == (100, 40)
    assert (result.width, result.height) == (1000, 400)


def test_result_and_rejection_survive_pickling():
    result = make_renditions(encode(marked_image(), "PNG"), "image/png", max_pixels=MAX_PIXELS)
    rejection = ImageRejected(RejectionReason.TOO_LARGE, "5000x5000 = 25000000 pixels")

    restored_result = pickle.loads(pickle.dumps(result))
    restored_rejection = pickle.loads(pickle.dumps(rejection))

    assert restored_result == result
    assert restored_rejection.reason == RejectionReason.TOO_LARGE
    assert restored_rejection.detail == "5000x5000 = 25000000 pixels"
    assert str(restored_rejection) == "too large: 5000x5000 = 25000000 pixels"
    assert restored_rejection.message == "too large"


def test_process_pool_returns_result_and_rejection():
    data = encode(marked_image(), "PNG")
    spawn = multiprocessing.get_context("spawn")

    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        processed = pool.submit(make_renditions, data, "image/png", max_pixels=MAX_PIXELS)
        rejected = pool.submit(make_renditions, SVG, "image/png", max_pixels=MAX_PIXELS)

        assert processed.result() == make_renditions(data, "image/png", max_pixels=MAX_PIXELS)
        with pytest.raises(ImageRejected) as rejection:
            rejected.result()

    assert rejection.value.reason == RejectionReason.NOT_AN_IMAGE


@pytest.mark.parametrize(
    "limits",
    [
        {"max_pixels": 0},
        {"max_pixels": MAX_PIXELS, "max_animation_pixels": 0},
        {"max_pixels": MAX_PIXELS, "thumbnail_size": 0},
        {"max_pixels": MAX_PIXELS, "thumbnail_size": 20000},
        {"max_pixels": MAX_PIXELS, "display_size": 511},
        {"max_pixels": MAX_PIXELS, "display_size": 20000},
        {"max_pixels": MAX_PIXELS, "quality": -1},
        {"max_pixels": MAX_PIXELS, "quality": 101},
    ],
)
def test_invalid_limits_raise_value_error(limits: dict):
    with pytest.raises(ValueError):
        make_renditions(encode(marked_image(), "PNG"), "image/png", **limits)


CORPUS_TYPES = {".jpg": "image/jpeg", ".heic": "image/heic", ".tiff": "image/tiff"}


@pytest.mark.parametrize("folder", ["cameras", "gps", "mobile", "orientation", "heic", "tiff"])
def test_corpus_renditions_are_upright_clean_and_fit(corpus_dir: Path, folder: str):
    paths = sorted(
        path for path in (corpus_dir / folder).iterdir() if path.suffix.lower() in CORPUS_TYPES
    )
    assert paths

    for path in paths:
        claimed_type = CORPUS_TYPES[path.suffix.lower()]
        # pillow-heif decodes a HEIC upright and sets its EXIF orientation to 1.
        upright = ImageOps.exif_transpose(Image.open(path))
        if folder == "orientation":
            upright = Image.open(path.with_name(path.name.split("_")[0] + "_1.jpg"))

        result = make_renditions(path.read_bytes(), claimed_type, max_pixels=MAX_PIXELS)

        assert result.content_type == claimed_type, path.name
        assert (result.width, result.height) == upright.size, path.name
        assert not result.animated, path.name
        for name, (data, box) in rendition_boxes(result).items():
            rendition = open_webp(data)
            difference = mean_difference(grey_signature(rendition), grey_signature(upright))
            assert rendition.size == upright_fit(upright.size, box), (path.name, name)
            assert difference < SAME_PICTURE_MAX_DIFFERENCE, (path.name, name)
            assert_no_metadata(data)
        placeholder = open_placeholder(result.placeholder)
        assert len(result.placeholder) <= PLACEHOLDER_MAX_LENGTH, path.name
        assert placeholder.size == upright_fit(upright.size, PLACEHOLDER_SIZE), path.name


@pytest.mark.parametrize("path", ["heic/IMG_5195.HEIC", "tiff/BSG1.tiff"])
def test_corpus_colour_profile_is_applied_once(corpus_dir: Path, path: str):
    data = (corpus_dir / path).read_bytes()
    original = Image.open(io.BytesIO(data))
    profile = original.info["icc_profile"]
    stored = original.convert("RGB")
    srgb = ImageCms.profileToProfile(stored, io.BytesIO(profile), ImageCms.createProfile("sRGB"))

    result = make_renditions(data, CORPUS_TYPES[Path(path).suffix.lower()], max_pixels=MAX_PIXELS)

    # The profile changes the colours enough to tell a converted rendition from one that is not.
    assert max_difference(colour_signature(srgb), colour_signature(stored)) > 10
    for name, (webp, _) in rendition_boxes(result).items():
        rendition = colour_signature(open_webp(webp))
        assert max_difference(rendition, colour_signature(srgb)) <= 6, name


@pytest.mark.parametrize("claimed_type", ["image/heic", "image/heif"])
def test_iphone_heic_matches_either_heif_type(corpus_dir: Path, claimed_type: str):
    data = (corpus_dir / "heic" / "IMG_5195.HEIC").read_bytes()

    result = make_renditions(data, claimed_type, max_pixels=MAX_PIXELS)

    assert result.content_type == "image/heic"
    assert (result.width, result.height) == (2566, 3313)


@pytest.mark.parametrize(
    ("path", "claimed_type"),
    [("heic/IMG_5195.HEIC", "image/jpeg"), ("tiff/BSG1.tiff", "image/png")],
)
def test_heic_and_tiff_type_mismatch(corpus_dir: Path, path: str, claimed_type: str):
    data = (corpus_dir / path).read_bytes()

    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, claimed_type, max_pixels=MAX_PIXELS)

    assert rejection.value.reason == RejectionReason.TYPE_MISMATCH


@pytest.mark.parametrize("kept_fraction", [0.2, 0.5, 0.9, 0.99])
def test_truncated_heic_is_corrupt(corpus_dir: Path, kept_fraction: float):
    data = (corpus_dir / "heic" / "IMG_5195.HEIC").read_bytes()
    truncated = data[: int(len(data) * kept_fraction)]

    with pytest.raises(ImageRejected) as rejection:
        make_renditions(truncated, "image/heic", max_pixels=MAX_PIXELS)

    assert rejection.value.reason == RejectionReason.CORRUPT


# Where the white square in the top left corner of the stored image ends up once upright.
UPRIGHT_QUADRANTS = {
    1: "top left",
    2: "top right",
    3: "bottom right",
    4: "bottom left",
    5: "top left",
    6: "top right",
    7: "bottom right",
    8: "bottom left",
}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(
    ("image_format", "claimed_type"),
    [
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("TIFF", "image/tiff"),
        ("HEIF", "image/heic"),
    ],
)
def test_every_orientation_turns_renditions_upright(
    image_format: str, claimed_type: str, orientation: int
):
    data = marked_with_orientation(image_format, orientation)
    upright_size = (48, 96) if orientation >= 5 else (96, 48)

    result = make_renditions(data, claimed_type, max_pixels=MAX_PIXELS)

    assert (result.width, result.height) == upright_size
    for name, (webp, _) in rendition_boxes(result).items():
        rendition = open_webp(webp)
        assert rendition.size == upright_size, name
        assert brightest_quadrant(rendition) == UPRIGHT_QUADRANTS[orientation], name
        assert_no_metadata(webp)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_applies_after_draft(orientation: int):
    # make_renditions decodes this 4096x2048 JPEG at 1/2 scale, which still covers 1600.
    data = marked_with_orientation("JPEG", orientation, size=(4096, 2048))
    turned = orientation >= 5

    result = make_renditions(data, "image/jpeg", max_pixels=MAX_PIXELS)

    display = open_webp(result.display)
    thumbnail = open_thumbnail(result)
    assert (result.width, result.height) == ((2048, 4096) if turned else (4096, 2048))
    assert display.size == ((800, 1600) if turned else (1600, 800))
    assert thumbnail.size == ((128, 256) if turned else (256, 128))
    assert brightest_quadrant(display) == UPRIGHT_QUADRANTS[orientation]
    assert brightest_quadrant(thumbnail) == UPRIGHT_QUADRANTS[orientation]
    assert_no_metadata(result.display)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((40, 30), {"display": (40, 30), "thumbnail_2x": (40, 30), "thumbnail": (40, 30)}),
        ((300, 200), {"display": (300, 200), "thumbnail_2x": (300, 200), "thumbnail": (256, 171)}),
        ((1000, 20), {"display": (1000, 20), "thumbnail_2x": (512, 10), "thumbnail": (256, 5)}),
    ],
)
def test_small_image_is_never_enlarged(size: tuple[int, int], expected: dict):
    data = encode(marked_image(*size), "PNG")

    result = make_renditions(data, "image/png", max_pixels=MAX_PIXELS)

    for name, (webp, _) in rendition_boxes(result).items():
        assert open_webp(webp).size == expected[name], name
    assert open_placeholder(result.placeholder).size == upright_fit(size, PLACEHOLDER_SIZE)


@pytest.mark.parametrize(
    "make_data", [lambda: plain_cmyk_jpeg((0, 255, 255, 0)), lambda: ycck_jpeg((0, 255, 255, 0))]
)
def test_cmyk_jpeg_without_adobe_convention_is_red(make_data):
    data = make_data()
    assert Image.open(io.BytesIO(data)).mode == "CMYK"

    result = make_renditions(data, "image/jpeg", max_pixels=MAX_PIXELS)

    red, green, blue = open_thumbnail(result).convert("RGB").getpixel((32, 32))
    assert red > 220
    assert green < 40
    assert blue < 40


@pytest.mark.parametrize(
    ("mode", "maximum", "image_format", "claimed_type"),
    [
        ("I;16", 65535, "PNG", "image/png"),
        # 12-bit samples in a 16-bit image, as scientific cameras write them.
        ("I;16", 4095, "PNG", "image/png"),
        ("I;16", 65535, "TIFF", "image/tiff"),
        ("I;16B", 65535, "TIFF", "image/tiff"),
        ("I", 65535, "TIFF", "image/tiff"),
        ("F", 1.0, "TIFF", "image/tiff"),
        ("F", 1000.0, "TIFF", "image/tiff"),
    ],
)
def test_wide_grey_gradient_spans_dark_to_light(
    mode: str, maximum: float, image_format: str, claimed_type: str
):
    data = encode(horizontal_gradient(mode, maximum), image_format)
    assert Image.open(io.BytesIO(data)).mode == mode

    result = make_renditions(data, claimed_type, max_pixels=MAX_PIXELS)

    thumbnail = open_thumbnail(result).convert("L")
    left = thumbnail.getpixel((2, 16))
    right = thumbnail.getpixel((thumbnail.width - 3, 16))
    (mean,) = ImageStat.Stat(thumbnail).mean
    assert left < 30
    assert right > 225
    assert 100 <= mean <= 155


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P", "GIF"])
def test_transparent_area_stays_light(kind: str):
    data, claimed_type = transparent_quadrant(kind)

    result = make_renditions(data, claimed_type, max_pixels=MAX_PIXELS)

    for name, (webp, _) in rendition_boxes(result).items():
        rendition = open_webp(webp)
        inside = (rendition.width // 8, rendition.height // 8)
        outside = (rendition.width * 7 // 8, rendition.height * 7 // 8)
        assert rendition.mode == "RGBA", name
        assert rendition.getpixel(inside)[3] == 0, name
        assert rendition.getpixel(outside)[3] == 255, name
        # Shown on a white page, and shown by a viewer that drops the alpha channel.
        assert min(on_white(rendition).getpixel(inside)) > 240, name
        assert min(rendition.convert("RGB").getpixel(inside)) > 240, name
    placeholder = open_placeholder(result.placeholder)
    assert min(on_white(placeholder).getpixel((2, 2))) > 200
    assert min(placeholder.convert("RGB").getpixel((2, 2))) > 200


@pytest.mark.parametrize(
    "image",
    [
        Image.frombytes("RGB", (256, 256), random.Random(1).randbytes(256 * 256 * 3)),
        Image.frombytes("RGBA", (256, 256), random.Random(2).randbytes(256 * 256 * 4)),
        marked_image(1024, 512),
    ],
    ids=["noise", "noise with alpha", "marked"],
)
def test_placeholder_is_a_short_webp_uri(image: Image.Image):
    data = encode(image, "PNG")

    result = make_renditions(data, "image/png", max_pixels=MAX_PIXELS)

    placeholder = open_placeholder(result.placeholder)
    assert len(result.placeholder) <= PLACEHOLDER_MAX_LENGTH
    assert max(placeholder.size) == PLACEHOLDER_SIZE
    assert METADATA_CHUNKS.isdisjoint(webp_chunk_ids(base64.b64decode(result.placeholder[23:])))


@pytest.mark.parametrize(
    ("image_format", "claimed_type"),
    [("GIF", "image/gif"), ("PNG", "image/png"), ("WEBP", "image/webp")],
)
def test_animated_renditions_show_first_frame(image_format: str, claimed_type: str):
    data = animation(image_format)

    result = make_renditions(data, claimed_type, max_pixels=MAX_PIXELS)

    assert result.animated
    for name, (webp, _) in rendition_boxes(result).items():
        rendition = open_webp(webp)
        red, green, blue = rendition.convert("RGB").getpixel((32, 16))
        assert getattr(rendition, "n_frames", 1) == 1, name
        assert red > 200, name
        assert green < 60, name
        assert blue < 60, name


def test_gif_of_2000_small_frames_renders_quickly():
    frames = [Image.new("P", (64, 64), index % 2) for index in range(2000)]
    for frame in frames:
        frame.putpalette([255, 0, 0, 0, 0, 255])
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=20)
    assert Image.open(io.BytesIO(data)).n_frames == 2000

    # CPU time, because other programs on a shared machine stretch the wall-clock time.
    started = time.process_time()
    result = make_renditions(data, "image/gif", max_pixels=MAX_PIXELS)
    elapsed = time.process_time() - started

    red, green, blue = open_thumbnail(result).convert("RGB").getpixel((32, 32))
    assert result.animated
    assert elapsed < 1.0
    assert red > 200
    assert green < 60
    assert blue < 60


def test_many_frames_on_large_canvas_are_too_large():
    # 200 frames of 4000x4000 are 3.2 billion pixels in all. Each frame is within max_pixels.
    data = gif_of_tiny_frames(200, canvas=(4000, 4000))
    assert 200 * 4000 * 4000 > DEFAULT_MAX_ANIMATION_PIXELS

    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, "image/gif", max_pixels=MAX_PIXELS)

    assert rejection.value.reason == RejectionReason.TOO_LARGE
    assert "4000x4000" in rejection.value.detail


@pytest.mark.parametrize(
    ("image_format", "claimed_type"),
    [("GIF", "image/gif"), ("PNG", "image/png"), ("WEBP", "image/webp")],
)
def test_animation_at_pixel_budget_renders(image_format: str, claimed_type: str):
    data = noise_animation(image_format, 30)
    budget = 30 * 8 * 8

    result = make_renditions(data, claimed_type, max_pixels=MAX_PIXELS, max_animation_pixels=budget)
    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, claimed_type, max_pixels=MAX_PIXELS, max_animation_pixels=budget - 1)

    assert result.animated
    assert open_thumbnail(result).size == (8, 8)
    assert rejection.value.reason == RejectionReason.TOO_LARGE


def test_apng_declared_frame_count_counts_against_budget():
    data = with_actl_frame_count(noise_animation("PNG", 2), 1001)

    with pytest.raises(ImageRejected) as rejection:
        make_renditions(data, "image/png", max_pixels=MAX_PIXELS, max_animation_pixels=1000 * 64)

    assert rejection.value.reason == RejectionReason.TOO_LARGE


def test_still_image_ignores_animation_budget():
    data = encode(marked_image(), "GIF")

    result = make_renditions(data, "image/gif", max_pixels=MAX_PIXELS, max_animation_pixels=1)

    assert not result.animated
    assert open_thumbnail(result).size == (96, 48)


def test_multi_page_tiff_renders_first_page():
    pages = [Image.new("RGB", (64, 32), colour) for colour in ("red", "blue")]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2

    result = make_renditions(data, "image/tiff", max_pixels=MAX_PIXELS)

    red, green, blue = open_thumbnail(result).getpixel((32, 16))
    assert not result.animated
    assert red > 200
    assert green < 60
    assert blue < 60


def png_with_metadata(image: Image.Image, exif: Image.Exif, icc_profile: bytes) -> bytes:
    text = PngImagePlugin.PngInfo()
    text.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta xmlns:x="adobe:ns:meta/"/>')
    return encode(image, "PNG", exif=exif, icc_profile=icc_profile, pnginfo=text)


@pytest.mark.parametrize(
    ("image_format", "claimed_type"),
    [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"), ("TIFF", "image/tiff")],
)
def test_metadata_stays_out_of_every_rendition(image_format: str, claimed_type: str):
    exif = orientation_exif(1)
    exif.get_ifd(ExifTags.IFD.GPSInfo)[ExifTags.GPS.GPSLatitudeRef] = "N"
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"/>'
    image = marked_image(2048, 1024)
    if image_format == "PNG":
        data = png_with_metadata(image, exif, linear_light_profile())
    else:
        data = encode(image, image_format, exif=exif, xmp=xmp, icc_profile=linear_light_profile())
    assert Image.open(io.BytesIO(data)).getexif()

    result = make_renditions(data, claimed_type, max_pixels=MAX_PIXELS)

    for name, (webp, _) in rendition_boxes(result).items():
        assert b"xmpmeta" not in webp, name
        assert_no_metadata(webp)
    placeholder = base64.b64decode(result.placeholder.removeprefix("data:image/webp;base64,"))
    assert METADATA_CHUNKS.isdisjoint(webp_chunk_ids(placeholder))


def test_gallery_command_module_leaves_out_litestar_and_arq():
    # A spawned decoding process runs the `gallery` script again, which imports gallery.cli,
    # so whatever that module imports adds to the memory of every such process.
    check = "import sys, gallery.cli; print(sorted({'litestar', 'arq'} & set(sys.modules)))"

    child = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True
    )

    assert child.stdout.strip() == "[]"


def test_pillow_heif_loads_with_first_heif_upload(tmp_path: Path):
    path = tmp_path / "small.heic"
    path.write_bytes(encode(marked_image(64, 48), "HEIF", quality=90))
    check = f"""
import io, sys
from PIL import Image
from gallery.imaging import make_renditions
jpeg = io.BytesIO()
Image.new("RGB", (64, 48)).save(jpeg, "JPEG")
make_renditions(jpeg.getvalue(), "image/jpeg", max_pixels=10**6)
print("pillow_heif" in sys.modules)
result = make_renditions(open({str(path)!r}, "rb").read(), "image/heic", max_pixels=10**6)
print("pillow_heif" in sys.modules, result.content_type)
"""

    child = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True
    )

    assert child.stdout.splitlines() == ["False", "True image/heic"]


# The child process imports only the imaging package, as a decoding process needs, and
# reports its whole peak resident set size (VmHWM) before and after one call. Linux reports
# the parent's peak as ru_maxrss of a child started with fork and exec, so that would not do.
MEASURE_PEAK_RSS = """
import io, json, sys
from PIL import Image
from gallery.imaging import make_renditions

def read_peak_rss():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

data = open(sys.argv[1], "rb").read()
small = io.BytesIO()
Image.new("RGB", (64, 48), (200, 40, 40)).save(small, "JPEG")
make_renditions(small.getvalue(), "image/jpeg", max_pixels=10**8)
before = read_peak_rss()
make_renditions(data, "image/jpeg", max_pixels=10**8)
print(json.dumps({"before": before, "after": read_peak_rss()}))
"""


def test_24_megapixel_jpeg_peaks_under_64_mib(tmp_path: Path):
    # Noise on a gradient, so the JPEG is as large as a real photo's.
    image = Image.linear_gradient("L").resize((6000, 4000)).convert("RGB")
    image = ImageChops.add(image, Image.effect_noise((6000, 4000), 10).convert("RGB"), offset=-100)
    path = tmp_path / "24mp.jpg"
    image.save(path, "JPEG", quality=90)
    del image

    child = subprocess.run(
        [sys.executable, "-c", MEASURE_PEAK_RSS, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )

    peaks = json.loads(child.stdout)
    growth = peaks["after"] - peaks["before"]
    message = f"peak {peaks['after'] / 2**20:.1f} MiB, grew {growth / 2**20:.1f} MiB"
    # The 1/4-scale decode alone takes 1500x1000 pixels of 4 bytes, so less growth than that
    # means the measurement missed the call.
    assert growth > 1500 * 1000 * 4, message
    assert peaks["after"] < 64 * 1024 * 1024, message
