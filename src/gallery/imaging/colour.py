"""Colour handling: modes that resize well, conversion to 8-bit sRGB, and alpha."""

import functools
from io import BytesIO

from PIL import Image, ImageChops, ImageCms

_SRGB_PROFILE = ImageCms.createProfile("sRGB")
_LAB_PROFILE = ImageCms.createProfile("LAB")

WHITE = (255, 255, 255)


def convert_to_resizable_mode(image: Image.Image) -> Image.Image:
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


def convert_to_srgb(image: Image.Image) -> Image.Image:
    """Convert to 8-bit sRGB, as RGBA when the image has an alpha channel and RGB otherwise."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _scale_to_8_bits(image)

    alpha = image.getchannel("A") if image.mode in ("LA", "RGBA") else None
    colour = image if alpha is None else image.convert(image.mode[:-1])
    icc_profile = image.info.get("icc_profile")
    # A CMYK image keeps its inks until its profile converts them, which is more faithful.
    # NOTE: no test covers the CMYK conversion through a profile, for lack of a CMYK profile.
    transform = _find_srgb_transform(icc_profile, colour.mode) if icc_profile else None
    if transform is not None:
        srgb = ImageCms.applyTransform(colour, transform)
    elif colour.mode == "RGB":
        # The pixels are sRGB already, and the image is not copied.
        srgb = colour
    else:
        srgb = colour.convert("RGB")

    if alpha is not None:
        srgb.putalpha(alpha)
        whiten_transparent_pixels(srgb)
    return srgb


def _find_srgb_transform(icc_profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """Return the transform from an embedded profile to sRGB, or None to skip it.

    Photos from one device share a profile, so each process keeps the transforms of the
    last 16 profiles. Building one took 2 ms (LittleCMS 2.19, one core of a 2-core VM).
    A profile over _MAX_CACHED_PROFILE_BYTES is not kept, so uploads cannot fill the cache.
    """
    if len(icc_profile) > _MAX_CACHED_PROFILE_BYTES:
        return _build_srgb_transform(icc_profile, mode)
    return _build_cached_srgb_transform(icc_profile, mode)


def _build_srgb_transform(icc_profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """Build the transform from an embedded profile to sRGB, or return None to skip it.

    None means the pixels are taken as sRGB as they are. That happens for a broken profile,
    for one of another colour space than `mode`, and for an RGB profile that maps every
    colour of _IDENTITY_SAMPLE to itself within one level, as the sRGB profiles that cameras
    embed do. Such a transform changes no pixel by more than one level, and applying it took
    30 ms on a 1600x1200 image.
    """
    try:
        transform = ImageCms.buildTransform(BytesIO(icc_profile), _SRGB_PROFILE, mode, "RGB")
    except ImageCms.PyCMSError:
        return None

    if mode == "RGB" and _keeps_sample_colours(transform):
        return None
    return transform


def _keeps_sample_colours(transform: ImageCms.ImageCmsTransform) -> bool:
    converted = ImageCms.applyTransform(_IDENTITY_SAMPLE, transform)
    difference = ImageChops.difference(converted, _IDENTITY_SAMPLE)
    return max(high for _, high in difference.getextrema()) <= 1


def _make_identity_sample() -> Image.Image:
    """Build a strip of every level of red, green, blue and grey, and a 16-step RGB lattice."""
    levels = range(256)
    lattice = range(0, 256, 17)
    colours = [
        *((level, 0, 0) for level in levels),
        *((0, level, 0) for level in levels),
        *((0, 0, level) for level in levels),
        *((level, level, level) for level in levels),
        *((red, green, blue) for red in lattice for green in lattice for blue in lattice),
    ]
    data = bytes(value for colour in colours for value in colour)
    return Image.frombytes("RGB", (len(colours), 1), data)


_IDENTITY_SAMPLE = _make_identity_sample()

# A camera's sRGB profile takes about 3 KB and an iPhone's Display P3 profile 0.5 KB, but a
# JPEG can carry about 16 MB of profile in up to 255 APP2 segments.
_MAX_CACHED_PROFILE_BYTES = 64 * 1024
_build_cached_srgb_transform = functools.lru_cache(maxsize=16)(_build_srgb_transform)


def whiten_transparent_pixels(image: Image.Image) -> None:
    """Set the colour of the fully transparent pixels of an RGBA image to white, in place.

    Resizing with premultiplied alpha leaves those pixels black, and a transparent palette
    entry is often black too. Where a viewer drops the alpha channel, white shows instead.
    The WebP encoders keep this colour with exact=True, because libwebp otherwise replaces
    it with colours predicted from the neighbours, which were dark in a 16x16 placeholder.
    """
    transparent = image.getchannel("A").point(lambda value: 255 if value == 0 else 0)
    image.paste((*WHITE, 0), mask=transparent)


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
