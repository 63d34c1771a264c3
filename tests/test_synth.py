"""Synthetic CAPTCHAs: boxes hold the glyph pixels, files are reproducible and readable by LabelledFolder."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from core.charset import CHARS
from core.formats import read_yolo_labels, text_from_filename
from core.synth import (FONTS, HEIGHT, MAX_WIDTH, MIN_WIDTH, _glyph_mask, _parts, _sample_style, generate,
                        render_captcha)

TEXTS = ["ab12", "zz9q0", "w8m3kx", "0000000", "mwmwmwmw", "il1jt7", "qg8x"]


def _coloured(img) -> np.ndarray:
    """Pixels painted by glyphs: lines are black blended on white (grey), glyphs have a hue or differ from grey."""
    a = np.asarray(img, dtype=np.int16)
    return (a.max(axis=2) - a.min(axis=2)) > 12


@pytest.mark.parametrize("seed", range(12))
def test_boxes_enclose_glyph_pixels(seed: int) -> None:
    rng = random.Random(seed)
    text = TEXTS[seed % len(TEXTS)]
    img, boxes = render_captcha(text.upper() if seed % 3 == 0 else text, rng)
    assert img.mode == "RGB" and img.height == HEIGHT and MIN_WIDTH <= img.width <= MAX_WIDTH
    assert len(boxes) == len(text)
    inside = np.zeros((img.height, img.width), dtype=bool)
    painted = _coloured(img)
    white = (np.asarray(img) == 255).all(axis=2)
    for x1, y1, x2, y2 in boxes:
        assert 0 <= x1 < x2 <= img.width and 0 <= y1 < y2 <= img.height
        assert all(float(v).is_integer() for v in (x1, y1, x2, y2))
        x1, y1, x2, y2 = int(x1), int(y1), int(x2), int(y2)
        inside[y1:y2, x1:x2] = True
        # tight: each edge row / column of the box holds non-white pixels
        region = ~white[y1:y2, x1:x2]
        assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
    outside = painted & ~inside
    assert not outside.any(), f"glyph pixels outside every box at {np.argwhere(outside)[:5].tolist()}"


def test_glyphs_in_order_left_to_right() -> None:
    for seed in range(20):
        _, boxes = render_captcha("abcdefgh", random.Random(seed))
        centres = [(b[0] + b[2]) / 2 for b in boxes]
        assert centres == sorted(centres)


def test_rejects_text_outside_charset() -> None:
    with pytest.raises(ValueError, match="charset"):
        render_captcha("ab-c", random.Random(0))


def test_same_rng_same_image_different_rng_different() -> None:
    a_img, a_boxes = render_captcha("k3z9", random.Random(5))
    b_img, b_boxes = render_captcha("k3z9", random.Random(5))
    c_img, _ = render_captcha("k3z9", random.Random(6))
    assert a_boxes == b_boxes and a_img.tobytes() == b_img.tobytes()
    assert a_img.size != c_img.size or a_img.tobytes() != c_img.tobytes()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_reproducible_and_labelled(tmp_path: Path) -> None:
    assert generate(tmp_path / "a", 12, seed=3, workers=1, progress=False) == 12
    generate(tmp_path / "b", 12, seed=3, workers=2, progress=False)
    generate(tmp_path / "c", 12, seed=4, workers=1, progress=False)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b, "same seed must give byte-identical files whatever the number of workers"
    assert set(a) != set(c) and a.keys().isdisjoint(c.keys())
    # --start continues the set: images 8-11 alone are the same files as the last four of the twelve
    assert generate(tmp_path / "d", 4, seed=3, workers=1, progress=False, start=8) == 4
    d = _files(tmp_path / "d")
    assert len(d) == 8 and all(a[name] == data for name, data in d.items())
    assert sorted(int(Path(n).stem.rsplit("-", 1)[1]) for n in d if n.startswith("images")) == [8, 9, 10, 11]

    images = sorted((tmp_path / "a" / "images").iterdir())
    assert len(images) == 12 and len({p.name for p in images}) == 12
    from PIL import Image

    for path in images:
        text = text_from_filename(path.name)
        assert text is not None and 4 <= len(text) <= 8
        assert path.stem.rsplit("-", 1)[1].isdigit()
        with Image.open(path) as img:
            width, height = img.size
        label_file = tmp_path / "a" / "labels" / f"{path.stem}.txt"
        lines = label_file.read_text().splitlines()
        assert len(lines) == len(text)
        boxes, labels = read_yolo_labels(label_file, text, width, height)
        assert len(boxes) == len(labels) == len(text)


def test_generated_folder_loads_as_dataset(tmp_path: Path) -> None:
    from core.formats import LabelledFolder

    generate(tmp_path, 6, seed=1, workers=1, progress=False)
    ds = LabelledFolder(tmp_path / "images", tmp_path / "labels")
    assert len(ds) == 6 and ds.skipped == {}
    item = ds[0]
    assert item["image"].shape[1] == HEIGHT and item["image"].shape[2] == ds.widths[0]
    assert item["boxes"].shape == (len(item["text"]), 4)
    assert bool((item["boxes"][:, 2] > item["boxes"][:, 0]).all())


@pytest.mark.parametrize("stroke", ["solid", "bold", "outline", "thin", "hatch"])
def test_dotted_glyphs_keep_their_dot(stroke: str) -> None:
    """A bold stroke or a distortion that joins an i's dot to its stem draws an l: the generator must not."""
    for seed, (font, _) in enumerate(FONTS * 2):
        rng = random.Random(seed)
        style = replace(_sample_style(rng), font=font, stroke=stroke, size=48 if seed % 2 else 22, rotation="upright")
        for ch in "ij":
            mask = _glyph_mask(ch, style, rng)
            # hatching may cut a stem into several strokes; never may the dot merge into it
            parts = _parts(mask)
            assert parts >= 2, f"{ch!r} in {font}, {stroke}, size {style.size}: dot joined or erased"


@pytest.mark.parametrize("font", ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "cmr10.ttf", "STIXGeneral.ttf"])
def test_thin_strokes_are_thinner_but_whole(font: str) -> None:
    """Thin glyphs lose ink, not pieces: a stroke cut in two would draw another character (or none)."""
    base = replace(_sample_style(random.Random(0)), font=font, size=36, rotation="upright", warp=0.0, rough=0.0,
                   shear=0.0, x_scale=1.0)
    broken, ink = [], []
    for ch in CHARS:
        solid = _glyph_mask(ch, replace(base, stroke="solid"), random.Random(1))
        thin = _glyph_mask(ch, replace(base, stroke="thin"), random.Random(1))
        if _parts(thin) != _parts(solid):
            broken.append(ch)
        ink.append((thin > 0).sum() / (solid > 0).sum())
    assert not broken, f"thin strokes broke {broken} in {font}"
    assert np.mean(ink) < 0.92 and min(ink) < 0.8, f"thin glyphs in {font} are not thinner: {np.mean(ink):.2f}"
