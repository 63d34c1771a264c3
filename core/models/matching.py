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


def _random_rank(mask: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """For each element with ``mask``, its position within its group in a random order (others: a large number)."""
    m = mask.numel()
    key = torch.where(mask, group.to(torch.float64) * 2 + torch.rand(m, device=mask.device, dtype=torch.float64),
                      torch.full((m,), float("inf"), device=mask.device, dtype=torch.float64))
    order = torch.argsort(key)
    counts = torch.bincount(group[mask], minlength=num_groups)
    start = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(m, device=mask.device) - start[group[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank.masked_fill(~mask, m + 1)


def sample(labels: Tensor, group: Tensor, num_groups: int, per_group: int,
           positive_fraction: float) -> tuple[Tensor, Tensor]:
    """Random balanced sampling within groups (images): per group at most ``per_group * positive_fraction``
    positives, filled up to ``per_group`` with negatives.

    labels: ``[M]`` with 1/0/-1; group: ``[M]`` int64 group of each element. Returns ``(positive, negative)``
    boolean masks ``[M]``.
    """
    pos = labels == POSITIVE
    neg = labels == NEGATIVE
    n_pos = torch.bincount(group[pos], minlength=num_groups).clamp(max=int(per_group * positive_fraction))
    n_neg = torch.minimum(torch.bincount(group[neg], minlength=num_groups), per_group - n_pos)
    pos = pos & (_random_rank(pos, group, num_groups) < n_pos[group])
    neg = neg & (_random_rank(neg, group, num_groups) < n_neg[group])
    return pos, neg
