"""From classified boxes to per-image detections and text.

Each classified box is labelled with its most probable character and scored with that character's probability.
Boxes whose foreground probability (1 - p(background)) is below ``score_thresh`` are dropped -- and, with
``background_argmax``, boxes whose single most probable class is background -- so a glyph the network is sure
of but torn between two readings (``0`` / ``o``) still yields its best guess. Duplicates of one character are
removed by class-aware NMS, optionally boxes of different characters covering the same glyph too, and each
image's detections are sorted by box centre x.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from core.charset import CHARS, NUM_CLASSES


def rank_in_group(group: Tensor) -> Tensor:
    """Position of each element among the elements of its group, in the current order. group: ``[K]`` int64."""
    if group.numel() == 0:
        return group.clone()
    order = torch.argsort(group, stable=True)
    sorted_group = group[order]
    counts = torch.bincount(sorted_group)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(group)
    rank[order] = torch.arange(group.numel(), device=group.device) - start[sorted_group]
    return rank


def select_detections(
    class_logits: Tensor,
    boxes: Tensor,
    batch_index: Tensor,
    num_images: int,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    cross_class_nms_thresh: float | None = None,
    num_classes: int = NUM_CLASSES,
    background_argmax: bool = False,
    containment_thresh: float | None = None,
) -> list[dict[str, Tensor]]:
    """Turn classified boxes into the detector's eval output.

    class_logits: ``[R, num_classes + 1]`` logits or log-probabilities (last = background); boxes: ``[R, 4]``
    x1, y1, x2, y2 (in one pixel space for all of them, original or batch: the output keeps it); batch_index:
    ``[R]`` int64 image of each box. Returns ``num_images`` dicts
    ``{"boxes": [K, 4], "labels": [K] int64 in 0..num_classes-1, "scores": [K]}`` sorted by box centre x.
    cross_class_nms_thresh: IoU above which a box is dropped for a better-scoring box of any class;
    containment_thresh: drop a box when this fraction of it (or of the other box) lies inside a better-scoring
    box of any class -- a piece of a glyph read as a second character.
    """
    probs = torch.softmax(class_logits.float(), dim=1)
    scores, labels = probs[:, :num_classes].max(dim=1)
    background = probs[:, num_classes]
    keep = (1.0 - background) >= score_thresh
    if background_argmax:
        keep &= scores >= background
    boxes, scores, labels, batch_index = boxes[keep], scores[keep], labels[keep], batch_index[keep]
    keep = batched_nms(boxes, scores, batch_index * (num_classes + 1) + labels, nms_thresh)
    if cross_class_nms_thresh is not None:
        keep = keep[batched_nms(boxes[keep], scores[keep], batch_index[keep], cross_class_nms_thresh)]
    if containment_thresh is not None:
        keep = keep[_contained(boxes[keep], batch_index[keep], containment_thresh)]
    # keep is sorted by score: the first detections_per_img of each image survive
    keep = keep[rank_in_group(batch_index[keep]) < detections_per_img]
    boxes, scores, labels, batch_index = boxes[keep], scores[keep], labels[keep], batch_index[keep]
    order = torch.argsort((boxes[:, 0] + boxes[:, 2]) * 0.5, stable=True)
    order = order[torch.argsort(batch_index[order], stable=True)]
    counts = torch.bincount(batch_index, minlength=num_images).tolist()
    return [
        {"boxes": b, "labels": lab, "scores": s}
        for b, lab, s in zip(boxes[order].split(counts), labels[order].split(counts), scores[order].split(counts))
    ]


def _contained(boxes: Tensor, batch_index: Tensor, thresh: float) -> Tensor:
    """Indices of ``boxes [K, 4]`` (sorted by score, best first) that survive greedy suppression by intersection
    over the smaller box's area >= ``thresh`` within the same image."""
    k = boxes.shape[0]
    if k < 2:
        return torch.arange(k, device=boxes.device)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
    smaller = torch.minimum(area[:, None], area[None, :]).clamp(min=1e-6)
    earlier = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(diagonal=1)  # [j, i]: j scores higher
    suppresses = (inter / smaller >= thresh) & earlier & (batch_index[:, None] == batch_index[None, :])
    keep = torch.ones(k, dtype=torch.bool, device=boxes.device)
    for _ in range(k):  # greedy: only kept boxes suppress; converges in a few rounds
        new = ~(suppresses & keep[:, None]).any(dim=0)
        if torch.equal(new, keep):
            break
        keep = new
    return torch.nonzero(keep).squeeze(1)


def text_from_detections(det: Mapping[str, Tensor]) -> str:
    """The string read from one image's detections: labels ordered by box centre x (background skipped)."""
    labels = det["labels"]
    boxes = det.get("boxes")
    if boxes is not None and len(boxes) == len(labels) and len(labels) > 1:
        labels = labels[torch.argsort((boxes[:, 0] + boxes[:, 2]) * 0.5, stable=True)]
    return "".join(CHARS[i] for i in labels.tolist() if 0 <= i < NUM_CLASSES)
