"""Where a checkpoint goes wrong on a synthetic set, by the style each image was drawn in.

``captcha-queue synth OUT --count N --seed S`` draws image ``i`` from its own generator (seeded by ``S`` and ``i``):
first the text, then the style. Replaying those two draws recovers every image's style (font, case, size, stroke,
rotation regime, tight spacing) without storing it, so the errors can be split by it: a style whose images read far
worse than the rest is where the generator and the network disagree. Each image is also read on its true boxes (the
labels folder beside the images, ``Detector.read_boxes``): the column ``true boxes`` is what a perfect detector
would leave to the reader and the context head, so the gap between it and ``right%`` is the detector's share.

Replaying the whole image (``render_captcha``) also recovers the form each glyph was drawn in (``O`` or ``o`` for an
``o``), so the reading on the true boxes is split by glyph too: the kinds of glyph no image can settle (an upper-case
``I`` and an ``l`` side by side in a mixed-case image are the same bar in most fonts) against the rest.

The glyphs misread on their true boxes can be looked at: ``--montage PNG`` draws each in its place (a 120 x 80 px
window of its image, its box outlined) captioned ``truth->read``. ``--blind DIR`` writes the same windows shuffled
among glyphs read right (``--controls``, default half as many; ``--sample N`` takes a seeded sample of the misread
ones), numbered but not captioned, as ``DIR/page*.png``, and the answer key as ``DIR/key.json``; whoever reads them
by eye writes ``DIR/answers.txt`` (one line per window: number, character, and ``s`` where sure or ``u`` where
not), and ``--score DIR`` compares: how many of the reader's errors an eye gets right, against the glyphs the reader
gets right (see ``glyph_sheets.py``).

    python bench/synth_errors.py --images /tmp/captcha-default/test/images --seed 1002 \
        --checkpoint core/default_checkpoint/fast.safetensors [--montage misread.png] [--blind DIR]
    python bench/synth_errors.py --score DIR
"""

from __future__ import annotations

import argparse
import collections
import random
from pathlib import Path

from glyph_sheets import add_arguments, score, write_requested
from PIL import Image

from core import synth
from core.charset import CHARS
from core.detector import Detector
from core.evaluate import GAP, align
from core.formats import list_images, read_yolo_labels, text_from_filename
from core.synth import MAX_LENGTH, MIN_LENGTH, _item_seed, _sample_style


def replay_text(seed: int, index: int) -> tuple[str, random.Random]:
    """The text ``captcha-queue synth --seed seed`` drew for image ``index``, and its generator right after."""
    rng = random.Random(_item_seed(seed, index))
    return "".join(rng.choice(CHARS) for _ in range(rng.randint(MIN_LENGTH, MAX_LENGTH))), rng


def style_of(seed: int, index: int) -> tuple[str, object]:
    """The text and style ``captcha-queue synth --seed seed`` drew for image ``index``."""
    text, rng = replay_text(seed, index)
    return text, _sample_style(rng)


def drawn_glyphs(seed: int, index: int) -> list[str]:
    """The characters image ``index`` of ``seed`` was drawn with, in the case each was drawn in."""
    drawn: list[str] = []
    draw = synth._glyph_mask

    def spy(ch, style, rng):
        drawn.append(ch)
        return draw(ch, style, rng)

    text, rng = replay_text(seed, index)
    synth._glyph_mask = spy
    try:
        synth.render_captcha(text, rng)
    finally:
        synth._glyph_mask = draw
    return drawn


def glyph_kind(drawn: str, style) -> str:
    """What kind of glyph a drawn character is, for the split of the reading by glyph."""
    if style.rotation == "wild":
        return "turned by up to 90 degrees"
    if drawn in "Il" and style.case == "mixed":
        return "I or l bar, mixed case"
    if drawn in "O0" and style.case != "lower":
        return "O or 0, upper or mixed case"
    if drawn in "Iil1":
        return "other i, l, 1"
    return "every other glyph"


def size_band(size: int) -> str:
    return "<20 px" if size < 20 else "20-30 px" if size < 30 else ">=30 px"


def true_boxes(paths: list[Path], labels: Path) -> list[list[list[float]]]:
    """Each image's boxes from ``labels/<stem>.txt`` (pixels)."""
    out = []
    for path in paths:
        with Image.open(path) as img:
            width, height = img.size
        out.append(read_yolo_labels(labels / f"{path.stem}.txt", text_from_filename(path), width, height)[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path)
    parser.add_argument("--seed", type=int, help="the --seed the set was drawn with")
    parser.add_argument("--labels", type=Path, default=None, help="default: the labels folder beside --images")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--examples", type=int, default=0, help="print this many wrong images")
    add_arguments(parser)  # the glyphs misread on their true boxes
    args = parser.parse_args()
    if args.score:
        score(args.score)
        return
    if args.images is None or args.seed is None:
        parser.error("--images and --seed are required (unless --score)")

    paths = [p for p in list_images(args.images) if text_from_filename(p)]
    detector = Detector.load(args.checkpoint, device=args.device)
    predictions = detector.predict(paths)
    boxes = true_boxes(paths, args.labels or args.images.parent / "labels")
    oracle = detector.read_boxes(paths, boxes)
    misread, read_right = [], []  # (path, box, truth, read) of each glyph read on its true box
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    confusions: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    wrong = []
    both: collections.Counter = collections.Counter()  # (right, right on the true boxes) -> images
    glyphs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)  # kind -> right, all, a->b
    for path, pred, read, image_boxes in zip(paths, predictions, oracle, boxes):
        truth = text_from_filename(path)
        index = int(path.stem.rsplit("-", 1)[1])
        text, style = style_of(args.seed, index)
        if text != truth:
            raise SystemExit(f"{path.name}: not image {index} of seed {args.seed} (it would read {text!r})")
        right = pred.text.lower() == truth
        kind = "right" if right else "length" if len(pred.text) != len(truth) else "char"
        on_true = read == truth
        keys = {
            "rotation": style.rotation, "case": style.case, "stroke": style.stroke, "font": style.font,
            "tight": str(style.tight), "size": size_band(style.size),
            "width": "condensed" if style.x_scale < 0.88 else "wide" if style.x_scale > 1.1 else "regular",
            "shear": "sheared" if style.shear else "none",
        }
        for name, value in keys.items():
            groups[f"{name}={value}"][kind] += 1
            groups[f"{name}={value}"]["true boxes"] += on_true
            if not right:
                for t, p in align(truth, pred.text.lower()):
                    if t != p:
                        confusions[f"{name}={value}"][f"{t}->{p}"] += 1
        if not right:
            wrong.append((path.name, pred.text, read, style))
        both[right, on_true] += 1
        if len(read) == len(truth):  # read_boxes gives one character per box
            for ch, t, r, box in zip(drawn_glyphs(args.seed, index), truth, read, image_boxes):
                (read_right if t == r else misread).append((path, box, t, r))
                counts = glyphs[glyph_kind(ch, style)]
                counts["all"] += 1
                counts["right"] += t == r
                if t != r:
                    counts[f"{t}->{r}"] += 1

    total = len(paths)
    bad = len(wrong)
    print(f"{total} images, {bad} wrong ({100 * (total - bad) / max(total, 1):.1f}% right); on their true boxes "
          f"{100 * sum(r == t for r, t in zip(oracle, map(text_from_filename, paths))) / max(total, 1):.1f}% right")
    print(f"  wrong on both {both[False, False]}, only with the detector's boxes {both[False, True]}, "
          f"only on the true boxes {both[True, False]}")
    print(f"{'style':<32}{'images':>7}{'right%':>8}{'true boxes%':>12}{'length':>8}{'char':>6}{'of wrong':>10}"
          "  top confusions")
    for key in sorted(groups, key=lambda k: (k.split("=")[0], -groups[k].total())):
        c = groups[key]
        n = c["right"] + c["length"] + c["char"]
        errs = c["length"] + c["char"]
        top = ", ".join(f"{k} {v}" for k, v in confusions[key].most_common(4)).replace(GAP, "_")
        print(f"{key:<32}{n:>7}{100 * c['right'] / n:>8.1f}{100 * c['true boxes'] / n:>12.1f}{c['length']:>8}"
              f"{c['char']:>6}{100 * errs / max(bad, 1):>9.0f}%  {top}")
    n_glyphs = sum(c["all"] for c in glyphs.values())
    need = 0.99 ** (total / max(n_glyphs, 1))
    print(f"by glyph, on the true boxes ({n_glyphs} glyphs; 99% of the images read right needs about "
          f"{100 * need:.2f}% of the glyphs):")
    for kind, c in sorted(glyphs.items(), key=lambda kv: -kv[1]["all"]):
        top = ", ".join(f"{k} {v}" for k, v in c.most_common() if "->" in k)
        print(f"  {kind:<30}{c['all']:>6} glyphs {100 * c['right'] / c['all']:>6.2f}% right, "
              f"{c['all'] - c['right']} wrong  {top[:80]}")
    for name, text, read, style in wrong[: args.examples]:
        print(f"{name} -> {text} (true boxes: {read})", style)
    write_requested(args, misread, read_right)


if __name__ == "__main__":
    main()
