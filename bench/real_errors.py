"""Where a checkpoint goes wrong on a folder of ``<text>-<n>.png`` images.

Prints the images read right, with a character too few or too many, and with a wrong character; the commonest
confusions; and, for the ``0``/``o`` pair, each glyph's box height over the median box height of its image (a
lower-case ``o`` is shorter than its neighbours, a capital ``O`` or a ``0`` is not) and, among the glyphs as tall as
their neighbours, box width over height; and the ``0``/``o`` glyphs read right by the case their image is drawn in
(told from the boxes: in an upper-case image the x-height letters are as tall as the digits and the ascenders, in a
lower-case one they are shorter). In upper-case images many fonts draw ``O`` and ``0`` as one shape, and there a
reader can only guess.

    python bench/real_errors.py --images runs/real/val --checkpoint runs/real/reader/fast.safetensors

With ``--labels`` (boxes of the same images, e.g. ``captcha-queue autolabel runs/real/val --out runs/real/val-labels``,
colour only) it also reads every labelled image on those boxes (``Detector.read_boxes``) and splits the errors
between the detector (wrong only with its own boxes) and the reading (wrong on the given boxes too). The glyphs misread
on those boxes can then be looked at (``--montage PNG``) or set as a blind test for the eye among glyphs read right
(``--blind DIR``, then ``--score DIR``), as ``synth_errors.py`` does (see ``glyph_sheets.py``).
"""

from __future__ import annotations

import argparse
import collections
import statistics
from pathlib import Path

from glyph_sheets import add_arguments, score, write_requested
from PIL import Image

from core.detector import Detector
from core.formats import LabelError, list_images, read_yolo_labels, text_from_filename

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
SHORT = set("acemnrsuvwxz")  # x-height letters in lower case ("o" left out: it is what is being judged)
TALL = set("bdfhklt0123456789")  # ascenders and digits: as tall as capitals


def case_of(text: str, boxes: list[tuple[float, float, float, float]]) -> str:
    """``"upper"``, ``"lower"``, ``"unclear"`` (in between) or ``"unknown"`` (no letter of either kind): the case an
    image's letters are drawn in, from the heights of its boxes (one per character of ``text``)."""
    short = [b[3] - b[1] for c, b in zip(text, boxes) if c in SHORT]
    tall = [b[3] - b[1] for c, b in zip(text, boxes) if c in TALL]
    if not short or not tall:
        return "unknown"
    ratio = statistics.median(short) / statistics.median(tall)
    return "upper" if ratio >= 0.9 else "lower" if ratio < 0.8 else "unclear"


def quantiles(values: list[float]) -> list[float]:
    values = sorted(values)
    return [round(values[min(int(len(values) * q), len(values) - 1)], 2) for q in QUANTILES] if values else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--labels", type=Path, default=None, help="boxes of the images (seed layout) to read on")
    add_arguments(parser)  # with --labels: the glyphs misread on those boxes
    args = parser.parse_args()
    if args.score:
        score(args.score)
        return
    if args.images is None:
        parser.error("--images is required (unless --score)")
    if (args.montage or args.blind) and args.labels is None:
        parser.error("--montage and --blind need --labels (the boxes the glyphs are read on)")

    paths = [p for p in list_images(args.images) if text_from_filename(p)]
    detector = Detector.load(args.checkpoint, device=args.device)
    predictions = detector.predict(paths)
    outcome = collections.Counter()
    confusions = collections.Counter()
    height = collections.defaultdict(list)  # (true char, read right) -> box height / the image's median height
    aspect = collections.defaultdict(list)  # the same, glyphs over 0.95 of the median height: width / height
    by_case = collections.defaultdict(collections.Counter)  # image case -> 0/o glyphs: read right, all
    for path, prediction in zip(paths, predictions):
        text = text_from_filename(path).lower()
        read = prediction.text
        outcome["right" if read == text else "short" if len(read) < len(text) else
                "long" if len(read) > len(text) else "wrong character"] += 1  # fmt: skip
        if len(read) != len(text):
            continue
        median = statistics.median(c.box[3] - c.box[1] for c in prediction.chars)
        case = case_of(text, [c.box for c in prediction.chars])
        for truth, char in zip(text, prediction.chars):
            if truth != char.char:
                confusions[(truth, char.char)] += 1
            if truth in "0o":
                by_case[case]["all"] += 1
                by_case[case]["right"] += truth == char.char
                h, w = char.box[3] - char.box[1], char.box[2] - char.box[0]
                height[(truth, truth == char.char)].append(h / median)
                if h / median > 0.95:
                    aspect[(truth, truth == char.char)].append(w / h)
    print(f"{len(paths)} images: " + ", ".join(f"{k} {v}" for k, v in outcome.most_common()))
    print("confusions (true -> read), images read at the right length:",
          ", ".join(f"{a}->{b} {n}" for (a, b), n in confusions.most_common(15)))
    print(f"0/o, quantiles {QUANTILES}:")
    for key in sorted(height):
        label = f"'{key[0]}' read {'right' if key[1] else 'wrong'}"
        print(f"  {label}: {len(height[key])} glyphs, height / median {quantiles(height[key])}; "
              f"{len(aspect[key])} as tall as their neighbours, width / height {quantiles(aspect[key])}")
    print("0/o glyphs read right, by the case of their image:", "; ".join(
        f"{case} {n['right']} of {n['all']} ({100 * n['right'] / n['all']:.0f}%)"
        for case, n in sorted(by_case.items()) if n["all"]))

    if args.labels is not None:
        misread, read_right = given_boxes(detector, paths, predictions, args.labels)
        write_requested(args, misread, read_right)


def given_boxes(detector: Detector, paths: list[Path], predictions: list, labels: Path) -> tuple[list, list]:
    """Read the images that have a label file on its boxes; print how the errors split.

    Returns the glyphs misread and read right on those boxes, each ``(path, box, truth, read)``.
    """
    kept, boxes = [], []
    for path in paths:
        with Image.open(path) as img:
            width, height = img.size
        try:
            boxes.append(read_yolo_labels(labels / f"{path.stem}.txt", text_from_filename(path), width, height)[0])
        except LabelError:
            continue
        kept.append(path)
    read = dict(zip(kept, detector.read_boxes(kept, boxes)))
    boxes_of = dict(zip(kept, boxes))
    both = collections.Counter()
    confusions = collections.Counter()
    misread, read_right = [], []
    for path, prediction in zip(paths, predictions):
        if path in read:
            text = text_from_filename(path).lower()
            both[prediction.text == text, read[path] == text] += 1
            confusions.update((a, b) for a, b in zip(text, read[path]) if a != b)
            if len(read[path]) == len(text):  # one character per box
                for t, r, box in zip(text, read[path], boxes_of[path]):
                    (read_right if t == r else misread).append((path, box, t, r))
    n = len(kept)
    print(f"on the given boxes ({n} of {len(paths)} images have them): read right {both[True, True] + both[False, True]}"
          f" ({100 * (both[True, True] + both[False, True]) / max(n, 1):.1f}%), with the detector's own boxes "
          f"{both[True, True] + both[True, False]} ({100 * (both[True, True] + both[True, False]) / max(n, 1):.1f}%); "
          f"wrong both ways {both[False, False]}, only with the detector's boxes {both[False, True]}, only on the "
          f"given boxes {both[True, False]}")
    print("confusions on the given boxes (true -> read):",
          ", ".join(f"{a}->{b} {k}" for (a, b), k in confusions.most_common(15)))
    return misread, read_right


if __name__ == "__main__":
    main()
