"""Verification of uploaded image bytes and their WebP renditions, for the worker's process pool."""

import base64
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from io import BytesIO
from types import MappingProxyType

import pillow_heif
from PIL import ExifTags, Image, ImageChops, ImageCms, UnidentifiedImageError

# The HEIF opener decodes HEIC and HEIF. libheif applies the rotation and mirroring stored in
# the file while decoding. Depth maps, auxiliary images and embedded thumbnails are never
# rendered, so they are not read.
pillow_heif.register_heif_opener(depth_images=False, aux_images=False, thumbnails=False)

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

# process_image accepts only the types that every browser displays, as it did before HEIC and
# TIFF were added for make_renditions.
_PROCESS_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif")

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

# The major brands of the ftyp box that mark HEVC-coded HEIF, which is HEIC. pillow-heif 1.9
# opens these and the generic brands mif1 and msf1, which are plain image/heif.
_HEIC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}

# Browsers take the type of an upload from its file name extension, and HEVC-coded HEIF files
# are named .heic or .heif, so either claim matches either type.
_HEIF_TYPES = {"image/heic", "image/heif"}

_ANIMATION_FORMATS = {"GIF", "PNG", "WEBP"}

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

# The maximum number of frames times canvas pixels of an animation, which allows 1000 frames
# of 1920x1080. Playing an animation decodes every frame, so the cost grows with this product.
DEFAULT_MAX_ANIMATION_PIXELS = 1000 * 1920 * 1080

# The placeholder is a WebP of at most this many pixels on its longer side, sent inline as a
# data URI of at most PLACEHOLDER_MAX_LENGTH characters, so a grid of 60 adds at most 18 KB.
PLACEHOLDER_SIZE = 16
PLACEHOLDER_MAX_LENGTH = 300
_PLACEHOLDER_QUALITY = 30

# libwebp's method trades encoding time for size, from 0 (fastest) to 6. On the display
# renditions of seven corpus photos, method 2 encoded 2.1 times faster than Pillow's default
# of 4, for 3% more bytes (Pillow 13 with libwebp 1.6, one core of a 2-core VM).
_WEBP_METHOD = 2

# A resize first shrinks by a whole factor with a box filter while the image stays at least
# this many times the target, then finishes with Lanczos. Pillow's own thumbnail() uses 2.0.
_REDUCING_GAP = 3.0

_SRGB_PROFILE = ImageCms.createProfile("sRGB")
_LAB_PROFILE = ImageCms.createProfile("LAB")

_WHITE = (255, 255, 255)


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


@dataclass(frozen=True)
class Renditions:
    """Verified upload with its type, its upright size and its WebP renditions.

    Every rendition is an upright 8-bit sRGB WebP without EXIF, XMP or ICC data, scaled to
    fit a square box and never enlarged. An image smaller than a box keeps its own size.
    """

    # The type read from the bytes: a key of ALLOWED_TYPES.
    content_type: str
    # The size of the original once turned upright.
    width: int
    height: int
    # Longer side at most thumbnail_size, for the grid.
    thumbnail: bytes
    # Longer side at most twice thumbnail_size, for the grid on high-density screens.
    thumbnail_2x: bytes
    # Longer side at most display_size, for the viewer.
    display: bytes
    # A "data:image/webp;base64," URI of a WebP with a longer side of at most
    # PLACEHOLDER_SIZE, for the grid to show until the thumbnail arrives.
    placeholder: str
    # True for a GIF, PNG or WebP of more than one frame. The renditions show the first frame.
    animated: bool
    # The media type of thumbnail, thumbnail_2x and display.
    rendition_type: str = "image/webp"


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
    Only JPEG, PNG, WebP and GIF are accepted. make_renditions replaces this function.
    """
    _check_arguments(max_pixels, thumbnail_size, quality)
    if max_frames < 1:
        raise ValueError(f"max_frames is {max_frames}, expected a positive number of frames")

    with _pillow_warnings_as_rejections():
        image = _open_allowed_image(data, _PROCESS_IMAGE_TYPES)
        content_type = _check_type(image, data, claimed_type)
        _check_pixel_count(image, max_pixels)
        _check_frame_count(image, data, max_frames)
        stored_size = image.size
        _decode_first_frame(image, data, 2 * thumbnail_size)
        orientation = _read_orientation(image)

    image = _resize_to_fit(
        _convert_to_resizable_mode(image), _fit_size(stored_size, thumbnail_size)
    )
    thumbnail = _transpose_upright(_convert_to_srgb(image), orientation)

    width, height = _upright_size(stored_size, orientation)
    return ProcessedImage(content_type, width, height, _encode_webp(thumbnail, quality))


def make_renditions(
    data: bytes,
    claimed_type: str,
    *,
    max_pixels: int,
    max_animation_pixels: int = DEFAULT_MAX_ANIMATION_PIXELS,
    thumbnail_size: int = 256,
    display_size: int = 1600,
    quality: int = 80,
) -> Renditions:
    """Verify that `data` is an intact image of `claimed_type` and make its WebP renditions.

    Raises ImageRejected when it is not. `max_pixels` applies to the canvas, and
    `max_animation_pixels` to the frame count times the canvas pixels of an animation, which
    is counted without decoding any frame but the first. Pillow's own limit still applies, so
    images above Image.MAX_IMAGE_PIXELS are rejected even when `max_pixels` is higher.

    The image is decoded once, a JPEG at 1/2, 1/4 or 1/8 scale when its longer side stays at
    least `display_size`, and each smaller rendition is resized from the next larger one.
    The function takes and returns plain data and reads no files, so it can run in a
    ProcessPoolExecutor. Two calls must not run at once in threads of one process, because
    each changes the process-wide warning filters while it runs.
    """
    _check_arguments(max_pixels, thumbnail_size, quality)
    _check_rendition_arguments(max_animation_pixels, thumbnail_size, display_size)

    with _pillow_warnings_as_rejections():
        image = _open_allowed_image(data, ALLOWED_TYPES)
        content_type = _check_type(image, data, claimed_type)
        _check_pixel_count(image, max_pixels)
        frame_count = _check_animation_pixels(image, data, max_animation_pixels)
        stored_size = image.size
        _decode_first_frame(image, data, display_size)
        orientation = _read_orientation(image)

    # The resize comes before the colour conversion and the transpose, so they run on fewer
    # pixels, and rebinding `image` frees the decoded frame.
    image = _resize_to_fit(_convert_to_resizable_mode(image), _fit_size(stored_size, display_size))
    display = _transpose_upright(_convert_to_srgb(image), orientation)
    del image

    upright_size = _upright_size(stored_size, orientation)
    thumbnail_2x = _resize_to_fit(display, _fit_size(upright_size, 2 * thumbnail_size))
    thumbnail = _resize_to_fit(thumbnail_2x, _fit_size(upright_size, thumbnail_size))
    placeholder_size = _fit_size(upright_size, min(PLACEHOLDER_SIZE, thumbnail_size))

    display_webp = _encode_webp(display, quality)
    # A small image gives renditions of one size, which are encoded once.
    thumbnail_2x_webp = display_webp
    if thumbnail_2x is not display:
        thumbnail_2x_webp = _encode_webp(thumbnail_2x, quality)
    thumbnail_webp = thumbnail_2x_webp
    if thumbnail is not thumbnail_2x:
        thumbnail_webp = _encode_webp(thumbnail, quality)

    return Renditions(
        content_type=content_type,
        width=upright_size[0],
        height=upright_size[1],
        thumbnail=thumbnail_webp,
        thumbnail_2x=thumbnail_2x_webp,
        display=display_webp,
        placeholder=_make_placeholder(_resize_to_fit(thumbnail, placeholder_size)),
        animated=frame_count > 1,
    )


def _check_arguments(max_pixels: int, thumbnail_size: int, quality: int) -> None:
    if max_pixels < 1:
        raise ValueError(f"max_pixels is {max_pixels}, expected a positive number of pixels")
    if not 1 <= thumbnail_size <= WEBP_MAX_SIDE:
        raise ValueError(
            f"thumbnail_size is {thumbnail_size}, expected 1 to {WEBP_MAX_SIDE} pixels"
        )
    if not 0 <= quality <= 100:
        raise ValueError(f"quality is {quality}, expected a WebP quality from 0 to 100")


def _check_rendition_arguments(
    max_animation_pixels: int, thumbnail_size: int, display_size: int
) -> None:
    if max_animation_pixels < 1:
        raise ValueError(
            f"max_animation_pixels is {max_animation_pixels}, expected a positive number"
        )
    # Each rendition is resized from the next larger one, so the display is the largest.
    if not 2 * thumbnail_size <= display_size <= WEBP_MAX_SIDE:
        raise ValueError(
            f"display_size is {display_size}, expected {2 * thumbnail_size} (twice the"
            f" thumbnail size) to {WEBP_MAX_SIDE} pixels"
        )


@contextmanager
def _pillow_warnings_as_rejections() -> Iterator[None]:
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


def _open_allowed_image(data: bytes, allowed_types: Iterable[str]) -> Image.Image:
    """Open `data` in a format of `allowed_types`, which reads the header but no pixels."""
    allowed_formats = list(dict.fromkeys(ALLOWED_TYPES[name] for name in allowed_types))
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


def _check_type(image: Image.Image, data: bytes, claimed_type: str) -> str:
    """Raise ImageRejected unless the decoded format is `claimed_type`, and return that type.

    A claimed type outside ALLOWED_TYPES never matches, because every allowed format maps
    to a type inside it.
    """
    if image.format == "HEIF":
        actual_type = "image/heic" if data[8:12] in _HEIC_BRANDS else "image/heif"
    else:
        actual_type = _TYPE_BY_FORMAT.get(image.format or "")

    if actual_type != claimed_type and {actual_type, claimed_type} != _HEIF_TYPES:
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


def _check_animation_pixels(image: Image.Image, data: bytes, max_animation_pixels: int) -> int:
    """Raise ImageRejected when frames times canvas pixels exceed the maximum.

    Return the number of frames, which for a GIF is counted only up to the first frame over
    the maximum. A single frame is never rejected here, because `max_pixels` covers it. Only
    GIF, PNG and WebP count as animations: the other pages of a TIFF, MPO or HEIF file are
    never decoded or shown.
    """
    if image.format not in _ANIMATION_FORMATS:
        return 1

    max_frame_count = max(1, max_animation_pixels // (image.width * image.height))
    # GIF frames are counted here, for the reason given in _check_frame_count.
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
        raise ImageRejected(RejectionReason.TOO_LARGE, detail)
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


def _decode_first_frame(image: Image.Image, data: bytes, largest_box: int) -> None:
    """Decode every byte of the first frame, so that truncated or corrupt data raises.

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale when its longer side stays at least
    `largest_box`. libjpeg still reads the whole file at reduced scale.
    """
    if image.format in ("JPEG", "MPO"):
        image.draft("RGB", _fit_size(image.size, largest_box))

    # NOTE: only the first frame of an animated GIF, PNG or WebP is decoded, so damage in a
    # later frame passes unnoticed.
    # NOTE: libjpeg fills rows lost to corrupt entropy-coded data with grey and Pillow 13
    # raises no error for it, so such a JPEG passes. Truncated files do raise.
    try:
        image.load()
    except _DECODE_ERRORS as error:
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
        data_end = _read_heif_data_end(data)
    except (struct.error, IndexError, ValueError):
        # libheif opened the file, so a box this walk cannot follow is left to libheif.
        return
    if data_end > len(data):
        detail = f"HEIF item data ends at byte {data_end} but the file has {len(data)} bytes"
        raise ImageRejected(RejectionReason.CORRUPT, detail)


def _read_heif_data_end(data: bytes) -> int:
    """Return the end offset of the item data that the iloc box places in the file itself."""
    meta = next((box for box in _iter_boxes(data, 0, len(data)) if box[0] == b"meta"), None)
    if meta is None:
        return 0
    # The meta box is a full box, so a version and flags come before its child boxes.
    _, meta_start, meta_end = meta
    for box_type, start, _ in _iter_boxes(data, meta_start + 4, min(meta_end, len(data))):
        if box_type == b"iloc":
            return _read_iloc_data_end(data, start)
    return 0


def _iter_boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """Yield the type, content start and end of each ISO base media file format box."""
    position = start
    while position + 8 <= end:
        size, box_type = struct.unpack_from(">I4s", data, position)
        header_size = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, position + 8)
            header_size = 16
        elif size == 0:
            # The last box may run to the end of the file.
            size = end - position
        if size < header_size:
            raise ValueError(f"box {box_type!r} at {position} has an invalid size of {size}")
        yield box_type, position + header_size, position + size
        position += size


def _read_iloc_data_end(data: bytes, position: int) -> int:
    """Return the end of the file-offset extents of an ItemLocationBox (ISO/IEC 14496-12 8.11.3)."""

    def read(size: int) -> int:
        nonlocal position
        if position + size > len(data):
            raise IndexError(f"iloc box ends after byte {len(data)}")
        value = int.from_bytes(data[position : position + size], "big")
        position += size
        return value

    version = read(4) >> 24
    offset_size, length_size = divmod(read(1), 16)
    base_offset_size, index_size = divmod(read(1), 16)
    if version not in (1, 2):
        index_size = 0
    item_count = read(2 if version < 2 else 4)

    data_end = 0
    for _ in range(item_count):
        read(2 if version < 2 else 4)
        construction_method = read(2) & 15 if version in (1, 2) else 0
        data_reference_index = read(2)
        base_offset = read(base_offset_size)
        extent_count = read(2)
        # With all three field sizes 0 an extent has no bytes, and the loop would repeat up to
        # 65535 times per item without reading anything.
        if offset_size + length_size + index_size == 0:
            continue
        for _ in range(extent_count):
            read(index_size)
            extent_offset = read(offset_size)
            extent_length = read(length_size)
            # Construction method 0 with data reference 0 places the extent in this file.
            if construction_method == 0 and data_reference_index == 0:
                data_end = max(data_end, base_offset + extent_offset + extent_length)
    return data_end


def _read_orientation(image: Image.Image) -> int:
    """Return the EXIF Orientation from 1 to 8, or 1 when it is missing, invalid or unreadable."""
    # HEIF stores rotation and mirroring in its own item properties, which libheif has already
    # applied, and pillow-heif 1.9 sets the EXIF Orientation to 1.
    if image.format == "HEIF":
        return 1

    # Broken EXIF is common and only affects rotation, so a parse error means "as stored".
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        return 1

    if isinstance(orientation, int) and 1 <= orientation <= 8:
        return orientation
    return 1


def _upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    # Orientations 5 to 8 turn the image by 90 degrees, so its sides swap.
    width, height = size
    if orientation in (5, 6, 7, 8):
        return height, width
    return width, height


def _fit_size(size: tuple[int, int], box: int) -> tuple[int, int]:
    """Return `size` scaled down to a longer side of `box`, or unchanged when it fits."""
    width, height = size
    longer_side = max(width, height)
    if longer_side <= box:
        return size
    scale = box / longer_side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _convert_to_resizable_mode(image: Image.Image) -> Image.Image:
    """Convert the modes that Pillow 13 resizes badly or not at all, and fix CMYK polarity."""
    mode = image.mode
    # Pillow resizes modes 1 and P with nearest-neighbour sampling, whatever filter is given.
    if mode == "1":
        return image.convert("L")
    if mode in ("P", "PA") or (mode in ("L", "RGB") and "transparency" in image.info):
        return image.convert("RGBA" if image.has_transparency_data else "RGB")
    if mode in ("RGBa", "La"):
        return image.convert(mode.upper())
    # Pillow stores the a* and b* of LAB as signed bytes, which interpolation would mix up.
    if mode == "LAB":
        return ImageCms.profileToProfile(image, _LAB_PROFILE, _SRGB_PROFILE, outputMode="RGB")
    if mode == "CMYK" and image.format in ("JPEG", "MPO") and "adobe" not in image.info:
        # Pillow reads every CMYK JPEG as Adobe software writes it, with inverted values. A
        # JPEG without Adobe's APP14 segment stores plain values, as browsers assume too.
        return ImageChops.invert(image)
    if mode.startswith("I;16") and mode not in ("I;16", "I;16B"):
        return image.convert("I")
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK", "I", "F", "I;16", "I;16B"):
        return image
    return image.convert("RGB")


def _resize_to_fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize with Lanczos, or return `image` itself when it already has `size`."""
    if image.size == size:
        return image
    # Image.reduce in Pillow 13 does not support the 16-bit modes.
    reducing_gap = None if image.mode.startswith("I;16") else _REDUCING_GAP
    resized = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=reducing_gap)
    if resized.mode == "RGBA":
        _whiten_transparent_pixels(resized)
    return resized


def _convert_to_srgb(image: Image.Image) -> Image.Image:
    """Convert to 8-bit sRGB, as RGBA when the image has an alpha channel and RGB otherwise."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _scale_to_8_bits(image)

    alpha = image.getchannel("A") if image.mode in ("LA", "RGBA") else None
    colour = image if alpha is None else image.convert(image.mode[:-1])
    icc_profile = image.info.get("icc_profile")
    # A CMYK image keeps its inks until its profile converts them, which is more faithful.
    # NOTE: no test covers the CMYK conversion through a profile, for lack of a CMYK profile.
    srgb = None
    if icc_profile:
        try:
            profile = BytesIO(icc_profile)
            srgb = ImageCms.profileToProfile(colour, profile, _SRGB_PROFILE, outputMode="RGB")
        except ImageCms.PyCMSError:
            # A broken profile, or one for another colour space, is ignored and the pixels
            # are taken as sRGB.
            srgb = None
    if srgb is None:
        srgb = colour.convert("RGB")

    if alpha is not None:
        srgb.putalpha(alpha)
        _whiten_transparent_pixels(srgb)
    return srgb


def _whiten_transparent_pixels(image: Image.Image) -> None:
    """Set the colour of the fully transparent pixels of an RGBA image to white, in place.

    Resizing with premultiplied alpha leaves those pixels black, and a transparent palette
    entry is often black too. Where a viewer drops the alpha channel, white shows instead.
    The WebP encoders keep this colour with exact=True, because libwebp otherwise replaces
    it with colours predicted from the neighbours, which were dark in a 16x16 placeholder.
    """
    transparent = image.getchannel("A").point(lambda value: 255 if value == 0 else 0)
    image.paste((*_WHITE, 0), mask=transparent)


def _scale_to_8_bits(image: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit integer or floating-point image to mode L over its value range.

    Integer samples run from 0, or from the minimum when it is negative, to the largest value
    of the smallest even bit depth that can represent the maximum. That is 4095 for 12-bit
    data in a 16-bit image and 65535 for 16-bit data. Floating-point samples run from 0.0 to
    1.0 when they stay within it, and from their minimum to their maximum otherwise.
    """
    # NOTE: the transparent colour of a 16-bit PNG (its tRNS chunk) is not applied.
    if image.mode.startswith("I;16"):
        image = image.convert("I")
    low, high = image.getextrema()

    if image.mode == "F" and 0.0 <= low and high <= 1.0:
        low, high = 0.0, 1.0
    elif image.mode != "F":
        bit_depth = max(8, int(high).bit_length())
        bit_depth += bit_depth % 2
        low, high = min(int(low), 0), 2**bit_depth - 1
    # A NaN or infinite sample leaves no usable range, and a flat image has none.
    if not (high > low and high - low < float("inf")):
        low, high = 0.0, 1.0

    scale = 255 / (high - low)
    offset = -low * scale
    return image.point(lambda value: value * scale + offset).convert("L")


def _transpose_upright(image: Image.Image, orientation: int) -> Image.Image:
    transpose = _UPRIGHT_TRANSPOSES.get(orientation)
    if transpose is None:
        return image
    return image.transpose(transpose)


def _encode_webp(image: Image.Image, quality: int) -> bytes:
    # Clearing info keeps EXIF, GPS positions, XMP and ICC profiles out of the WebP, whatever
    # save() copies from it.
    image.info.clear()
    output = BytesIO()
    image.save(output, "WEBP", quality=quality, method=_WEBP_METHOD, exact=True)
    return output.getvalue()


def _make_placeholder(image: Image.Image) -> str:
    """Encode a tiny low-quality WebP as a data URI.

    An alpha channel is kept when the URI stays within PLACEHOLDER_MAX_LENGTH characters, and
    otherwise the image is flattened onto white. Without alpha, 16x16 pixels of noise, the
    worst case for the size, give a URI of about 100 characters.
    """
    uri = _encode_placeholder(image)
    if len(uri) > PLACEHOLDER_MAX_LENGTH and image.mode == "RGBA":
        flattened = Image.new("RGB", image.size, _WHITE)
        flattened.paste(image, mask=image.getchannel("A"))
        uri = _encode_placeholder(flattened)
    return uri


def _encode_placeholder(image: Image.Image) -> str:
    image.info.clear()
    output = BytesIO()
    image.save(
        output,
        "WEBP",
        quality=_PLACEHOLDER_QUALITY,
        alpha_quality=_PLACEHOLDER_QUALITY,
        exact=True,
    )
    return "data:image/webp;base64," + base64.b64encode(output.getvalue()).decode("ascii")
