"""HEIF input: the HEIF opener for Pillow and a walk of the file's boxes that libheif skips."""

import struct
from collections.abc import Iterator

from PIL import Image

# The major brands of the ftyp box that mark HEVC-coded HEIF, which is HEIC. pillow-heif 1.9
# opens these and the generic brands mif1 and msf1, which are plain image/heif.
HEIC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}


def register_heif_opener() -> None:
    """Register pillow-heif's HEIF opener with Pillow, unless it is registered already.

    Decoding processes call this for the first upload that may be HEIF, because importing
    pillow-heif with libheif adds about 4 MiB to a process.
    """
    if "HEIF" in Image.OPEN:
        return
    import pillow_heif

    # The HEIF opener decodes HEIC and HEIF. libheif applies the rotation and mirroring stored
    # in the file while decoding. Depth maps, auxiliary images and embedded thumbnails are
    # never rendered, so they are not read.
    pillow_heif.register_heif_opener(depth_images=False, aux_images=False, thumbnails=False)


def read_heif_data_end(data: bytes) -> int:
    """Return the end offset of the item data that the iloc box places in the file itself.

    Raises struct.error, IndexError or ValueError when a box is malformed or cut off.
    """
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
