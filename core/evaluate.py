"""Accuracy of a detector on a folder of images whose file names carry the truth (``03yl9s-0.png`` -> ``03yl9s``).

Sequence accuracy: the whole string right (case-insensitive). Character accuracy: the mean over images of
``max(0, 1 - edit_distance(prediction, truth) / len(truth))``. Images without a text in their name are decoded (and
counted in the throughput) but left out of the accuracies; unreadable images are reported, not scored.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.detector import Detector

GAP = "∅"  # stands for a missing or extra character in confusions


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each costing 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def character_accuracy(prediction: str, truth: str) -> float:
    """``max(0, 1 - edit_distance / len(truth))``, case-insensitive (1.0 for two empty strings)."""
    prediction, truth = prediction.lower(), truth.lower()
    if not truth:
        return 1.0 if not prediction else 0.0
    return max(0.0, 1.0 - edit_distance(prediction, truth) / len(truth))


def align(truth: str, prediction: str) -> list[tuple[str, str]]:
    """A minimal-edit alignment as ``(truth_char, predicted_char)`` pairs; ``GAP`` marks a missing side."""
    n, m = len(truth), len(prediction)
    d = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        d[i][0] = i
    for j in range(m + 1):
        d[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (truth[i - 1] != prediction[j - 1]))
    pairs: list[tuple[str, str]] = []
    i, j = n, m
    while i or j:
        if i and j and d[i][j] == d[i - 1][j - 1] + (truth[i - 1] != prediction[j - 1]):
            pairs.append((truth[i - 1], prediction[j - 1]))
            i, j = i - 1, j - 1
        elif i and d[i][j] == d[i - 1][j] + 1:
            pairs.append((truth[i - 1], GAP))
            i -= 1
        else:
            pairs.append((GAP, prediction[j - 1]))
            j -= 1
    return pairs[::-1]


@dataclass
class Scores:
    """Accuracy over the images that have a truth."""

    scored: int
    sequence_accuracy: float
    character_accuracy: float
    confusions: Counter = field(default_factory=Counter)  # (truth_char, predicted_char) -> count, mistakes only


def score(predictions: Sequence[str], truths: Sequence[str | None]) -> Scores:
    """Sequence and character accuracy of ``predictions`` against ``truths`` (``None`` truths are skipped)."""
    pairs = [(p.lower(), t.lower()) for p, t in zip(predictions, truths, strict=True) if t is not None]
    confusions: Counter = Counter()
    for p, t in pairs:
        if p != t:
            confusions.update((a, b) for a, b in align(t, p) if a != b)
    if not pairs:
        return Scores(0, 0.0, 0.0, confusions)
    return Scores(
        scored=len(pairs),
        sequence_accuracy=sum(p == t for p, t in pairs) / len(pairs),
        character_accuracy=sum(character_accuracy(p, t) for p, t in pairs) / len(pairs),
        confusions=confusions,
    )


@dataclass
class EvalReport:
    """What ``evaluate`` measured. ``images`` counts decoded images; ``scored`` those with a truth."""

    images: int
    scored: int
    sequence_accuracy: float
    character_accuracy: float
    images_per_second: float
    seconds: float
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> reason
    confusions: Counter = field(default_factory=Counter)
    mistakes: list[tuple[str, str, str]] = field(default_factory=list)  # (path, truth, prediction)

    def as_dict(self, top_confusions: int = 10) -> dict:
        """JSON-able summary (the most frequent confusions as ``[truth, predicted, count]``)."""
        return {
            "images": self.images,
            "scored": self.scored,
            "sequence_accuracy": self.sequence_accuracy,
            "character_accuracy": self.character_accuracy,
            "images_per_second": self.images_per_second,
            "seconds": self.seconds,
            "unreadable": len(self.unreadable),
            "top_confusions": [[a, b, n] for (a, b), n in self.confusions.most_common(top_confusions)],
        }


def evaluate(
    detector: Detector,
    images_dir: str | os.PathLike,
    batch_size: int = 32,
    limit: int | None = None,
    recursive: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Decode every image in ``images_dir`` (sorted; the first ``limit``) and score it against its file name.

    Images are read in chunks of ``batch_size * 8`` so memory stays bounded; ``on_progress(done, total)`` is called
    after each chunk. Throughput covers reading and decoding.
    """
    from core.formats import list_images, text_from_filename
    from core.images import ImageError, load_image

    files = list_images(images_dir, recursive=recursive)
    if limit is not None:
        files = files[:limit]
    unreadable: dict[str, str] = {}
    predictions: list[str] = []
    truths: list[str | None] = []
    names: list[str] = []
    chunk = max(1, batch_size * 8)
    start = time.perf_counter()
    for offset in range(0, len(files), chunk):
        images, kept = [], []
        for f in files[offset : offset + chunk]:
            try:
                images.append(load_image(f))
                kept.append(f)
            except ImageError as exc:
                unreadable[str(f)] = str(exc)
        for f, pred in zip(kept, detector.predict(images, batch_size=batch_size)):
            predictions.append(pred.text)
            truths.append(text_from_filename(Path(f).name))
            names.append(str(f))
        if on_progress is not None:
            on_progress(min(offset + chunk, len(files)), len(files))
    seconds = time.perf_counter() - start
    s = score(predictions, truths)
    mistakes = [(n, t, p) for n, t, p in zip(names, truths, predictions) if t is not None and p.lower() != t]
    return EvalReport(
        images=len(predictions),
        scored=s.scored,
        sequence_accuracy=s.sequence_accuracy,
        character_accuracy=s.character_accuracy,
        images_per_second=len(predictions) / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        unreadable=unreadable,
        confusions=s.confusions,
        mistakes=mistakes,
    )
