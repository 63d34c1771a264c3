"""Glyphs as pictures: each in a window of its image, on sheets, and as a blind test for the eye.

``glyph_window`` cuts the 120 x 80 px of an image around one glyph, outlines its box and draws it twice as large
with a caption; ``sheet`` lays windows out in rows. ``write_blind`` writes the windows of the glyphs a checkpoint
misreads (all, or a seeded sample: ``--sample``) shuffled among glyphs it reads right (``--controls``), numbered and
without captions, on pages of 20 (``DIR/page*.png``), with the answer key in ``DIR/key.json``. Whoever reads the
pages by eye writes ``DIR/answers.txt``, one line per window: its number, the character seen, and ``s`` where sure
or ``u`` where not; ``score`` then compares the eye with the truth and with the checkpoint. ``synth_errors.py`` and
``real_errors.py`` use these with ``--montage``, ``--blind`` and ``--score``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

WINDOW = (120, 80)  # px of the image around one glyph, drawn twice as large
PAGE = (4, 5)  # windows across and down one page of --blind


def glyph_window(path: Path, box: list[float], caption: str) -> Image.Image:
    """The 120 x 80 px of ``path`` centred on ``box`` (x1, y1, x2, y2), the box outlined, at 2x, ``caption`` below."""
    x1, y1, x2, y2 = box
    left = round((x1 + x2) / 2 - WINDOW[0] / 2)
    with Image.open(path) as img:
        window = img.convert("RGB").crop((left, 0, left + WINDOW[0], WINDOW[1]))  # outside the image: black
    ImageDraw.Draw(window).rectangle((x1 - left - 2, y1 - 2, x2 - left + 1, y2 + 1), outline=(255, 0, 0))
    tile = Image.new("RGB", (2 * WINDOW[0], 2 * WINDOW[1] + 18), "white")
    tile.paste(window.resize((2 * WINDOW[0], 2 * WINDOW[1]), Image.Resampling.LANCZOS), (0, 0))
    ImageDraw.Draw(tile).text((4, 2 * WINDOW[1] + 2), caption, fill=(0, 0, 0))
    return tile


def sheet(tiles: list[Image.Image], columns: int) -> Image.Image:
    """``tiles`` (all one size) in rows of ``columns``, 4 px apart on grey."""
    w, h = tiles[0].size
    rows = -(-len(tiles) // columns)
    out = Image.new("RGB", (columns * (w + 4), rows * (h + 4)), (128, 128, 128))
    for k, tile in enumerate(tiles):
        out.paste(tile, ((k % columns) * (w + 4), (k // columns) * (h + 4)))
    return out


def write_blind(out: Path, misread: list[tuple], right: list[tuple], controls: int, sample: int | None = None,
                seed: int = 7) -> int:
    """Shuffled, uncaptioned windows of the misread glyphs (a seeded ``sample`` of them, if given) and ``controls``
    glyphs read right, and their key. Each glyph is ``(path, box, truth, read)``."""
    rng = random.Random(seed)
    if sample is not None and sample < len(misread):
        misread = random.Random(seed + 1).sample(misread, sample)
    controls_drawn = rng.sample(right, min(controls, len(right)))
    items = [(*g, "misread") for g in misread] + [(*g, "read right") for g in controls_drawn]
    rng.shuffle(items)
    out.mkdir(parents=True, exist_ok=True)
    per = PAGE[0] * PAGE[1]
    tiles = [glyph_window(path, box, f"#{n}") for n, (path, box, _, _, _) in enumerate(items)]
    for page in range(0, len(tiles), per):
        sheet(tiles[page : page + per], PAGE[0]).save(out / f"page{page // per}.png")
    key = [{"n": n, "image": path.name, "truth": t, "read": r, "kind": kind}
           for n, (path, _, t, r, kind) in enumerate(items)]
    (out / "key.json").write_text(json.dumps(key, indent=1))
    return len(items)


def score(folder: Path) -> None:
    """Compare ``folder/answers.txt`` (by eye) with ``folder/key.json`` (what the image says, what the reader read)."""
    key = {k["n"]: k for k in json.loads((folder / "key.json").read_text())}
    answers = {}
    for i, line in enumerate((folder / "answers.txt").read_text().splitlines(), 1):
        if line.strip():
            parts = line.split()
            if len(parts) != 3 or not parts[0].isdigit() or parts[2] not in ("s", "u"):
                raise SystemExit(f"answers.txt line {i}: expected '<window> <character> <s|u>', got {line!r}")
            answers[int(parts[0])] = (parts[1].lower(), parts[2] == "s")
    missing = sorted(set(key) - set(answers))
    if missing:
        raise SystemExit(f"answers.txt has no answer for {len(missing)} windows, the first #{missing[0]}")
    for kind in ("misread", "read right"):
        rows = [(answers[n], k) for n, k in key.items() if k["kind"] == kind]
        eye = sum(a[0] == k["truth"] for a, k in rows)
        sure = [(a, k) for a, k in rows if a[1]]
        share = 100 * eye / max(len(rows), 1)
        print(f"glyphs the reader {kind:<10}: {len(rows):>4}; by eye {eye} right ({share:.0f}%), "
              f"sure of {len(sure)} and right on {sum(a[0] == k['truth'] for a, k in sure)} of those; "
              f"the eye read as the reader did on {sum(a[0] == k['read'] for a, k in rows)}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--montage``, ``--blind``, ``--controls``, ``--sample`` and ``--score``, as both error scripts take them."""
    parser.add_argument("--montage", type=Path, default=None, help="draw the misread glyphs in one picture here")
    parser.add_argument("--blind", type=Path, default=None, help="write them shuffled and uncaptioned here, with a key")
    parser.add_argument("--controls", type=int, default=None, help="glyphs read right among them (default: half)")
    parser.add_argument("--sample", type=int, default=None, help="--blind: only this many misread glyphs (seeded)")
    parser.add_argument("--score", type=Path, default=None, help="score DIR/answers.txt against DIR/key.json")


def write_requested(args: argparse.Namespace, misread: list[tuple], right: list[tuple]) -> None:
    """The ``--montage`` picture and the ``--blind`` test that ``args`` asks for, from ``(path, box, truth, read)``s."""
    if args.montage and misread:
        sheet([glyph_window(p, b, f"{t}->{r} {p.stem}") for p, b, t, r in misread], 5).save(args.montage)
        print(f"{len(misread)} misread glyphs drawn in {args.montage}")
    if args.blind:
        controls = (args.sample or len(misread)) // 2 if args.controls is None else args.controls
        n = write_blind(args.blind, misread, right, controls, args.sample)
        print(f"{n} windows in {args.blind}/page*.png, key in {args.blind}/key.json; write "
              f"{args.blind}/answers.txt, then --score {args.blind}")
