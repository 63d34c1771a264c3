"""Image aspect ratios read from file headers, to order a job's messages by image width.

The detector pads every image of a batch to the widest one, and a worker can only batch images of the same
message. Sending a job's images ordered by aspect ratio puts images of similar widths in the same message, so
batches are barely padded (as when ``Detector.predict`` sorts a whole folder). ``core.images.read_aspect`` reads each
size from the file's header, as the worker does when it plans its batches.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.images import read_aspect
from core.paths import text_to_path

def by_aspect(items: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """``items`` ((image_id, path in the queue's text form)) ordered by aspect ratio; ties keep their order."""
    aspects = {image_id: read_aspect(text_to_path(path)) for image_id, path in items}
    return sorted(items, key=lambda item: aspects[item[0]])
