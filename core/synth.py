"""Synthetic text CAPTCHAs with exact per-character boxes, styled after the real family the detector reads.

The real images are 80 px high, 150-780 px wide, with 4-8 characters from ``0-9a-z`` spread widely over a white
background. Within one image all glyphs share a font, size (10-45 px tall), case (lower, upper or mixed, the label
staying lowercase), stroke style and rotation regime (upright, a common lean, or each glyph turned by up to 90
degrees); each glyph has its own flat colour, from pale to dark. Thin black lines cross the image, glyphs included.

Fonts are the DejaVu, STIX and Computer Modern faces shipped inside matplotlib; condensed and wide variants come
from horizontal scaling, italics from slanting, a hand-drawn look from smooth mesh distortions (coarse ones bend the
glyph, fine ones rag its outline), bold / thin / outlined / hatched strokes from mask operations. A glyph's box is the
bounding box of its own painted pixels (its alpha mask after every transform), so lines never widen it.

Everything random comes from the ``random.Random`` passed in (``generate`` seeds one per image from
``(seed, index)``), so the same seed gives byte-identical files whatever the number of workers (with the same Pillow
and FreeType). PIL, numpy and scipy only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import multiprocessing
import os
import random
import signal
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from core.charset import CHARS, encode
from core.formats import write_yolo_labels

HEIGHT = 80
MIN_WIDTH, MAX_WIDTH = 150, 780
MIN_LENGTH, MAX_LENGTH = 4, 8
_ALPHA_FLOOR = 40  # mask values below this are dropped, so every painted pixel lies inside its glyph's box
_DOTTED = "ij"  # lower-case glyphs told from others (i from l, j from a hook) by a dot that must stay apart

# (font file in matplotlib's mpl-data/fonts/ttf, sampling weight); the real family is mostly sans.
FONTS: tuple[tuple[str, float], ...] = (
    ("DejaVuSans.ttf", 4.0),
    ("DejaVuSans-Bold.ttf", 4.0),
    ("DejaVuSans-Oblique.ttf", 2.0),
    ("DejaVuSans-BoldOblique.ttf", 2.0),
    ("DejaVuSansMono.ttf", 1.5),
    ("DejaVuSansMono-Bold.ttf", 1.5),
    ("DejaVuSansMono-Oblique.ttf", 0.7),
    ("DejaVuSansMono-BoldOblique.ttf", 0.7),
    ("DejaVuSerif.ttf", 1.0),
    ("DejaVuSerif-Bold.ttf", 1.0),
    ("DejaVuSerif-Italic.ttf", 0.7),
    ("DejaVuSerif-BoldItalic.ttf", 0.7),
    ("STIXGeneral.ttf", 0.7),
    ("STIXGeneralBol.ttf", 0.7),
    ("STIXGeneralItalic.ttf", 0.7),
    ("STIXGeneralBolIta.ttf", 0.7),
    ("cmss10.ttf", 1.5),
    ("cmr10.ttf", 0.7),
    ("cmb10.ttf", 0.7),
    ("cmti10.ttf", 0.7),
    ("cmtt10.ttf", 0.7),
)


@lru_cache(maxsize=1)
def font_dir() -> Path:
    """matplotlib's bundled TrueType folder, located without importing matplotlib."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("matplotlib is not installed; it ships the fonts used for synthetic CAPTCHAs")
    return Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf"


@lru_cache(maxsize=512)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_dir() / name), size)


@lru_cache(maxsize=64)
def _cap_ratio(name: str) -> float:
    """Height of a capital letter per pixel of font size, to size fonts by glyph height."""
    x1, y1, x2, y2 = _font(name, 100).getbbox("H")
    return (y2 - y1) / 100.0


@dataclass(frozen=True)
class _Style:
    """What all glyphs of one image share."""

    font: str
    size: int  # font size in px
    case: str  # "lower" | "upper" | "mixed"
    x_scale: float  # horizontal scaling: < 1 condensed, > 1 wide
    shear: float  # italic slant: x shift per px of height (positive leans right)
    warp: float  # amplitude (px) of the smooth random distortion that makes glyphs look hand drawn
    rough: float  # amplitude (px) of the fine distortion that makes outlines ragged
    stroke: str  # "solid" | "bold" | "thin" | "outline" | "hatch"
    rotation: str  # "upright" | "lean" | "random" | "wild"
    lean: float  # common angle (degrees) of the "lean" regime
    tight: bool  # glyphs nearly touching instead of widely spaced


def _sample_style(rng: random.Random) -> _Style:
    names, weights = zip(*FONTS)
    font = rng.choices(names, weights)[0]
    glyph_height = rng.triangular(10.0, 42.0, 21.0)  # cap height in px
    size = max(8, round(glyph_height / _cap_ratio(font)))
    case = rng.choices(("lower", "upper", "mixed"), (0.45, 0.45, 0.10))[0]
    kind = rng.random()
    x_scale = rng.uniform(0.9, 1.1) if kind < 0.65 else rng.uniform(0.5, 0.85) if kind < 0.9 else rng.uniform(1.1, 1.4)
    shear = rng.uniform(-0.45, 0.45) if rng.random() < 0.3 else 0.0
    warp = glyph_height * rng.uniform(0.03, 0.09) if rng.random() < 0.5 else 0.0
    rough = rng.uniform(0.5, 1.2) if rng.random() < 0.5 else 0.0
    stroke = rng.choices(("solid", "bold", "thin", "outline", "hatch"), (0.42, 0.25, 0.1, 0.08, 0.15))[0]
    if stroke in ("thin", "outline", "hatch") and glyph_height < 20:
        stroke = "solid"
    rotation = rng.choices(("upright", "lean", "random", "wild"), (0.45, 0.2, 0.25, 0.1))[0]
    lean = rng.uniform(-30.0, 30.0)
    return _Style(font, size, case, x_scale, shear, warp, rough, stroke, rotation, lean, rng.random() < 0.15)


def _angle(style: _Style, rng: random.Random) -> float:
    if style.rotation == "upright":
        return rng.uniform(-4.0, 4.0)
    if style.rotation == "lean":
        return style.lean + rng.uniform(-5.0, 5.0)
    if style.rotation == "random":
        return rng.uniform(-35.0, 35.0)
    return rng.uniform(-90.0, 90.0)


def _hatch(shape: tuple[int, int], rng: random.Random) -> np.ndarray:
    """0/1 stripes at a random angle and period, to cut a glyph into crayon-like strokes."""
    theta = rng.uniform(0.0, math.pi)
    period = rng.uniform(2.5, 4.5)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    phase = (xx * math.cos(theta) + yy * math.sin(theta) + rng.uniform(0, period)) % period
    return (phase < period * rng.uniform(0.55, 0.75)).astype(np.float32)


def _shear(img: Image.Image, shear: float) -> Image.Image:
    """Slant ``img`` horizontally (x += shear * (height - y)), widening it to keep every pixel."""
    w, h = img.size
    offset = shear * h if shear > 0 else 0.0
    data = (1.0, shear, -offset, 0.0, 1.0, 0.0)
    return img.transform((w + math.ceil(abs(shear) * h), h), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)


def _warp(img: Image.Image, amount: float, cell: float, rng: random.Random) -> Image.Image:
    """Smooth random distortion: a mesh of ``cell``-px cells whose source corners move by up to ``amount`` px.

    Large cells bend the whole glyph (hand drawn look); cells of a few px make its outline ragged.
    """
    w, h = img.size
    nx, ny = max(1, round(w / cell)), max(1, round(h / cell))
    xs = [round(w * i / nx) for i in range(nx + 1)]
    ys = [round(h * j / ny) for j in range(ny + 1)]
    moved = {
        (i, j): (xs[i] + rng.uniform(-amount, amount), ys[j] + rng.uniform(-amount, amount))
        for i in range(nx + 1)
        for j in range(ny + 1)
    }
    mesh = [
        ((xs[i], ys[j], xs[i + 1], ys[j + 1]), (*moved[i, j], *moved[i, j + 1], *moved[i + 1, j + 1], *moved[i + 1, j]))
        for i in range(nx)
        for j in range(ny)
    ]
    return img.transform((w, h), Image.Transform.MESH, mesh, Image.Resampling.BILINEAR)


@lru_cache(maxsize=64)
def _stem_ratio(name: str) -> float:
    """Width of the font's vertical stem (the middle of an ``l``) per pixel of font size."""
    font = _font(name, 100)
    x1, y1, x2, y2 = font.getbbox("l")
    img = Image.new("L", (x2 - x1 + 4, y2 - y1 + 4), 0)
    ImageDraw.Draw(img).text((2 - x1, 2 - y1), "l", font=font, fill=255)
    row = np.asarray(img)[img.height // 2]
    return float((row >= 128).sum()) / 100.0


def _parts(mask: np.ndarray) -> int:
    """Number of separate (8-connected) pieces of a glyph mask."""
    return int(ndimage.label(mask > 0, structure=np.ones((3, 3), dtype=bool))[1])


_DOUBLE = [min(255, 2 * v) for v in range(256)]  # lookup table: twice the ink, saturating


def _thin(ch: str, font: str, size: int, canvas: tuple[int, int], origin: tuple[int, int]) -> Image.Image:
    """``ch`` drawn with thinner strokes, unbroken: eroded at 4x resolution, then averaged down to ``canvas``.

    The stem loses up to half its width; where that would cut a hairline or a thin junction (the glyph falls into
    more pieces than it has), less is taken, down to nothing. Eroding at the glyph's own size would cut every stroke
    of 2 px or less.
    """
    big = Image.new("L", (4 * canvas[0], 4 * canvas[1]), 0)
    ImageDraw.Draw(big).text((4 * origin[0], 4 * origin[1]), ch, font=_font(font, 4 * size), fill=255)
    plain = big.resize(canvas, Image.Resampling.BOX)
    pieces = _parts(np.asarray(plain) >= _ALPHA_FLOOR)
    pixels = np.asarray(big)
    stem = 4 * size * _stem_ratio(font)  # px at 4x
    for erode in sorted({max(1, round(stem * f)) for f in (0.25, 0.18, 0.12, 0.06)}, reverse=True):
        eroded = ndimage.minimum_filter(pixels, size=2 * erode + 1, mode="constant", cval=0)  # separable: fast
        thin = Image.fromarray(eroded).resize(canvas, Image.Resampling.BOX)
        thin = thin.point(_DOUBLE)  # averaging thinned strokes fades them: restore their ink
        if _parts(np.asarray(thin) >= _ALPHA_FLOOR) == pieces:
            return thin
    return plain


def _glyph_mask(ch: str, style: _Style, rng: random.Random) -> np.ndarray:
    """uint8 alpha mask of one glyph, tightly cropped: stroked, scaled, slanted, distorted and rotated.

    Values below ``_ALPHA_FLOOR`` are zeroed, so the crop is exactly the glyph's painted pixels. No effect may change
    what the glyph reads as: a thin glyph that fell into more pieces than the solid one is drawn solid, and an ``i``
    or ``j`` whose dot a bold stroke or a distortion joined to the stem (it would read as an ``l`` or a hook) is drawn
    again, plainer, until the dot stands apart.
    """
    state = rng.getstate()
    mask = _draw_glyph(ch, style, rng)
    if style.stroke == "thin":  # scaling or rotation may still have cut a hairline: then the glyph stays solid
        twin = random.Random()
        twin.setstate(state)  # the same size, scale and angle
        solid = _draw_glyph(ch, replace(style, stroke="solid"), twin)
        if _parts(mask) != _parts(solid):
            mask = solid
    if ch in _DOTTED:
        plain = replace(style, stroke="solid", warp=0.0, rough=0.0)
        for fallback in (replace(style, stroke="solid"), plain, plain, plain):
            if _parts(mask) >= 2:
                break
            mask = _draw_glyph(ch, fallback, rng)
    return mask


def _draw_glyph(ch: str, style: _Style, rng: random.Random) -> np.ndarray:
    """One attempt at :func:`_glyph_mask`."""
    size = max(8, round(style.size * rng.uniform(0.92, 1.08)))
    font = _font(style.font, size)
    width = max(1, round(style.size / 14)) if style.stroke in ("bold", "outline") else 0
    x1, y1, x2, y2 = font.getbbox(ch, stroke_width=width)
    pad = 2 + width + math.ceil(style.warp + style.rough)
    img = Image.new("L", (x2 - x1 + 2 * pad, y2 - y1 + 2 * pad), 0)
    fill = 0 if style.stroke == "outline" else 255
    if style.stroke == "thin":
        img = _thin(ch, style.font, size, img.size, (pad - x1, pad - y1))
    else:
        ImageDraw.Draw(img).text((pad - x1, pad - y1), ch, font=font, fill=fill, stroke_width=width, stroke_fill=255)
    if style.stroke == "hatch":
        arr = np.asarray(img, dtype=np.float32) * _hatch((img.height, img.width), rng)
        img = Image.fromarray(arr.astype(np.uint8))
    scale = style.x_scale * rng.uniform(0.95, 1.05)
    img = img.resize((max(1, round(img.width * scale)), img.height), Image.Resampling.BILINEAR)
    if style.shear:
        img = _shear(img, style.shear)
    if style.warp:
        img = _warp(img, style.warp, max(img.size) / 3, rng)
    if style.rough:
        img = _warp(img, style.rough, 3.5, rng)
    img = img.rotate(_angle(style, rng), resample=Image.Resampling.BICUBIC, expand=True)
    mask = np.asarray(img, dtype=np.uint8).copy()
    mask[mask < _ALPHA_FLOOR] = 0
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if rows.size == 0:  # a stroke effect erased the glyph: fall back to the plain shape
        return _draw_glyph(ch, replace(style, stroke="solid"), rng)
    mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    if mask.shape[0] > HEIGHT - 4:  # a tall glyph turned upright: shrink to fit the 80 px height
        f = (HEIGHT - 4) / mask.shape[0]
        small = Image.fromarray(mask).resize((max(1, round(mask.shape[1] * f)), HEIGHT - 4), Image.Resampling.BILINEAR)
        mask = np.asarray(small, dtype=np.uint8).copy()
        mask[mask < _ALPHA_FLOOR] = 0
    return mask


def _colour(rng: random.Random, lightest: float = 238.0) -> np.ndarray:
    """A flat glyph colour anywhere from pale to dark: its luminance stays below ``lightest`` (white is 255)."""
    while True:
        rgb = [rng.randrange(256) for _ in range(3)]
        if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < lightest:
            return np.array(rgb, dtype=np.float32)


def _layout(widths: list[int], style: _Style, rng: random.Random) -> tuple[int, list[float]]:
    """Image width (a multiple of 5) and each glyph's left x.

    As in the real family, the width grows only loosely with the length: a target width is drawn first, then the
    spacing that leaves 45-90% of the free room as margins, kept within 3-55 px between glyphs (or nearly touching when
    tight).
    """
    n, glyphs = len(widths), sum(widths)
    if style.tight:
        gaps = [rng.uniform(0.0, 6.0) for _ in range(n - 1)]
        margins = rng.uniform(50.0, 300.0)
    else:
        free = rng.gauss(420.0 + 18.0 * (n - MIN_LENGTH), 165.0) - glyphs
        margins = min(max(free * rng.uniform(0.45, 0.9), 50.0), 420.0)
        gap = min(max((free - margins) / max(n - 1, 1), 3.0), 55.0)
        gaps = [max(1.0, gap * rng.uniform(0.75, 1.25)) for _ in range(n - 1)]
    room = MAX_WIDTH - 8 - glyphs
    if sum(gaps) > room:  # too long for the widest image: close the gaps
        gaps = [g * room / sum(gaps) if g > 0 else g for g in gaps]
    span = glyphs + sum(gaps)
    width = min(MAX_WIDTH, max(MIN_WIDTH, 5 * math.ceil((span + margins) / 5)))
    x = (width - span) * rng.uniform(0.3, 0.62)
    xs = []
    for i, w in enumerate(widths):
        xs.append(x)
        x += w + (gaps[i] if i < n - 1 else 0.0)
    return width, xs


def _draw_lines(img: Image.Image, rng: random.Random) -> None:
    """Thin black 1 px lines (aliased, as in the real family): mostly long shallow ones, a few short ones."""
    width = img.width
    count = rng.choices(range(9), (0.12, 0.2, 0.22, 0.16, 0.11, 0.08, 0.05, 0.03, 0.03))[0]
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        if rng.random() < 0.7:
            length = rng.uniform(0.2, 0.95) * width
            x0 = rng.uniform(-0.1 * width, width - 0.5 * length)
            y0, y1 = rng.uniform(0, HEIGHT), rng.uniform(0, HEIGHT)
            x1 = x0 + length
        else:
            length, theta = rng.uniform(8.0, 70.0), rng.uniform(0.0, math.pi)
            x0, y0 = rng.uniform(0, width), rng.uniform(0, HEIGHT)
            x1, y1 = x0 + length * math.cos(theta), y0 + length * math.sin(theta)
        draw.line([(round(x0), round(y0)), (round(x1), round(y1))], fill=(0, 0, 0), width=1)


def render_captcha(text: str, rng: random.Random) -> tuple[Image.Image, list[tuple[float, float, float, float]]]:
    """Render ``text`` (0-9a-z, any case) as one CAPTCHA.

    Returns an RGB image 80 px high and 150-780 px wide, and one box per character in order: ``(x1, y1, x2, y2)``
    in pixels (edges: a glyph covering columns 10..19 has x1=10, x2=20), the bounding box of that glyph's own
    painted pixels. Raises ValueError for characters outside 0-9a-z.
    """
    encode(text)  # validates
    text = text.lower()
    style = _sample_style(rng)
    masks = []
    for ch in text:
        upper = style.case == "upper" or (style.case == "mixed" and rng.random() < 0.5)
        masks.append(_glyph_mask(ch.upper() if upper else ch, style, rng))
    width, xs = _layout([m.shape[1] for m in masks], style, rng)
    centre = rng.uniform(37.0, 50.0)
    canvas = np.full((HEIGHT, width, 3), 255.0, dtype=np.float32)
    boxes = []
    for mask, x in zip(masks, xs):
        h, w = mask.shape
        top = round(centre + rng.gauss(0.0, 2.5) - h / 2)
        top = min(max(top, 1), HEIGHT - 1 - h)
        left = min(max(round(x + rng.uniform(-2.0, 2.0)), 1), width - 1 - w)
        alpha = mask.astype(np.float32)[..., None] / 255.0
        region = canvas[top : top + h, left : left + w]
        region *= 1.0 - alpha
        region += alpha * _colour(rng, 190.0 if style.stroke == "thin" else 238.0)  # thin strokes show less ink
        boxes.append((float(left), float(top), float(left + w), float(top + h)))
    img = Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")
    _draw_lines(img, rng)
    return img, boxes


def _item_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"captcha-synth:{seed}:{index}".encode()).digest()[:8], "big")


def _write_one(args: tuple[Path, int, int]) -> int:
    """Render and write image ``index`` of ``seed`` into ``out_dir``/images and /labels."""
    out_dir, seed, index = args
    rng = random.Random(_item_seed(seed, index))
    text = "".join(rng.choice(CHARS) for _ in range(rng.randint(MIN_LENGTH, MAX_LENGTH)))
    img, boxes = render_captcha(text, rng)
    stem = f"{text}-{index}"
    write_yolo_labels(out_dir / "labels" / f"{stem}.txt", boxes, img.width, img.height, encode(text))
    img.save(out_dir / "images" / f"{stem}.png", compress_level=3)
    return index


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def generate(
    out_dir: str | os.PathLike, count: int, seed: int = 0, workers: int | None = None, progress: bool = True,
    start: int = 0,
) -> int:
    """Write ``count`` CAPTCHAs to ``out_dir/images/<text>-<index>.png`` with YOLO boxes in ``out_dir/labels``,
    indices ``start`` to ``start + count - 1``.

    Image ``index`` depends only on ``(seed, index)``, so ``start`` continues a set: ``count=N, start=M`` writes the
    files that ``count=M + N`` would add to ``count=M`` of the same seed (more training data that has never been seen).
    ``workers`` processes render in parallel (default: the usable CPU cores; 1 renders in this process). Returns the
    number of images written.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers or _default_workers(), max(count, 1)))
    jobs = ((out, seed, i) for i in range(start, start + count))

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    if workers == 1:
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("synth", total=count)
            for job in jobs:
                _write_one(job)
                bar.advance(task)
        return count
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    # the workers are forked before the progress bar starts its refresh thread: a fork while that thread held a
    # lock (the console's, stdout's) left a child that hung on it, and the pool's exit waiting for it for ever
    with context.Pool(workers, initializer=_init_worker) as pool:
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task("synth", total=count)
            for _ in pool.imap_unordered(_write_one, jobs, chunksize=16):
                bar.advance(task)
    return count


def _init_worker() -> None:
    """In each pool process: SIGTERM's default action, so the pool's ``terminate()`` always ends it. A handler the
    parent had set (``demo`` turns SIGTERM into an exception) would run Python-level exit code in the child instead."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
