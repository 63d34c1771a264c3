"""On-disk data layouts: CAPTCHA file names, image folders and YOLO per-character label files.

The labelled layout (the seed's) is an images folder of ``<text>-<n>.png`` and a labels folder holding one
``<same stem>.txt`` per image, one line per character in YOLO form ``class cx cy w h`` (normalised to the image
size); line ``i`` is character ``i`` of the text, and the class column is ignored (the text is the truth).

``text_from_filename``, ``list_images`` and the label readers need no torch. The ``torch.utils.data.Dataset``
classes ``LabelledFolder`` and ``ImageFolder`` are created on first access (``from core.formats import
LabelledFolder``), so importing this module never imports torch.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from core.charset import encode
from core.images import FORMATS, SUPPORTED_SUFFIXES, load_image
from core.paths import is_allowed

log = logging.getLogger(__name__)

_TEXT_RE = re.compile(r"[0-9a-z]+")


class LabelError(ValueError):
    """A sample whose labels cannot be trusted; ``reason`` is a short category used for the skip counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def text_from_filename(name: str | os.PathLike) -> str | None:
    """The text encoded in a CAPTCHA file name: the part before the first ``-``, lowercased.

    ``"03yl9s-0.png" -> "03yl9s"``, ``"0ABc-0(1).png" -> "0abc"``. Returns None when the name has no ``-`` or the
    prefix is not one or more characters of ``0-9a-z`` (case-insensitive). Directories in ``name`` are ignored.
    """
    base = Path(name).name
    prefix, dash, _ = base.partition("-")
    if not dash:
        return None
    text = prefix.lower()  # ASCII first: str.lower() maps a few other letters (the Kelvin sign K) into a-z
    return text if prefix.isascii() and _TEXT_RE.fullmatch(text) else None


def list_images(root: str | os.PathLike, recursive: bool = False, pattern: str | None = None) -> list[Path]:
    """Image files under ``root`` with a supported suffix (case-insensitive), sorted by path.

    ``pattern`` is an optional glob on the file name (``"*-0.png"``). Hidden files are left out.
    Raises ``NotADirectoryError`` when ``root`` is not a folder.
    """
    base = Path(root)
    if not base.is_dir():
        raise NotADirectoryError(f"not a folder: {base}")
    candidates = base.rglob("*") if recursive else base.iterdir()
    found = [
        p
        for p in candidates
        if p.suffix.lower() in SUPPORTED_SUFFIXES
        and not p.name.startswith(".")
        and (pattern is None or fnmatch.fnmatch(p.name, pattern))
        and p.is_file()
    ]
    return sorted(found)


def read_yolo_labels(
    label_file: str | os.PathLike, text: str, width: int, height: int
) -> tuple[list[list[float]], list[int]]:
    """Boxes and class indices of ``text`` from a YOLO label file.

    Returns ``(boxes, labels)``: boxes ``[x1, y1, x2, y2]`` in pixels of a ``width`` x ``height`` image, clipped to
    it, one per character in order; labels from ``text`` (the file's class column is ignored). Blank lines are
    skipped. Raises ``LabelError`` with reason ``"missing label file"``, ``"bad text"``, ``"bad label line"``,
    ``"count mismatch"`` (number of boxes != length of text) or ``"empty box"`` (no area after clipping).
    """
    try:
        labels = encode(text)
    except ValueError as exc:
        raise LabelError("bad text", str(exc)) from None
    if not labels:
        raise LabelError("bad text", "empty text")
    try:
        lines = Path(label_file).read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not a line
    except FileNotFoundError:
        raise LabelError("missing label file", str(label_file)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError("bad label line", f"{label_file}: {exc}") from None
    boxes: list[list[float]] = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 5:
                raise ValueError(f"expected 5 fields, got {len(fields)}")
            cx, cy, bw, bh = (float(v) for v in fields[1:])
        except ValueError as exc:
            raise LabelError("bad label line", f"{label_file}:{number}: {exc}") from None
        x1 = min(max((cx - bw / 2) * width, 0.0), float(width))
        x2 = min(max((cx + bw / 2) * width, 0.0), float(width))
        y1 = min(max((cy - bh / 2) * height, 0.0), float(height))
        y2 = min(max((cy + bh / 2) * height, 0.0), float(height))
        if not (x2 > x1 and y2 > y1):
            raise LabelError("empty box", f"{label_file}:{number}")
        boxes.append([x1, y1, x2, y2])
    if len(boxes) != len(labels):
        raise LabelError("count mismatch", f"{label_file}: {len(boxes)} boxes for {text!r}")
    return boxes, labels


def write_yolo_labels(
    label_file: str | os.PathLike,
    boxes_xyxy_px: Sequence[Sequence[float]],
    width: int,
    height: int,
    classes: Sequence[int] | None = None,
) -> None:
    """Write pixel boxes ``[x1, y1, x2, y2]`` as YOLO lines ``class cx cy w h`` (normalised, 6 decimals).

    ``classes`` fills the class column (0 when not given; readers ignore it).
    """
    if classes is not None and len(classes) != len(boxes_xyxy_px):
        raise ValueError(f"{len(classes)} classes for {len(boxes_xyxy_px)} boxes")
    lines = []
    for i, (x1, y1, x2, y2) in enumerate(boxes_xyxy_px):
        cls = classes[i] if classes is not None else 0
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        bw, bh = (x2 - x1) / width, (y2 - y1) / height
        lines.append(f"{cls} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}\n")
    Path(label_file).write_text("".join(lines), encoding="utf-8")


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels; raises LabelError('unreadable image')."""
    try:
        with Image.open(path, formats=FORMATS) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise LabelError("unreadable image", f"{path}: {exc}") from None


def _warn_skipped(skipped: Counter[str], total: int, where: Path) -> None:
    if skipped:
        summary = ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items()))
        log.warning("skipped %d of %d samples in %s: %s", sum(skipped.values()), total, where, summary)


def _to_tensor(img: Image.Image) -> Any:
    """RGB PIL image -> float Tensor[3, H, W] in [0, 1]."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def shared_stems(paths: Sequence[Path]) -> set[str]:
    """Stems (file names without suffix) that more than one of ``paths`` has, such as ``ab-1.png`` and ``ab-1.jpg``:
    one label file ``<stem>.txt`` cannot say which image it describes."""
    counts = Counter(Path(p).stem for p in paths)
    return {stem for stem, n in counts.items() if n > 1}


class _LabelledFolder:
    """Images with per-character boxes (the seed layout); see ``LabelledFolder``."""

    def __init__(
        self, images_dir: str | os.PathLike, labels_dir: str | os.PathLike, roots: Sequence[Path] = ()
    ) -> None:
        self.images_dir, self.labels_dir = Path(images_dir), Path(labels_dir)
        paths = list_images(self.images_dir)
        skipped: Counter[str] = Counter()
        self._items: list[tuple[Path, str, list[list[float]], list[int]]] = []
        self.widths: list[int] = []
        self.extents: list[tuple[int, int, float, float]] = []  # width, height, glyphs' x1 and x2 (pixels)
        ambiguous = shared_stems(paths)
        for path in paths:
            try:
                if path.stem in ambiguous:
                    raise LabelError("label file shared by several images", path.name)
                text = text_from_filename(path.name)
                if text is None:
                    raise LabelError("bad text", path.name)
                label_file = self.labels_dir / f"{path.stem}.txt"
                if roots and not (is_allowed(path, roots) and is_allowed(label_file, roots)):
                    raise LabelError("outside the allowed roots", path.name)
                width, height = _image_size(path)
                boxes, labels = read_yolo_labels(label_file, text, width, height)
            except LabelError as exc:
                skipped[exc.reason] += 1
                continue
            self._items.append((path, text, boxes, labels))
            self.widths.append(width)
            self.extents.append((width, height, min((b[0] for b in boxes), default=0.0),
                                 max((b[2] for b in boxes), default=float(width))))
        self.skipped: dict[str, int] = dict(skipped)
        _warn_skipped(skipped, len(paths), self.images_dir)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def paths(self) -> list[Path]:
        """The image file of each sample, in index order (without decoding any)."""
        return [item[0] for item in self._items]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"image": Tensor[3,H,W] 0..1, "boxes": Tensor[N,4] x1y1x2y2 px, "labels": Tensor[N] int64, "text",
        "path"}``.

        Raises ``core.images.ImageError`` when the file cannot be decoded.
        """
        import torch

        path, text, boxes, labels = self._items[index]
        return {
            "image": _to_tensor(load_image(path)),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "text": text,
            "path": str(path),
        }


class _ImageFolder:
    """Images only; see ``ImageFolder``."""

    def __init__(self, root: str | os.PathLike, recursive: bool = False, pattern: str | None = None) -> None:
        self.root = Path(root)
        paths = list_images(self.root, recursive=recursive, pattern=pattern)
        skipped: Counter[str] = Counter()
        self._paths: list[Path] = []
        self.widths: list[int] = []
        for path in paths:
            try:
                width, _ = _image_size(path)
            except LabelError as exc:
                skipped[exc.reason] += 1
                continue
            self._paths.append(path)
            self.widths.append(width)
        self.skipped: dict[str, int] = dict(skipped)
        _warn_skipped(skipped, len(paths), self.root)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"image": Tensor[3,H,W] 0..1, "text": str | None (from the file name), "path": str}``."""
        path = self._paths[index]
        return {"image": _to_tensor(load_image(path)), "text": text_from_filename(path.name), "path": str(path)}


_DATASETS = {
    "LabelledFolder": (
        _LabelledFolder,
        """``torch.utils.data.Dataset`` over the seed layout: ``images_dir`` of ``<text>-<n>.png`` and ``labels_dir``
    of YOLO files. Samples whose labels cannot be trusted (missing label file, box count != text length, text
    outside 0-9a-z, bad lines, unreadable header) are skipped, counted in ``.skipped`` (reason -> count) and
    reported in one logged warning. With ``roots`` (resolved folders, as ``core.paths.resolve_roots`` gives), an
    image or label file whose real path (links followed) lies outside them is skipped too. ``.widths`` holds each
    item's width (from the header) for bucketing.""",
    ),
    "ImageFolder": (
        _ImageFolder,
        """``torch.utils.data.Dataset`` over a folder of images (no labels); ``text`` comes from the file name when
    it has one. Files whose header cannot be read are skipped and counted in ``.skipped``; ``.widths`` as above.""",
    ),
}


def __getattr__(name: str) -> type:
    """Create the torch Dataset classes on first access, so that the module imports without torch."""
    if name not in _DATASETS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from torch.utils.data import Dataset

    base, doc = _DATASETS[name]
    cls = type(name, (base, Dataset), {"__module__": __name__, "__qualname__": name, "__doc__": doc})
    globals()[name] = cls
    return cls
