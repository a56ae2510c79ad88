"""Verification of uploaded image bytes and their WebP renditions, for the worker's process pool.

make_renditions is the entry point. The modules below it are decoding (open, check and
decode), heif (HEIF input), colour (modes, sRGB and alpha) and renditions (resize and encode).
"""

from gallery.imaging.decoding import (
    ALLOWED_TYPES,
    DEFAULT_MAX_ANIMATION_PIXELS,
    ImageRejected,
    RejectionReason,
)
from gallery.imaging.renditions import (
    PLACEHOLDER_MAX_LENGTH,
    PLACEHOLDER_SIZE,
    WEBP_MAX_SIDE,
    Renditions,
    make_renditions,
)

__all__ = [
    "ALLOWED_TYPES",
    "DEFAULT_MAX_ANIMATION_PIXELS",
    "PLACEHOLDER_MAX_LENGTH",
    "PLACEHOLDER_SIZE",
    "WEBP_MAX_SIDE",
    "ImageRejected",
    "RejectionReason",
    "Renditions",
    "make_renditions",
]
