"""Batched matching of anchors/proposals to ground truth, and balanced positive/negative sampling.

Ground truth of a batch is padded to ``[B, G, ...]`` with a validity mask, so IoU, matching and sampling run as a
few tensor ops over the whole batch instead of a Python loop per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1


def pad_targets(targets: Sequence[dict[str, Tensor]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-image targets into ``boxes [B, G, 4]``, ``labels [B, G]`` (int64) and ``valid [B, G]`` (bool).

    ``G = max(1, largest box count)``; padding rows are zero boxes with ``valid = False``.
    """
    g = max([1] + [int(t["boxes"].shape[0]) for t in targets])
    b = len(targets)
    boxes = torch.zeros(b, g, 4, device=device)
    labels = torch.zeros(b, g, dtype=torch.int64, device=device)
    valid = torch.zeros(b, g, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = int(t["boxes"].shape[0])
        if n:
            boxes[i, :n] = t["boxes"]
            labels[i, :n] = t["labels"]
            valid[i, :n] = True
    return boxes, labels, valid


def match(iou: Tensor, valid: Tensor, high: float, low: float,
          allow_low_quality: bool = False) -> tuple[Tensor, Tensor]:
    """Label each row (anchor/proposal) against the ground-truth columns of ``iou [..., N, G]``.

    valid: ``[..., G]`` (broadcast over N). Returns ``labels [..., N]`` (1 positive: best IoU >= high, 0 negative:
    best IoU < low, -1 ignored in between) and ``matched [..., N]``, the index of the best ground truth.
    allow_low_quality: also make positive the rows that are the best match of some ground truth (ties included).
    Rows with no valid ground truth are negative.
    """
    iou = iou.masked_fill(~valid.unsqueeze(-2), -1.0)
    best, matched = iou.max(dim=-1)
    labels = torch.full_like(matched, IGNORE)
    labels[best < low] = NEGATIVE
    labels[best >= high] = POSITIVE
    if allow_low_quality:
        best_per_gt = iou.max(dim=-2, keepdim=True).values  # [..., 1, G]
        is_best = (iou == best_per_gt) & (best_per_gt > 0) & valid.unsqueeze(-2)
        labels[is_best.any(dim=-1)] = POSITIVE
    return labels, matched


def sample(labels: Tensor, per_image: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Random balanced sampling per image: at most ``per_image * positive_fraction`` positives, filled up to
    ``per_image`` with negatives.

    labels: ``[B, N]`` with 1 (positive), 0 (negative), -1 (ignored or padding). Returns ``(positive, negative)``
    boolean masks ``[B, N]``.
    """
    b, n = labels.shape
    pos, neg = labels == POSITIVE, labels == NEGATIVE
    n_pos = pos.sum(dim=1).clamp(max=int(per_image * positive_fraction))
    n_neg = torch.minimum(neg.sum(dim=1), per_image - n_pos)
    return _random_subset(pos, n_pos, per_image), _random_subset(neg, n_neg, per_image)


def _random_subset(mask: Tensor, count: Tensor, cap: int) -> Tensor:
    """Per row of ``mask [B, N]``, ``count[row]`` of its True entries chosen uniformly at random (count <= cap)."""
    k = min(cap, mask.shape[1])
    keys = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0)
    top = keys.topk(k, dim=1).indices  # random order among the members, members first
    take = torch.arange(k, device=mask.device).unsqueeze(0) < count.unsqueeze(1)
    return torch.zeros_like(mask).scatter_(1, top, take)
