"""Per-character boxes for CAPTCHAs whose only label is their text (``<text>-<n>.png``), in the seed layout.

Two labellers, both checked against the known text; an image gets a label file only when one of them accounts for
exactly ``len(text)`` characters:

* ``colour_boxes`` (no model, ``core.segment``): in this family every glyph has its own flat colour on white, crossed
  by thin black lines; the segmentation must find exactly as many glyphs as the text has characters.
* ``match_text`` (a trained detector): the detections, left to right, must contain the text as a subsequence; the
  best-scoring such subsequence gives the boxes, and any detection left over must be a weak or overlapping duplicate.

``autolabel`` runs the colour labeller on every image (in worker processes) and, given a checkpoint, the detector on
the images that are still unlabelled; retraining on the result and labelling again with the new checkpoint labels
more of them. Label files are ``class cx cy w h`` lines in text order (``core.formats.write_yolo_labels``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from core.charset import encode
from core.formats import list_images, shared_stems, text_from_filename, write_yolo_labels
from core.images import FORMATS, SUPPORTED_SUFFIXES, ImageError, load_image
from core.segment import Box, colour_boxes

if TYPE_CHECKING:
    from core.detector import Prediction

log = logging.getLogger(__name__)


def _overlaps(a: Box, b: Box, iou: float = 0.3) -> bool:
    """IoU of ``a`` and ``b`` at least ``iou``, or the centre of ``a`` inside ``b`` horizontally."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return (union > 0 and inter / union >= iou) or b[0] <= (a[0] + a[2]) / 2 <= b[2]


def match_text(prediction: Prediction, text: str) -> tuple[list[Box], list[float]] | None:
    """Boxes and scores of ``text`` read from a detector's ``prediction`` (characters left to right), or None.

    The text must appear in the detected characters as a subsequence; the subsequence with the highest total score
    wins. Every detection it leaves out must duplicate a kept one (IoU >= 0.3, or its centre inside a kept box's
    horizontal extent), otherwise the reading is not trusted and None is returned.
    """
    chars = prediction.chars
    n, k = len(text), len(chars)
    if k < n or n == 0:
        return None
    neg = float("-inf")
    # best[i][j]: highest score matching text[:j] with chars[:i]
    best = [[neg] * (n + 1) for _ in range(k + 1)]
    for i in range(k + 1):
        best[i][0] = 0.0
    for i in range(1, k + 1):
        c = chars[i - 1]
        for j in range(1, n + 1):
            skip = best[i - 1][j]
            take = best[i - 1][j - 1] + c.score if c.char == text[j - 1] and best[i - 1][j - 1] > neg else neg
            best[i][j] = max(skip, take)
    if best[k][n] == neg:
        return None
    kept: list[int] = []
    i, j = k, n
    while j > 0:
        c = chars[i - 1]
        if c.char == text[j - 1] and best[i - 1][j - 1] > neg and best[i][j] == best[i - 1][j - 1] + c.score:
            kept.append(i - 1)
            j -= 1
        i -= 1
    kept.reverse()
    boxes = [chars[i].box for i in kept]
    for i in set(range(k)) - set(kept):
        if not any(_overlaps(chars[i].box, box) for box in boxes):
            return None
    return boxes, [chars[i].score for i in kept]


@dataclass
class Label:
    """An image's character boxes (text order), their scores and the labeller that found them."""

    path: str
    text: str
    boxes: list[Box]
    scores: list[float]
    source: str  # "colour" | "detector"


SHARED_STEM = "another image has the same name stem"


@dataclass
class AutolabelReport:
    """What ``autolabel`` did: images seen, labels written per source, images left unlabelled per reason."""

    images: int
    labels: list[Label] = field(default_factory=list)
    unlabelled: Counter = field(default_factory=Counter)  # reason -> count
    seconds: float = 0.0

    @property
    def labelled(self) -> dict[str, int]:
        return dict(Counter(label.source for label in self.labels))

    @property
    def share(self) -> float:
        return len(self.labels) / self.images if self.images else 0.0

    def as_dict(self) -> dict:
        return {
            "images": self.images,
            "labelled": len(self.labels),
            "share": self.share,
            "by_source": self.labelled,
            "unlabelled": dict(self.unlabelled),
            "seconds": self.seconds,
        }


def _colour_label(path: Path) -> tuple[str, list[Box] | None, str | None]:
    """Colour labeller for one file: (path, boxes or None, reason when None). Runs in worker processes."""
    text = text_from_filename(path.name)
    if text is None:
        return str(path), None, "no text in file name"
    try:
        image = load_image(path)
    except ImageError:
        return str(path), None, "unreadable image"
    boxes = colour_boxes(image, len(text))
    return str(path), boxes, None if boxes is not None else "colour count mismatch"


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def autolabel(
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    colour: bool = True,
    workers: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    on_progress: Callable[[str, int, int], None] | None = None,
) -> AutolabelReport:
    """Write ``out_dir/<stem>.txt`` for every image of ``images_dir`` that a labeller reads as its file-name text.

    The colour labeller runs first (``workers`` processes, default: CPU cores); with ``checkpoint`` the detector
    then reads the images still unlabelled. A stale label file of an image left unlabelled is removed, so the folder
    holds exactly this run's labels for these images. ``on_progress(stage, done, total)`` reports each stage.
    """
    import time

    if not colour and checkpoint is None:
        raise ValueError("nothing to label with: without the colour labeller a checkpoint is needed")
    start = time.perf_counter()
    paths = list_images(images_dir)
    if not paths:
        raise ValueError(f"no image files in {images_dir} ({', '.join(SUPPORTED_SUFFIXES)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = AutolabelReport(images=len(paths))
    progress = on_progress or (lambda stage, done, total: None)
    pending: dict[str, str] = {}  # path -> reason it is still unlabelled
    ambiguous = shared_stems(paths)  # ab-1.png and ab-1.jpg would share ab-1.txt: neither is labelled
    pending.update((str(p), SHARED_STEM) for p in paths if p.stem in ambiguous)
    paths = [p for p in paths if p.stem not in ambiguous]

    if colour:
        workers = workers or os.cpu_count() or 1
        results: Iterable[tuple[str, list[Box] | None, str | None]]
        if workers > 1:
            pool = ProcessPoolExecutor(workers)
            results = pool.map(_colour_label, paths, chunksize=64)
        else:
            pool = None
            results = map(_colour_label, paths)
        try:
            for done, (path, boxes, reason) in enumerate(results, start=1):
                if boxes is not None:
                    text = text_from_filename(Path(path).name) or ""
                    report.labels.append(Label(path, text, boxes, [1.0] * len(boxes), "colour"))
                else:
                    pending[path] = reason or ""
                if done % 256 == 0 or done == len(paths):
                    progress("colour", done, len(paths))
        finally:
            if pool is not None:
                pool.shutdown()
    else:
        for path in paths:
            text = text_from_filename(path.name)
            pending[str(path)] = "no text in file name" if text is None else "not read"

    if checkpoint is not None:
        from core.detector import Detector

        detector = Detector.load(checkpoint, device=device)
        todo = [p for p, reason in pending.items() if reason not in ("no text in file name", "unreadable image",
                                                                      SHARED_STEM)]
        done = 0
        for chunk in _chunks(todo, batch_size * 8):
            images, kept = [], []
            for path in chunk:
                try:
                    images.append(load_image(path))
                    kept.append(path)
                except ImageError:
                    pending[path] = "unreadable image"
            for path, prediction in zip(kept, detector.predict(images, batch_size=batch_size)):
                text = text_from_filename(Path(path).name) or ""
                found = match_text(prediction, text)
                if found is None:
                    pending[path] = "detector does not read the text"
                    continue
                report.labels.append(Label(path, text, found[0], found[1], "detector"))
                del pending[path]
            done += len(chunk)
            progress("detector", done, len(todo))

    for label in report.labels:
        with Image.open(label.path, formats=FORMATS) as img:
            width, height = img.size
        write_yolo_labels(out / f"{Path(label.path).stem}.txt", label.boxes, width, height, encode(label.text))
    for path in pending:
        (out / f"{Path(path).stem}.txt").unlink(missing_ok=True)
    report.unlabelled = Counter(pending.values())
    report.labels.sort(key=lambda label: label.path)
    report.seconds = time.perf_counter() - start
    return report


def render_labels(labels: Sequence[Label], out_dir: str | os.PathLike, count: int = 12) -> list[Path]:
    """Draw ``count`` labels, spread evenly over each source, as ``core.render`` pictures in ``out_dir``
    (``<source>-<stem>.png``; a box's score is 1.0 for colour labels, the detection score otherwise)."""
    from core.render import render_file

    by_source: dict[str, list[Label]] = {}
    for label in labels:
        by_source.setdefault(label.source, []).append(label)
    share = max(1, count // max(1, len(by_source)))
    written: list[Path] = []
    for source, group in sorted(by_source.items()):
        step = max(1, len(group) // share)
        for label in group[::step][:share]:
            row = {
                "text": label.text,
                "score": sum(label.scores) / len(label.scores),
                "chars": [{"char": c, "box": b, "score": s} for c, b, s in zip(label.text, label.boxes, label.scores)],
            }
            written.append(render_file(label.path, Path(out_dir) / f"{source}-{Path(label.path).stem}.png", row))
    return written
