"""Opening, checking and decoding uploaded bytes with Pillow, before any resize."""

import struct
import sys
import warnings
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from io import BytesIO
from types import MappingProxyType

from PIL import ExifTags, Image, UnidentifiedImageError

from gallery.imaging.heif import HEIC_BRANDS, read_heif_data_end, register_heif_opener

# SVG and HTML are never allowed, because a browser runs the scripts inside them. HEIC and
# TIFF are accepted as input, and the gallery shows only its own WebP renditions of them.
ALLOWED_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "image/jpeg": "JPEG",
        "image/png": "PNG",
        "image/webp": "WEBP",
        "image/gif": "GIF",
        "image/heic": "HEIF",
        "image/heif": "HEIF",
        "image/tiff": "TIFF",
    }
)

# Pillow reports a JPEG as MPO when its multi-picture (MPF) segment lists more than one
# image, as phone cameras often write. HEIF files get their type from their brand instead.
_TYPE_BY_FORMAT = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "TIFF": "image/tiff",
}

# Browsers take the type of an upload from its file name extension, and HEVC-coded HEIF files
# are named .heic or .heif, so either claim matches either type.
_HEIF_TYPES = {"image/heic", "image/heif"}

_ANIMATION_FORMATS = {"GIF", "PNG", "WEBP"}

# Pillow raises these for malformed or truncated data, depending on the format and the step.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)

# The maximum number of frames times canvas pixels of an animation, which allows 1000 frames
# of 1920x1080. Playing an animation decodes every frame, so the cost grows with this product.
DEFAULT_MAX_ANIMATION_PIXELS = 1000 * 1920 * 1080


# The names people know the allowed types by, for the reasons shown on tiles.
TYPE_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "image/jpeg": "JPEG",
        "image/png": "PNG",
        "image/webp": "WebP",
        "image/gif": "GIF",
        "image/heic": "HEIC",
        "image/heif": "HEIF",
        "image/tiff": "TIFF",
    }
)


class RejectionReason(StrEnum):
    """The kind of a rejection, a bounded label for logs and metrics.

    `ImageRejected.message` is the text the user reads, which may name the values involved.
    """

    NOT_AN_IMAGE = "not an image"
    TYPE_MISMATCH = "type does not match"
    TOO_LARGE = "too large"
    CORRUPT = "corrupt or incomplete"


class ImageRejected(Exception):
    """Upload that is not an intact image of an allowed type within the pixel and frame limits.

    `message` is shown on the upload's tile and is the reason's text unless given, and
    `detail` names the values involved for the logs.
    """

    def __init__(self, reason: RejectionReason, detail: str, message: str | None = None) -> None:
        # All go to Exception so that pickling across the process pool rebuilds the error.
        super().__init__(reason, detail, message)
        self.reason = reason
        self.detail = detail
        self.message = message or reason.value

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@contextmanager
def pillow_warnings_as_rejections() -> Iterator[None]:
    """Turn Pillow's decompression bomb warning into an error for the duration of the block."""
    with warnings.catch_warnings():
        # Pillow skips each malformed metadata tag with a UserWarning. The worker only returns
        # or raises, so those warnings are ignored.
        warnings.simplefilter("ignore", UserWarning)
        # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that. Turning the
        # warning into an error for the duration of this call rejects both, without changing
        # Pillow's global settings.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def type_name(content_type: str) -> str:
    """Return the name people know a content type by, such as "JPEG" for image/jpeg."""
    return TYPE_NAMES.get(content_type, content_type)


def format_megapixels(pixels: int) -> str:
    """Return a pixel count in megapixels with at most one decimal, such as "50" or "89.5"."""
    return f"{round(pixels / 1_000_000, 1):g}"


def pixel_limit_message(max_pixels: int, width: int = 0, height: int = 0) -> str:
    """Return the tile's reason for an image over the pixel limit, with its size when known."""
    limit = f"over the {format_megapixels(max_pixels)}-megapixel limit"
    return f"{width}x{height} pixels, {limit}" if width and height else limit


def open_allowed_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Open `data` in a format of ALLOWED_TYPES, which reads the header but no pixels.

    `max_pixels`, when lower than Pillow's own limit, is the limit the rejection names.
    """
    allowed_formats = list(dict.fromkeys(ALLOWED_TYPES.values()))
    # A HEIF file starts with an ftyp box. Only such data loads pillow-heif, and Pillow
    # raises KeyError for a format name that no opener registered.
    if data[4:8] == b"ftyp":
        register_heif_opener()
    opened_formats = [name for name in allowed_formats if name != "HEIF" or name in Image.OPEN]
    try:
        return Image.open(BytesIO(data), formats=opened_formats)
    except UnidentifiedImageError as error:
        format_names = f"{', '.join(allowed_formats[:-1])} or {allowed_formats[-1]}"
        detail = f"{len(data)} bytes are not a {format_names} image"
        raise ImageRejected(RejectionReason.NOT_AN_IMAGE, detail) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow raised because the image is over Image.MAX_IMAGE_PIXELS, so it is over
        # `max_pixels` too when that is lower.
        limit = Image.MAX_IMAGE_PIXELS or sys.maxsize
        message = pixel_limit_message(min(limit, max_pixels) if max_pixels else limit)
        raise ImageRejected(RejectionReason.TOO_LARGE, str(error), message) from error
    except DECODE_ERRORS as error:
        detail = f"image header is invalid: {error}"
        raise ImageRejected(RejectionReason.CORRUPT, detail) from error


def check_type(image: Image.Image, data: bytes, claimed_type: str) -> str:
    """Raise ImageRejected unless the decoded format is `claimed_type`, and return that type.

    A claimed type outside ALLOWED_TYPES never matches, because every allowed format maps
    to a type inside it.
    """
    if image.format == "HEIF":
        actual_type = "image/heic" if data[8:12] in HEIC_BRANDS else "image/heif"
    else:
        actual_type = _TYPE_BY_FORMAT.get(image.format or "")

    if actual_type != claimed_type and {actual_type, claimed_type} != _HEIF_TYPES:
        detail = f"data is {image.format} but the upload was signed for {claimed_type!r}"
        actual_name = type_name(actual_type or "")
        message = f"the file is a {actual_name} image, not a {type_name(claimed_type)}"
        raise ImageRejected(RejectionReason.TYPE_MISMATCH, detail, message)
    return actual_type


def check_pixel_count(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        detail = f"{width}x{height} = {width * height} pixels exceeds the maximum of {max_pixels}"
        message = pixel_limit_message(max_pixels, width, height)
        raise ImageRejected(RejectionReason.TOO_LARGE, detail, message)


def check_animation_pixels(image: Image.Image, data: bytes, max_animation_pixels: int) -> int:
    """Raise ImageRejected when frames times canvas pixels exceed the maximum.

    Return the number of frames, which for a GIF is counted only up to the first frame over
    the maximum. A single frame is never rejected here, because `max_pixels` covers it. Only
    GIF, PNG and WebP count as animations: the other pages of a TIFF, MPO or HEIF file are
    never decoded or shown.
    """
    if image.format not in _ANIMATION_FORMATS:
        return 1

    max_frame_count = max(1, max_animation_pixels // (image.width * image.height))
    # Pillow reads the frame count of an APNG from its acTL chunk, and that of a WebP or MPO
    # from the headers it parses in Image.open. GifImageFile.n_frames instead reads every
    # frame header in Python, which took 3 s for a 29 MB GIF of 1.25 million 1x1 frames
    # (Pillow 13, Python 3.11, one core of a 2-core VM). So GIF frames are counted here,
    # and the count stops at the first frame over the maximum. With a 100x100 canvas and the
    # default budget that is frame 207,361, which this walk reached in 0.3 s.
    if image.format == "GIF":
        frame_count = _count_gif_frames(data, stop_after=max_frame_count + 1)
    else:
        frame_count = getattr(image, "n_frames", 1)

    if frame_count > max_frame_count:
        detail = (
            f"{image.format} animation has more than {max_frame_count} frames of"
            f" {image.width}x{image.height} pixels, above the maximum of"
            f" {max_animation_pixels} pixels in all frames"
        )
        message = f"animation over the frame limit ({max_frame_count} frames at this size)"
        raise ImageRejected(RejectionReason.TOO_LARGE, detail, message)
    return frame_count


def _count_gif_frames(data: bytes, *, stop_after: int) -> int:
    """Count the image descriptors of a GIF, skipping their data, up to `stop_after`.

    For a well-formed GIF below `stop_after` this is GifImageFile.n_frames of Pillow 13.
    Like Pillow, the walk skips a byte that starts no block, and it ends at the trailer or
    the end of `data`.
    """
    flags = data[10]
    position = 13
    if flags & 0x80:
        position += 3 << ((flags & 7) + 1)

    frame_count = 0
    while position < len(data) and frame_count < stop_after:
        introducer = data[position]
        if introducer == 0x3B:
            break
        if introducer == 0x21:
            # An extension: its introducer, its label, then data sub-blocks.
            position += 2
        elif introducer == 0x2C:
            # An image descriptor: 10 bytes, an optional local colour table, the LZW minimum
            # code size, then data sub-blocks.
            frame_count += 1
            local_flags = data[position + 9] if position + 9 < len(data) else 0
            position += 10
            if local_flags & 0x80:
                position += 3 << ((local_flags & 7) + 1)
            position += 1
        else:
            position += 1
            continue
        # Each data sub-block starts with its length, and a zero length ends the sequence.
        while position < len(data) and data[position]:
            position += data[position] + 1
        position += 1
    return frame_count


def decode_first_frame(image: Image.Image, data: bytes, largest_box: int) -> None:
    """Decode every byte of the first frame, so that truncated or corrupt data raises.

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale when its longer side stays at least
    `largest_box`. libjpeg still reads the whole file at reduced scale.
    """
    if image.format in ("JPEG", "MPO"):
        image.draft("RGB", fit_size(image.size, largest_box))

    # NOTE: only the first frame of an animated GIF, PNG or WebP is decoded, so damage in a
    # later frame passes unnoticed.
    # NOTE: libjpeg fills rows lost to corrupt entropy-coded data with grey and Pillow 13
    # raises no error for it, so such a JPEG passes. Truncated files do raise.
    try:
        image.load()
    except DECODE_ERRORS as error:
        detail = f"{image.format} data is invalid or truncated: {error}"
        raise ImageRejected(RejectionReason.CORRUPT, detail) from error

    if image.format == "HEIF":
        _check_heif_data_end(data)


def _check_heif_data_end(data: bytes) -> None:
    """Raise ImageRejected when the data of an item of a HEIF file runs past its end.

    libheif 1.23 fills the tiles of a grid image that fail to decode with grey and raises no
    error, so a truncated iPhone photo would decode without this check.
    """
    try:
        data_end = read_heif_data_end(data)
    except (struct.error, IndexError, ValueError):
        # libheif opened the file, so a box this walk cannot follow is left to libheif.
        return
    if data_end > len(data):
        detail = f"HEIF item data ends at byte {data_end} but the file has {len(data)} bytes"
        raise ImageRejected(RejectionReason.CORRUPT, detail)


def read_date_taken(image: Image.Image) -> str:
    """Return EXIF DateTimeOriginal as "YYYY-MM-DD HH:MM", or "" when missing or invalid."""
    try:
        exif = image.getexif()
        value = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal)
    except DECODE_ERRORS:
        return ""
    if not isinstance(value, str):
        return ""
    # EXIF writes "YYYY:MM:DD HH:MM:SS", and cameras without a set clock write zeros or blanks.
    try:
        taken = datetime.strptime(value.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return ""
    return taken.strftime("%Y-%m-%d %H:%M")


def read_orientation(image: Image.Image) -> int:
    """Return the EXIF Orientation from 1 to 8, or 1 when it is missing, invalid or unreadable."""
    # HEIF stores rotation and mirroring in its own item properties, which libheif has already
    # applied, and pillow-heif 1.9 sets the EXIF Orientation to 1.
    if image.format == "HEIF":
        return 1

    # Broken EXIF is common and only affects rotation, so a parse error means "as stored".
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except DECODE_ERRORS:
        return 1

    if isinstance(orientation, int) and 1 <= orientation <= 8:
        return orientation
    return 1


def fit_size(size: tuple[int, int], box: int) -> tuple[int, int]:
    """Return `size` scaled down to a longer side of `box`, or unchanged when it fits."""
    width, height = size
    longer_side = max(width, height)
    if longer_side <= box:
        return size
    scale = box / longer_side
    return max(1, round(width * scale)), max(1, round(height * scale))
