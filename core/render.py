"""Pictures of decoded CAPTCHAs: the image scaled up, each character box with its char and score, the string as title.

Layout (top to bottom): a title band with the decoded string (green when it equals the text in the file name, red
when it differs, black when the name carries no text), a label band with each character and its score above its
box, then the image scaled by ``scale`` with the boxes drawn on it in a repeating colour palette. Pure PIL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

TITLE_HEIGHT = 30
LABEL_HEIGHT = 18
MIN_WIDTH = 240
BOX_WIDTH = 2
PALETTE = (
    (230, 25, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (0, 160, 160),
    (240, 50, 230),
    (128, 128, 0),
    (0, 0, 128),
)
GREEN = (0, 140, 0)
RED = (210, 0, 0)
BLACK = (0, 0, 0)


def canvas_size(width: int, height: int, scale: int = 2) -> tuple[int, int]:
    """Size (width, height) of the picture for an image of ``width`` x ``height`` pixels."""
    return max(width * scale, MIN_WIDTH), TITLE_HEIGHT + LABEL_HEIGHT + height * scale


def render_result(
    image: Image.Image,
    text: str,
    chars: Iterable[Mapping[str, Any]],
    expected: str | None = None,
    score: float | None = None,
    scale: int = 2,
) -> Image.Image:
    """Draw a decoded image.

    image: the original RGB image. chars: ``{"char", "box": (x1, y1, x2, y2) in original pixels, "score"}`` per
    character (the rows of ``db.queries``). expected: the true text when known (from the file name). Returns an
    RGB image of ``canvas_size(image.width, image.height, scale)``; character ``i`` uses ``PALETTE[i % 8]``.
    """
    width, height = canvas_size(image.width, image.height, scale)
    top = TITLE_HEIGHT + LABEL_HEIGHT
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(image.convert("RGB").resize((image.width * scale, image.height * scale), Image.BICUBIC), (0, top))
    draw = ImageDraw.Draw(canvas)

    colour = BLACK if expected is None else GREEN if text == expected else RED
    title = f"{text or '(nothing)'}"
    if expected is not None and text != expected:
        title += f"  (file: {expected})"
    if score is not None:
        title += f"  {score:.2f}"
    draw.text((6, 4), title, fill=colour, font=ImageFont.load_default(size=20))

    label_font = ImageFont.load_default(size=12)
    for i, c in enumerate(chars):
        x1, y1, x2, y2 = (float(v) * scale for v in c["box"])
        box_colour = PALETTE[i % len(PALETTE)]
        draw.rectangle((x1, y1 + top, x2, y2 + top), outline=box_colour, width=BOX_WIDTH)
        draw.text((x1, TITLE_HEIGHT + 2), f"{c['char']} {float(c['score']):.2f}", fill=box_colour, font=label_font)
    return canvas


def render_file(image_path: str | Path, out: str | Path, row: Mapping[str, Any], scale: int = 2) -> Path:
    """Render the result ``row`` (``text``, ``score``, ``chars``; a ``db.queries`` row or a prediction in that form)
    for the image at ``image_path`` into the PNG ``out``; the expected text comes from the file name."""
    from core.formats import text_from_filename
    from core.images import load_image

    image = load_image(image_path)
    picture = render_result(
        image, row["text"] or "", row["chars"], expected=text_from_filename(Path(image_path).name),
        score=row.get("score"), scale=scale,
    )  # fmt: skip
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, format="PNG")
    return out


def render_rows(rows: Iterable[Mapping[str, Any]], out_dir: str | Path, scale: int = 2) -> tuple[list[Path], dict]:
    """Render each decoded row of ``db.queries`` into ``out_dir/<image_id>-<stem>.png``.

    Rows hold paths in their stored text form (``core.paths.path_to_text``); the image is read, and ``<stem>``
    taken, from the file-system path it stands for. Returns the written paths and ``{path: reason}`` (text form) for
    images that could not be read (rows without a result are skipped)."""
    from core.images import ImageError
    from core.paths import text_to_path

    written: list[Path] = []
    errors: dict[str, str] = {}
    for row in rows:
        if row["text"] is None:
            continue
        image_path = text_to_path(row["path"])
        out = Path(out_dir) / f"{row['image_id']}-{Path(image_path).stem}.png"
        try:
            written.append(render_file(image_path, out, row, scale=scale))
        except ImageError as exc:
            errors[row["path"]] = str(exc)
    return written, errors
