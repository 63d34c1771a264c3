"""Colour segmentation: glyph boxes against synthetic truth and drawn cases, with and without the text's length."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_iou

from core.formats import list_images, text_from_filename
from core.images import load_image
from core.segment import colour_boxes, colour_segments
from sample_data import truth


def test_colour_boxes_find_the_synthetic_glyphs(synth: Path) -> None:
    paths = list_images(synth / "images")
    accepted = exact = 0
    for path in paths:
        text = text_from_filename(path.name)
        boxes = colour_boxes(load_image(path), len(text))
        if boxes is None:
            continue
        accepted += 1
        assert len(boxes) == len(text)
        iou = box_iou(torch.tensor(boxes), torch.tensor(truth(synth, path))).diagonal()
        exact += bool((iou >= 0.7).all())
    assert accepted >= 0.8 * len(paths)
    assert exact >= 0.95 * accepted


def drawn() -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """White canvas: an 'i' (stem and dot), a bar cut by a black line, two touching blocks of different colours,
    a pale block; black lines across. Returns the image and the expected boxes, left to right."""
    img = Image.new("RGB", (200, 60), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((10, 25, 14, 49), fill=(200, 30, 30))  # i: stem
    d.rectangle((10, 15, 14, 19), fill=(200, 30, 30))  # i: dot, 5 px above
    d.rectangle((40, 10, 52, 49), fill=(30, 120, 200))  # bar, cut below
    d.rectangle((70, 20, 89, 45), fill=(20, 160, 60))  # touching blocks
    d.rectangle((90, 18, 109, 47), fill=(150, 60, 170))
    d.rectangle((140, 22, 160, 44), fill=(250, 222, 255))  # pale
    d.line((0, 30, 199, 30), fill=(0, 0, 0), width=1)  # crosses the bar, both blocks and the pale one
    d.line((20, 59, 190, 0), fill=(0, 0, 0), width=1)
    return img, [(10, 15, 15, 50), (40, 10, 53, 50), (70, 20, 90, 46), (90, 18, 110, 48), (140, 22, 161, 45)]


def test_colour_boxes_merge_parts_split_colours_and_ignore_lines() -> None:
    img, expected = drawn()
    assert colour_boxes(img, 5) == [tuple(float(v) for v in box) for box in expected]
    assert colour_boxes(np.asarray(img), 5) == colour_boxes(img, 5)  # arrays work too
    assert colour_boxes(img, 4) is None and colour_boxes(img, 6) is None  # the count must be the text length
    assert colour_boxes(Image.new("RGB", (50, 20), "white"), 1) is None


def test_colour_segments_find_the_glyphs_without_the_text() -> None:
    img, expected = drawn()
    assert colour_segments(img) == [tuple(float(v) for v in box) for box in expected]
    assert colour_segments(np.asarray(img)) == colour_segments(img)
    assert colour_segments(Image.new("RGB", (50, 20), "white")) == []
    # a speck and a line's remnant are no glyphs
    d = ImageDraw.Draw(img)
    d.rectangle((180, 5, 180, 6), fill=(20, 20, 200))
    assert colour_segments(img) == [tuple(float(v) for v in box) for box in expected]


def test_colour_segments_count_the_synthetic_glyphs(synth: Path) -> None:
    paths = list_images(synth / "images")
    counted = exact = 0
    for path in paths:
        text = text_from_filename(path.name)
        boxes = colour_segments(load_image(path))
        if len(boxes) != len(text):
            continue
        counted += 1
        iou = box_iou(torch.tensor(boxes), torch.tensor(truth(synth, path))).diagonal()
        exact += bool((iou >= 0.7).all())
    assert counted >= 0.8 * len(paths)
    assert exact >= 0.95 * counted
