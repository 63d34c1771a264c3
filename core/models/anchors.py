"""Anchor boxes on a single feature level, generated vectorised and cached per feature-map size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def anchor_shapes(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> list[tuple[float, float]]:
    """``(width, height)`` of anchors of area ``size**2`` for every ``size`` and ``aspect_ratio = height / width``."""
    return [(s / r**0.5, s * r**0.5) for s in sizes for r in aspect_ratios]


class AnchorGrid:
    """Anchors centred on every feature-map cell: cell ``(i, j)`` has centre ``((j + 0.5) * stride, (i + 0.5) * stride)``.

    ``shapes`` are anchor ``(width, height)`` pairs in input pixels. ``grid(h, w)`` returns ``Tensor[h * w * A, 4]``
    (x1, y1, x2, y2) ordered row, column, anchor -- the order of a head output ``[B, A * k, h, w]`` permuted to
    ``[B, h, w, A * k]`` and reshaped to ``[B, h * w * A, k]``.
    """

    def __init__(self, shapes: Sequence[tuple[float, float]], stride: int) -> None:
        self.shapes = [(float(w), float(h)) for w, h in shapes]
        self.stride = stride
        self._cache: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}

    @property
    def num_anchors(self) -> int:
        return len(self.shapes)

    def grid(self, height: int, width: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        key = (height, width, torch.device(device), dtype)
        anchors = self._cache.get(key)
        if anchors is None:
            wh = torch.tensor(self.shapes, dtype=dtype, device=device)  # [A, 2]
            half = torch.cat((-wh / 2, wh / 2), dim=1)  # [A, 4]
            ys = (torch.arange(height, dtype=dtype, device=device) + 0.5) * self.stride
            xs = (torch.arange(width, dtype=dtype, device=device) + 0.5) * self.stride
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            centres = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 1, 4)  # [h*w, 1, 4]
            anchors = (centres + half).reshape(-1, 4)
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = anchors
        return anchors
