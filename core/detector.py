"""The inference API: a loaded checkpoint that turns images into strings with per-character boxes.

``Detector.load()`` reads a checkpoint (default: ``Settings.checkpoint`` or the shipped one) and ``predict()`` runs
it on PIL images or paths in batches grouped by aspect ratio (the network rescales every image to one height, so
images of a similar aspect ratio share a batch and padding stays small; a network that keeps the images' size,
like ``seed``, batches by size),
returning one ``Prediction`` per input, in input order. Paths are read ``Detector.window`` at a time, so a long list
of paths never sits in memory as decoded images all at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.charset import CHARS
from core.checkpoint import checkpoint_version, default_checkpoint_path, load_checkpoint
from core.images import load_image, to_rgb
from core.precision import autocast, resolve_precision


@dataclass(frozen=True)
class Char:
    """One detected character: its position in the string, the character, its box (x1, y1, x2, y2 in pixels)."""

    index: int
    char: str
    box: tuple[float, float, float, float]
    score: float


@dataclass(frozen=True)
class Prediction:
    """A decoded image: the string, its characters left to right, and the mean character score (0.0 if none)."""

    text: str
    chars: tuple[Char, ...]
    score: float


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as given (CUDA is touched only here).

    Raises ``ValueError`` for a device that is not ``cpu`` or ``cuda[:N]``, or a CUDA device PyTorch does not see.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}: expected auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index or 0) >= count:
            raise ValueError(f"device {str(device)!r}: PyTorch sees {count} CUDA device(s) here")
    elif resolved.type != "cpu":
        raise ValueError(f"device {str(device)!r}: expected auto, cpu, cuda or cuda:N")
    return resolved


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (any mode; RGBA composited on white) -> RGB float Tensor[3, H, W] in [0, 1]."""
    return _array_to_tensor(_rgb_array(img))


def _rgb_array(img: Image.Image) -> np.ndarray:
    return np.asarray(to_rgb(img), dtype=np.uint8)


def _array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def aspect(image: torch.Tensor) -> tuple[float, int]:
    """Sort key of a Tensor[3, H, W] image for batching by a network that rescales every image to one height
    (``fast``): width over height first (images of one aspect ratio are padded least together), then width."""
    return image.shape[-1] / max(1, image.shape[-2]), image.shape[-1]


def size(image: torch.Tensor) -> tuple[int, int]:
    """Sort key of a Tensor[3, H, W] image for batching by a network that keeps its size (``seed``): width, height."""
    return image.shape[-1], image.shape[-2]


def batch_key(model: torch.nn.Module) -> Callable[[torch.Tensor], tuple]:
    """How ``model``'s inputs are best grouped into batches: by aspect ratio where it rescales them to one height
    (``input_height`` in its config), else by size."""
    return aspect if getattr(model, "config", {}).get("input_height") else size


def detect(
    model: torch.nn.Module,
    images: Sequence[torch.Tensor],
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> list[dict[str, torch.Tensor]]:
    """Run an eval-mode detector on Tensor[3, H_i, W_i] images grouped by aspect ratio; detections (on CPU) in input
    order.

    ``precision``: ``"fp32"``, ``"bf16"`` (autocast of the heavy layers, see ``core.precision``) or ``"auto"``.
    Each detection is ``{"boxes": Tensor[K, 4] x1y1x2y2 px, "labels": Tensor[K] int64, "scores": Tensor[K]}``
    sorted left to right, as the model returns them.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    key = batch_key(model)
    order = sorted(range(len(images)), key=lambda i: key(images[i]))
    out: list[dict[str, torch.Tensor] | None] = [None] * len(images)
    precision = resolve_precision(precision, device)
    with torch.inference_mode(), autocast(precision, device):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            dets = model([images[i].to(device) for i in chunk])
            for i, det in zip(chunk, dets):
                out[i] = {k: v.detach().to("cpu") for k, v in det.items()}
    return out  # type: ignore[return-value]


def prediction_from_detections(det: dict[str, torch.Tensor]) -> Prediction:
    """The ``Prediction`` for one detection dict (characters in the model's left-to-right order)."""
    chars = tuple(
        Char(index=i, char=CHARS[int(label)], box=tuple(float(v) for v in box), score=float(score))
        for i, (box, label, score) in enumerate(zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist()))
    )
    score = sum(c.score for c in chars) / len(chars) if chars else 0.0
    return Prediction(text="".join(c.char for c in chars), chars=chars, score=score)


def _prediction_from_probs(boxes: Sequence[Sequence[float]], probs: torch.Tensor) -> Prediction:
    """The ``Prediction`` for given boxes (left to right) read with class probabilities ``probs [N, num_classes]``."""
    top, labels = probs.max(dim=1)
    chars = tuple(Char(index=k, char=CHARS[int(label)], box=tuple(float(v) for v in box), score=float(score))
                  for k, (box, label, score) in enumerate(zip(boxes, labels.tolist(), top.tolist())))
    score = float(top.mean()) if len(chars) else 0.0
    return Prediction(text="".join(c.char for c in chars), chars=chars, score=score)


def box_source(model: torch.nn.Module) -> str:
    """Where ``model``'s characters' boxes come from when it decodes (a decode setting, see ``Detector.predict``)."""
    return model.config.get("box_source", "detector")


def both_gate(model: torch.nn.Module) -> float:
    """With ``box_source`` ``"both"``: the colour reading's least sure character probability under which the
    detector reads the image as well (see ``Detector.predict``)."""
    return float(model.config.get("both_gate", 1.0))


def decode_arrays(model: torch.nn.Module, arrays: Sequence[np.ndarray], batch_size: int = 32,
                  device: torch.device | str = "cpu", precision: str = "fp32",
                  tensors: Sequence[torch.Tensor] | None = None) -> list[Prediction]:
    """What ``Detector.predict`` returns, for RGB uint8 arrays ``[H, W, 3]`` and an eval-mode ``model``: its
    ``box_source`` applied (colour segmentation read by the network, its own detections, or both). The one decoding
    path of inference, evaluation and validation during training. ``tensors``: the same images as float
    ``Tensor[3, H, W]`` in [0, 1] where the caller has them already (made from ``arrays`` otherwise)."""
    precision = resolve_precision(precision, device)
    if tensors is None:
        tensors = [_array_to_tensor(a) for a in arrays]
    source = box_source(model)
    segments: dict[int, list] = {}
    if source in ("colour", "both"):
        from core.segment import colour_segments

        limit = int(model.config.get("detections_per_img", 100))
        segments = {i: boxes for i, a in enumerate(arrays) if 0 < len(boxes := colour_segments(a)) <= limit}
    coloured = list(segments)
    probs = read_probs(model, [tensors[i] for i in coloured], [segments[i] for i in coloured], batch_size, device,
                       precision)
    by_colour = {i: _prediction_from_probs(segments[i], p) for i, p in zip(coloured, probs)}
    gate = both_gate(model) if source == "both" else 0.0  # "colour" detects only where nothing was segmented
    detected = [i for i in range(len(arrays))
                if i not in by_colour or gate >= 1.0 or min(c.score for c in by_colour[i].chars) < gate]
    dets = detect(model, [tensors[i] for i in detected], batch_size, device, precision)
    predictions: list[Prediction | None] = [None] * len(arrays)
    for i, d in zip(detected, dets):
        predictions[i] = prediction_from_detections(d)
    for i, colour in by_colour.items():
        own = predictions[i]
        if own is None or len(colour.chars) == len(own.chars) or colour.score >= own.score:
            predictions[i] = colour
    return predictions  # type: ignore[return-value]


def read_probs(model: torch.nn.Module, tensors: Sequence[torch.Tensor], boxes: Sequence[Sequence[Sequence[float]]],
               batch_size: int = 32, device: torch.device | str = "cpu",
               precision: str = "fp32") -> list[torch.Tensor]:
    """Class probabilities ``[N_i, num_classes]`` (float32, CPU) of ``model`` reading ``boxes[i]`` (pixels) of
    ``tensors[i]``, in batches grouped by aspect ratio; input order."""
    key = batch_key(model)
    order = sorted(range(len(tensors)), key=lambda i: key(tensors[i]))
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        given = [torch.as_tensor(boxes[i], dtype=torch.float32, device=device).reshape(-1, 4) for i in chunk]
        with torch.inference_mode(), autocast(precision, device):
            logits = model.read_boxes([tensors[i].to(device) for i in chunk], given)
        for i, x in zip(chunk, logits):
            out[i] = x.float().softmax(dim=1).cpu()
    return out  # type: ignore[return-value]


def _loaded(img: Image.Image | str | os.PathLike) -> Image.Image:
    """A PIL image as given, a path read with ``core.images.load_image`` (``ImageError`` when unreadable)."""
    return img if isinstance(img, Image.Image) else load_image(img)


def _windows(items: Sequence, size: int) -> list[Sequence]:
    """``items`` in consecutive slices of at most ``size``."""
    if size < 1:
        raise ValueError(f"window must be at least 1, got {size}")
    return [items[start : start + size] for start in range(0, len(items), size)]


class Detector:
    """A checkpoint loaded for inference. Build with ``Detector.load``.

    ``window``: how many of the images given to ``predict`` or ``read_boxes`` are decoded and held at once; batches
    are grouped by aspect ratio within each window.
    """

    window: int = 1024

    def __init__(self, model: torch.nn.Module, checkpoint_path: Path, metadata: dict, device: torch.device,
                 precision: str = "auto") -> None:
        self.model = model.to(device).eval()
        self.checkpoint_path = checkpoint_path
        self.metadata = metadata
        self.device = device
        self.precision = resolve_precision(precision, device)  # "fp32" | "bf16"
        self.version: str = checkpoint_version(metadata, checkpoint_path)

    @classmethod
    def load(cls, checkpoint: str | os.PathLike | None = None, device: str = "auto",
             precision: str | None = None) -> Detector:
        """Load ``checkpoint`` (None -> ``Settings.checkpoint`` or the shipped default) on ``device``, to run in
        ``precision`` (None -> ``Settings.precision``; see ``core.precision``)."""
        from core.config import get_settings

        if checkpoint is None:
            checkpoint = get_settings().checkpoint or default_checkpoint_path()
        if precision is None:
            precision = get_settings().precision
        path = Path(checkpoint).expanduser().resolve()
        dev = resolve_device(device)
        model, meta = load_checkpoint(path, device=dev)
        return cls(model, path, meta, dev, precision)

    @property
    def box_source(self) -> str:
        """Where the characters' boxes come from: ``"detector"``, ``"colour"`` or ``"both"`` (see ``predict``); a
        decode setting of the checkpoint (``model_config["box_source"]``)."""
        return box_source(self.model)

    @property
    def both_gate(self) -> float:
        """With ``box_source`` ``"both"``: the detector reads an image as well only where the colour reading's least
        sure character has a probability below this (1.0, the default: every image)."""
        return both_gate(self.model)

    def predict(self, images: Sequence[Image.Image | str | os.PathLike], batch_size: int = 32) -> list[Prediction]:
        """Decode ``images`` (PIL images or paths); one ``Prediction`` per input, same order.

        Paths are read with ``core.images.load_image``, ``window`` at a time; an unreadable one raises ``ImageError``
        (callers that need a per-image failure load the images themselves and pass PIL images).

        ``box_source`` (a decode setting of the checkpoint) says where the characters' boxes come from, for
        CAPTCHAs that give every character its own colour and networks trained on labels from the same segmentation
        (``autolabel``): ``"detector"``, the network's own detections; ``"colour"``, the glyphs found by colour
        segmentation (``core.segment.colour_segments``) read by the network (``read_boxes``), the detector only for
        images where the segmentation finds nothing (or more than ``detections_per_img``); ``"both"``, each image
        read both ways, the colour reading kept where the two find as many characters or where its mean character
        probability is at least the detections' mean score; with ``both_gate`` below 1, the detector reads only the
        images whose colour reading has a character below that probability (the others keep the colour reading).
        Characters read on colour boxes score their class probability.
        """
        return [p for part in _windows(images, self.window) for p in self._predict(part, batch_size)]

    def _predict(self, images: Sequence[Image.Image | str | os.PathLike], batch_size: int) -> list[Prediction]:
        """``predict`` on images that are all decoded at once."""
        arrays = [_rgb_array(_loaded(img)) for img in images]
        return decode_arrays(self.model, arrays, batch_size, self.device, self.precision)

    def read_boxes(self, images: Sequence[Image.Image | str | os.PathLike],
                   boxes: Sequence[Sequence[Sequence[float]]], batch_size: int = 32) -> list[str]:
        """The text the network reads from given character boxes instead of its own detections: one box list per
        image (``[x1, y1, x2, y2]`` in its pixels, in reading order), one string per image, a character per box.
        With the true boxes this is what a perfect detector would leave to the reading (the glyph reader and the
        context head), so comparing it with ``predict`` splits the errors between finding and naming. Only networks
        that can read given boxes (``fast``) can; others raise ``ValueError``."""
        if not hasattr(self.model, "read_boxes"):
            raise ValueError(f"the {self.metadata.get('arch', 'loaded')} network cannot read given boxes")
        if len(boxes) != len(images):
            raise ValueError(f"got {len(boxes)} box lists for {len(images)} images")
        texts = []
        for part, part_boxes in zip(_windows(images, self.window), _windows(boxes, self.window)):
            tensors = [image_to_tensor(_loaded(img)) for img in part]
            texts += ["".join(CHARS[int(k)] for k in p.argmax(dim=1))
                      for p in read_probs(self.model, tensors, part_boxes, batch_size, self.device, self.precision)]
        return texts

    def __repr__(self) -> str:
        return f"Detector(version={self.version!r}, checkpoint={str(self.checkpoint_path)!r}, device={str(self.device)!r}, precision={self.precision!r})"
