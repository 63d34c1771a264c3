"""Box arithmetic shared by both detectors: pairwise IoU over padded batches, clipping, delta encoding.

All boxes are ``x1, y1, x2, y2`` in pixels of the (transformed) input unless stated otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every box in ``a`` with every box in ``b``, broadcasting leading dimensions.

    a: ``[..., N, 4]``, b: ``[..., G, 4]`` -> ``[..., N, G]``. Degenerate boxes give IoU 0.
    """
    a = a.unsqueeze(-2)
    b = b.unsqueeze(-3)
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    union = area_a + area_b - inter
    return inter / union.clamp(min=1e-6)


def clip_boxes(boxes: Tensor, heights: Tensor, widths: Tensor) -> Tensor:
    """Clip ``boxes [..., 4]`` to ``[0, width] x [0, height]``; heights/widths broadcast against ``boxes[..., 0]``."""
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), widths.unsqueeze(-1))
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), heights.unsqueeze(-1))
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


class BoxCoder:
    """Encodes boxes as deltas ``(dx, dy, dw, dh)`` relative to reference boxes, and back (R-CNN parametrisation).

    ``weights`` scale the four deltas (``(1, 1, 1, 1)`` for the RPN, ``(10, 10, 5, 5)`` for a second stage);
    ``clamp`` caps ``dw, dh`` before ``exp`` (after dividing by the weights).
    """

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 clamp: float = math.log(1000.0 / 16)) -> None:
        self.weights = weights
        self.clamp = clamp

    def encode(self, ref: Tensor, boxes: Tensor) -> Tensor:
        """Deltas ``[..., 4]`` that turn ``ref [..., 4]`` into ``boxes [..., 4]``."""
        wx, wy, ww, wh = self.weights
        rw = ref[..., 2] - ref[..., 0]
        rh = ref[..., 3] - ref[..., 1]
        rx = ref[..., 0] + 0.5 * rw
        ry = ref[..., 1] + 0.5 * rh
        bw = (boxes[..., 2] - boxes[..., 0]).clamp(min=1e-3)
        bh = (boxes[..., 3] - boxes[..., 1]).clamp(min=1e-3)
        bx = boxes[..., 0] + 0.5 * bw
        by = boxes[..., 1] + 0.5 * bh
        return torch.stack(
            (wx * (bx - rx) / rw, wy * (by - ry) / rh, ww * torch.log(bw / rw), wh * torch.log(bh / rh)), dim=-1
        )

    def decode(self, ref: Tensor, deltas: Tensor) -> Tensor:
        """Boxes ``[..., 4]`` from ``ref [..., 4]`` and ``deltas [..., 4]`` (broadcasting)."""
        wx, wy, ww, wh = self.weights
        rw = ref[..., 2] - ref[..., 0]
        rh = ref[..., 3] - ref[..., 1]
        rx = ref[..., 0] + 0.5 * rw
        ry = ref[..., 1] + 0.5 * rh
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.clamp)
        cx = dx * rw + rx
        cy = dy * rh + ry
        w = torch.exp(dw) * rw
        h = torch.exp(dh) * rh
        return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
