"""Helpers over synthetic sets in the seed layout, shared by the tests."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from core.formats import read_yolo_labels, text_from_filename


def truth(root: Path, path: Path) -> list[list[float]]:
    """The true boxes (x1, y1, x2, y2 pixels, text order) of ``path``, an image of the set at ``root``."""
    with Image.open(path) as img:
        size = img.size
    boxes, _ = read_yolo_labels(root / "labels" / f"{path.stem}.txt", text_from_filename(path.name), *size)
    return boxes
