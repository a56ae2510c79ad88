"""WebP renditions of a verified upload: display image, thumbnails and placeholder."""

import base64
import math
from dataclasses import dataclass
from io import BytesIO

from PIL import Image

from gallery.imaging.colour import (
    WHITE,
    convert_to_resizable_mode,
    convert_to_srgb,
    whiten_transparent_pixels,
)
from gallery.imaging.decoding import (
    DEFAULT_MAX_ANIMATION_PIXELS,
    check_animation_pixels,
    check_pixel_count,
    check_type,
    decode_first_frame,
    fit_size,
    open_allowed_image,
    pillow_warnings_as_rejections,
    read_date_taken,
    read_orientation,
)

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

# The placeholder is a WebP of at most this many pixels on its longer side, sent inline as a
# data URI of at most PLACEHOLDER_MAX_LENGTH characters, so a grid of 60 adds at most 18 KB.
PLACEHOLDER_SIZE = 16
PLACEHOLDER_MAX_LENGTH = 300
_PLACEHOLDER_QUALITY = 30

# libwebp's method trades encoding time for size, from 0 (fastest) to 6. On the display
# renditions of seven corpus photos, method 2 encoded 2.1 times faster than Pillow's default
# of 4, for 3% more bytes (Pillow 13 with libwebp 1.6, one core of a 2-core VM).
_WEBP_METHOD = 2

# The display rendition is the largest encode, and the viewer fetches one at a time, so it
# trades bytes for time further. On the display renditions of six photos, method 1 encoded
# 22% to 40% faster than method 2 for 4% to 11% more bytes, at the same or a higher PSNR
# (same versions and machine).
_DISPLAY_WEBP_METHOD = 1

# The display image may be this fraction of display_size when a JPEG draft reaches that. A
# 6000x4000 photo then decodes at 1/4 scale to 1500x1000 and needs no resize, instead of a
# 1/2-scale decode to 3000x2000 and a Lanczos resize to 1600x1067. On a generated 24 MP JPEG
# this lowered a process's peak RSS from 79 to 53 MiB and the CPU time of make_renditions
# from 251 to 134 ms (Pillow 13, libjpeg-turbo 3.2, one core of a 2-core VM). Against a
# Lanczos resize of the full decode, a 1/4-scale decode of two phone photos scored 39 and
# 49 dB PSNR, where 1/2 scale and Lanczos scored 51 and 53 dB.
_DISPLAY_DRAFT_FRACTION = 0.9

# A resize first shrinks by a whole factor with a box filter while the image stays at least
# this many times the target, then finishes with Lanczos. Pillow's own thumbnail() uses 2.0.
_REDUCING_GAP = 3.0


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
    # Longer side at most display_size, for the viewer. It may be 90% of display_size when
    # a JPEG decoded at reduced scale reaches that, as a 6000x4000 photo does at 1500x1000.
    display: bytes
    # A "data:image/webp;base64," URI of a WebP with a longer side of at most
    # PLACEHOLDER_SIZE, for the grid to show until the thumbnail arrives.
    placeholder: str
    # True for a GIF, PNG or WebP of more than one frame. The renditions show the first frame.
    animated: bool
    # When the photo was taken, from EXIF DateTimeOriginal, as "YYYY-MM-DD HH:MM" in the
    # camera's local time (EXIF 2.3 has no time zone there); "" when unknown.
    taken_at: str = ""
    # The media type of thumbnail, thumbnail_2x and display.
    rendition_type: str = "image/webp"


@dataclass(frozen=True)
class FittedImage:
    """Verified upload, decoded, turned upright, in 8-bit sRGB and scaled to fit a square box."""

    # The type read from the bytes: a key of ALLOWED_TYPES.
    content_type: str
    # The size of the original once turned upright.
    width: int
    height: int
    frame_count: int
    # RGBA when the upload has an alpha channel and RGB otherwise, never enlarged.
    image: Image.Image
    # As Renditions.taken_at.
    taken_at: str = ""


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
    least 90% of `display_size`, and each smaller rendition is resized from the next larger
    one.
    The function takes and returns plain data and reads no files, so it can run in a
    ProcessPoolExecutor. Two calls must not run at once in threads of one process, because
    each changes the process-wide warning filters while it runs.
    """
    _check_arguments(max_pixels, thumbnail_size, quality)
    _check_rendition_arguments(max_animation_pixels, thumbnail_size, display_size)

    decoded = decode_to_fit(
        data,
        claimed_type,
        display_size,
        max_pixels=max_pixels,
        max_animation_pixels=max_animation_pixels,
        draft_box=max(2 * thumbnail_size, math.ceil(display_size * _DISPLAY_DRAFT_FRACTION)),
    )
    display = decoded.image
    upright_size = decoded.width, decoded.height

    thumbnail_2x = _resize_to_fit(display, fit_size(upright_size, 2 * thumbnail_size))
    thumbnail = _resize_to_fit(thumbnail_2x, fit_size(upright_size, thumbnail_size))
    placeholder_size = fit_size(upright_size, min(PLACEHOLDER_SIZE, thumbnail_size))

    # A small image gives renditions of one size, which are encoded once, as a thumbnail.
    thumbnail_webp = encode_webp(thumbnail, quality)
    thumbnail_2x_webp = thumbnail_webp
    if thumbnail_2x is not thumbnail:
        thumbnail_2x_webp = encode_webp(thumbnail_2x, quality)
    display_webp = thumbnail_2x_webp
    if display is not thumbnail_2x:
        display_webp = encode_webp(display, quality, method=_DISPLAY_WEBP_METHOD)

    return Renditions(
        content_type=decoded.content_type,
        width=upright_size[0],
        height=upright_size[1],
        thumbnail=thumbnail_webp,
        thumbnail_2x=thumbnail_2x_webp,
        display=display_webp,
        placeholder=_make_placeholder(_resize_to_fit(thumbnail, placeholder_size)),
        animated=decoded.frame_count > 1,
        taken_at=decoded.taken_at,
    )


def decode_to_fit(
    data: bytes,
    claimed_type: str,
    box: int,
    *,
    max_pixels: int,
    max_animation_pixels: int = DEFAULT_MAX_ANIMATION_PIXELS,
    draft_box: int | None = None,
) -> FittedImage:
    """Verify `data` as make_renditions does, then decode it to fit a square of `box` pixels.

    Raises ImageRejected when `data` is not an intact image of `claimed_type` within the
    limits. A JPEG is decoded at 1/2, 1/4 or 1/8 scale when its longer side stays at least
    `draft_box`, by default `box`, and a draft smaller than `box` keeps its size.
    """
    with pillow_warnings_as_rejections():
        image = open_allowed_image(data, max_pixels)
        content_type = check_type(image, data, claimed_type)
        check_pixel_count(image, max_pixels)
        frame_count = check_animation_pixels(image, data, max_animation_pixels)
        stored_size = image.size
        decode_first_frame(image, data, draft_box or box)
        orientation = read_orientation(image)
        taken_at = read_date_taken(image)

    # A draft for a `draft_box` smaller than `box` may already fit, and is never enlarged.
    size = image.size if max(image.size) <= box else fit_size(stored_size, box)
    # The resize comes before the colour conversion and the transpose, so they run on fewer
    # pixels, and rebinding `image` frees the decoded frame.
    image = _resize_to_fit(convert_to_resizable_mode(image), size)
    upright = _transpose_upright(convert_to_srgb(image), orientation)
    width, height = _upright_size(stored_size, orientation)
    return FittedImage(content_type, width, height, frame_count, upright, taken_at)


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


def _upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    # Orientations 5 to 8 turn the image by 90 degrees, so its sides swap.
    width, height = size
    if orientation in (5, 6, 7, 8):
        return height, width
    return width, height


def _resize_to_fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize with Lanczos, or return `image` itself when it already has `size`."""
    if image.size == size:
        return image
    # Image.reduce in Pillow 13 does not support the 16-bit modes.
    reducing_gap = None if image.mode.startswith("I;16") else _REDUCING_GAP
    resized = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=reducing_gap)
    if resized.mode == "RGBA":
        whiten_transparent_pixels(resized)
    return resized


def _transpose_upright(image: Image.Image, orientation: int) -> Image.Image:
    transpose = _UPRIGHT_TRANSPOSES.get(orientation)
    if transpose is None:
        return image
    return image.transpose(transpose)


def encode_webp(image: Image.Image, quality: int, method: int = _WEBP_METHOD) -> bytes:
    # Clearing info keeps EXIF, GPS positions, XMP and ICC profiles out of the WebP, whatever
    # save() copies from it.
    image.info.clear()
    output = BytesIO()
    image.save(output, "WEBP", quality=quality, method=method, exact=True)
    return output.getvalue()


def _make_placeholder(image: Image.Image) -> str:
    """Encode a tiny low-quality WebP as a data URI.

    An alpha channel is kept when the URI stays within PLACEHOLDER_MAX_LENGTH characters, and
    otherwise the image is flattened onto white. Without alpha, 16x16 pixels of noise, the
    worst case for the size, give a URI of about 100 characters.
    """
    uri = _encode_placeholder(image)
    if len(uri) > PLACEHOLDER_MAX_LENGTH and image.mode == "RGBA":
        flattened = Image.new("RGB", image.size, WHITE)
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
