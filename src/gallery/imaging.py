"""Verification of uploaded image bytes and their WebP thumbnails, for the worker's process pool."""

import math
import struct
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from io import BytesIO
from types import MappingProxyType

from PIL import ExifTags, Image, ImageCms, UnidentifiedImageError

# SVG and HTML are never allowed, because a browser runs the scripts inside them.
ALLOWED_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "image/jpeg": "JPEG",
        "image/png": "PNG",
        "image/webp": "WEBP",
        "image/gif": "GIF",
    }
)

# Pillow reports a JPEG as MPO when its multi-picture (MPF) segment lists more than one
# image, as phone cameras often write.
_TYPE_BY_FORMAT = {
    image_format: content_type for content_type, image_format in ALLOWED_TYPES.items()
}
_TYPE_BY_FORMAT["MPO"] = "image/jpeg"

# Pillow raises these for malformed or truncated data, depending on the format and the step.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)

# The transpose that turns a stored image upright, for each EXIF Orientation value.
# Value 1 and the invalid values (0, 9 and above) leave the image as stored.
_UPRIGHT_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# libwebp rejects images with a side longer than this.
WEBP_MAX_SIDE = 16383

# An animation of 1000 frames plays for 100 seconds at 10 frames per second.
DEFAULT_MAX_FRAMES = 1000

_SRGB_PROFILE = ImageCms.createProfile("sRGB")


class RejectionReason(StrEnum):
    """Short reason for a rejected upload, shown to the user who uploaded it."""

    NOT_AN_IMAGE = "not an image"
    TYPE_MISMATCH = "type does not match"
    TOO_LARGE = "too large"
    CORRUPT = "corrupt or incomplete"


class ImageRejected(Exception):
    """Upload that is not an intact image of an allowed type within the pixel and frame limits.

    `reason` is shown to the user, and `detail` names the values involved for the logs.
    """

    def __init__(self, reason: RejectionReason, detail: str) -> None:
        # Both go to Exception so that pickling across the process pool rebuilds the error.
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class ProcessedImage:
    """Verified upload with its type read from the bytes, its upright size and its thumbnail."""

    content_type: str
    width: int
    height: int
    thumbnail: bytes
    thumbnail_type: str = "image/webp"


def process_image(
    data: bytes,
    claimed_type: str,
    *,
    max_pixels: int,
    max_frames: int = DEFAULT_MAX_FRAMES,
    thumbnail_size: int = 256,
    quality: int = 80,
) -> ProcessedImage:
    """Verify that `data` is an intact image of `claimed_type` and make its WebP thumbnail.

    Raises ImageRejected when it is not. The function takes and returns plain data and reads
    no files, so it can run in a ProcessPoolExecutor. Two calls must not run at once in
    threads of one process, because each changes the process-wide warning filters while it
    runs. Pillow's own limit still applies, so images above Image.MAX_IMAGE_PIXELS are
    rejected even when `max_pixels` is higher. `max_pixels` applies to the canvas of an
    animation and `max_frames` to its number of frames, which is counted without decoding.
    """
    _check_arguments(max_pixels, max_frames, thumbnail_size, quality)

    with warnings.catch_warnings():
        # Pillow skips each malformed metadata tag with a UserWarning. The worker only returns
        # or raises, so those warnings are ignored.
        warnings.simplefilter("ignore", UserWarning)
        # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that. Turning the
        # warning into an error for the duration of this call rejects both, without changing
        # Pillow's global settings.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open_allowed_image(data)
        content_type = _check_type(image, claimed_type)
        _check_pixel_count(image, max_pixels)
        _check_frame_count(image, data, max_frames)
        stored_width, stored_height = image.size
        _decode_first_frame(image, thumbnail_size)
        orientation = _read_orientation(image)

    upright = _transpose_upright(image, orientation)
    thumbnail = _make_thumbnail(upright, thumbnail_size, quality)

    # Orientations 5 to 8 turn the image by 90 degrees, so its sides swap.
    if orientation in (5, 6, 7, 8):
        stored_width, stored_height = stored_height, stored_width
    return ProcessedImage(content_type, stored_width, stored_height, thumbnail)


def _check_arguments(max_pixels: int, max_frames: int, thumbnail_size: int, quality: int) -> None:
    if max_pixels < 1:
        raise ValueError(f"max_pixels is {max_pixels}, expected a positive number of pixels")
    if max_frames < 1:
        raise ValueError(f"max_frames is {max_frames}, expected a positive number of frames")
    if not 1 <= thumbnail_size <= WEBP_MAX_SIDE:
        raise ValueError(
            f"thumbnail_size is {thumbnail_size}, expected 1 to {WEBP_MAX_SIDE} pixels"
        )
    if not 0 <= quality <= 100:
        raise ValueError(f"quality is {quality}, expected a WebP quality from 0 to 100")


def _open_allowed_image(data: bytes) -> Image.Image:
    """Open `data` as one of the allowed formats, which reads the header but no pixels."""
    allowed_formats = list(ALLOWED_TYPES.values())
    try:
        return Image.open(BytesIO(data), formats=allowed_formats)
    except UnidentifiedImageError as error:
        format_names = f"{', '.join(allowed_formats[:-1])} or {allowed_formats[-1]}"
        detail = f"{len(data)} bytes are not a {format_names} image"
        raise ImageRejected(RejectionReason.NOT_AN_IMAGE, detail) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(RejectionReason.TOO_LARGE, str(error)) from error
    except _DECODE_ERRORS as error:
        detail = f"image header is invalid: {error}"
        raise ImageRejected(RejectionReason.CORRUPT, detail) from error


def _check_type(image: Image.Image, claimed_type: str) -> str:
    """Raise ImageRejected unless the decoded format is `claimed_type`, and return that type.

    A claimed type outside ALLOWED_TYPES never matches, because every allowed format maps
    to a type inside it.
    """
    actual_type = _TYPE_BY_FORMAT.get(image.format or "")
    if actual_type != claimed_type:
        detail = f"data is {image.format} but the upload was signed for {claimed_type!r}"
        raise ImageRejected(RejectionReason.TYPE_MISMATCH, detail)
    return actual_type


def _check_pixel_count(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        detail = f"{width}x{height} = {width * height} pixels exceeds the maximum of {max_pixels}"
        raise ImageRejected(RejectionReason.TOO_LARGE, detail)


def _check_frame_count(image: Image.Image, data: bytes, max_frames: int) -> None:
    # Pillow reads the frame count of an APNG from its acTL chunk, and that of a WebP or MPO
    # from the headers it parses in Image.open. GifImageFile.n_frames instead reads every
    # frame header in Python, which took 3 s for a 29 MB GIF of 1.25 million 1x1 frames
    # (Pillow 13, Python 3.11, one core of a 2-core VM). So GIF frames are counted here,
    # and the count stops at the first frame over the maximum: 1 ms on that file.
    if image.format == "GIF":
        frame_count = _count_gif_frames(data, stop_after=max_frames + 1)
    else:
        frame_count = getattr(image, "n_frames", 1)
    if frame_count > max_frames:
        detail = f"{image.format} animation has more than the maximum of {max_frames} frames"
        raise ImageRejected(RejectionReason.TOO_LARGE, detail)


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


def _decode_first_frame(image: Image.Image, thumbnail_size: int) -> None:
    """Decode every byte of the first frame, so that truncated or corrupt data raises.

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale when that still leaves its longer side at
    least twice the thumbnail size. libjpeg still reads the whole file at reduced scale.
    """
    if image.format in ("JPEG", "MPO"):
        scale = 2 * thumbnail_size / max(image.size)
        image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))

    # NOTE: only the first frame of an animated GIF, PNG or WebP is decoded, so damage in a
    # later frame passes unnoticed.
    # NOTE: libjpeg fills rows lost to corrupt entropy-coded data with grey and Pillow 13
    # raises no error for it, so such a JPEG passes. Truncated files do raise.
    try:
        image.load()
    except _DECODE_ERRORS as error:
        detail = f"{image.format} data is invalid or truncated: {error}"
        raise ImageRejected(RejectionReason.CORRUPT, detail) from error


def _read_orientation(image: Image.Image) -> int:
    """Return the EXIF Orientation from 1 to 8, or 1 when it is missing, invalid or unreadable."""
    # Broken EXIF is common and only affects rotation, so a parse error means "as stored".
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        return 1

    if isinstance(orientation, int) and 1 <= orientation <= 8:
        return orientation
    return 1


def _transpose_upright(image: Image.Image, orientation: int) -> Image.Image:
    transpose = _UPRIGHT_TRANSPOSES.get(orientation)
    if transpose is None:
        return image
    return image.transpose(transpose)


def _make_thumbnail(image: Image.Image, thumbnail_size: int, quality: int) -> bytes:
    """Encode an sRGB WebP whose longer side is at most `thumbnail_size`, with no metadata."""
    thumbnail = _convert_to_srgb(image)
    thumbnail.thumbnail((thumbnail_size, thumbnail_size), Image.Resampling.LANCZOS)

    # Clearing info keeps EXIF, GPS positions, XMP and ICC profiles out of the thumbnail,
    # whatever save() copies from it.
    thumbnail.info.clear()
    output = BytesIO()
    thumbnail.save(output, "WEBP", quality=quality)
    return output.getvalue()


def _convert_to_srgb(image: Image.Image) -> Image.Image:
    """Convert to 8-bit sRGB, as RGBA when the image has transparency and RGB otherwise."""
    # A 16-bit greyscale PNG decodes as mode I;16, which a plain conversion would clip to white.
    if image.mode.startswith("I"):
        image = image.convert("I").point(lambda value: value / 256).convert("L")

    target_mode = "RGBA" if image.has_transparency_data else "RGB"
    icc_profile = image.info.get("icc_profile")
    # A CMYK image keeps its inks until its profile converts them, which is more faithful.
    # NOTE: no test covers the CMYK conversion through a profile, for lack of a CMYK profile.
    if image.mode != target_mode and not (image.mode == "CMYK" and icc_profile):
        image = image.convert(target_mode)
    if not icc_profile:
        return image

    try:
        return ImageCms.profileToProfile(
            image, BytesIO(icc_profile), _SRGB_PROFILE, outputMode=target_mode
        )
    except ImageCms.PyCMSError:
        # A broken profile, or one for another colour space, is ignored and the pixels are
        # taken as sRGB.
        return image.convert(target_mode)
