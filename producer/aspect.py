"""Image aspect ratios read from file headers, to order a job's messages by image width.

The detector pads every image of a batch to the widest one, and a worker can only batch images of the same
message. Sending a job's images ordered by aspect ratio puts images of similar widths in the same message, so
batches are barely padded (as when ``Detector.predict`` sorts a whole folder). A PNG's size is in its first 24
bytes; other formats are opened with Pillow, which reads only the header.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from core.paths import is_regular_file, text_to_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_aspect(path: str) -> float:
    """Width / height of the image at ``path`` from its header; 0.0 when it cannot be read (the worker reports why)."""
    if not is_regular_file(path):  # a FIFO would block the read
        return 0.0
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return 0.0
    if head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
    else:
        from PIL import Image

        try:
            with Image.open(path) as img:
                width, height = img.size
        except Exception:  # not an image, a decompression bomb, ...: decoded (and failed) by the worker
            return 0.0
    return width / height if height else 0.0


def by_aspect(items: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """``items`` ((image_id, path in the queue's text form)) ordered by aspect ratio; ties keep their order."""
    aspects = {image_id: read_aspect(text_to_path(path)) for image_id, path in items}
    return sorted(items, key=lambda item: aspects[item[0]])
