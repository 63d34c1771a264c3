"""The seed network: the original notebook's Faster R-CNN, layer for layer (33,105,201 parameters for 36 classes).

VGG-like backbone with BatchNorm (stride 8, 512 channels), an RPN with two anchors (30x50 and 40x60 px) and a
512-channel 3x3 conv, RoIAlign 7x7 at scale 1/8 (sampling 2) and an MLP classifier 512*7*7 -> 1024 -> 512 -> 37.
Losses and decoding follow the notebook:

- ``rpn_cls``: 2-way cross-entropy over all anchors with IoU >= 0.7 (object) or < 0.3 (background), averaged per
  image; ``rpn_reg``: smooth L1 of the deltas of the object anchors, averaged per image; both summed over the
  images that have boxes and divided by the batch size.
- ``cls``: 37-way cross-entropy over up to 128 proposals per image (half object: IoU >= 0.5, rest background:
  IoU < 0.3), sampled from all decoded anchors.
- eval: anchors scoring > 0.5, NMS 0.3, 10 proposals per image, arg-max class; the proposal box is the box.

Changes from the notebook that keep its semantics: anchors are built once per feature size with the network's true
stride (8 px), matching and sampling run batched over the padded batch, ImageNet normalisation happens inside the
model, the eval output follows the package contract (original pixels, class-aware NMS, sorted by centre x).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import RoIAlign, batched_nms

from core.models.anchors import AnchorGrid
from core.models.boxes import BoxCoder, clip_boxes, pairwise_iou
from core.models.decode import rank_in_group, select_detections
from core.models.matching import IGNORE, POSITIVE, match, pad_targets, sample
from core.models.transform import ImageTransform


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class SeedRPN(nn.Module):
    """3x3 conv (512) then per-anchor 2-way objectness logits and 4 box deltas; two anchors per cell, stride 8."""

    def __init__(self, in_ch: int = 512, stride: int = 8) -> None:
        super().__init__()
        self.anchors = AnchorGrid([(30, 50), (40, 60)], stride)
        n = self.anchors.num_anchors
        self.conv = nn.Conv2d(in_ch, 512, 3, padding=1)
        self.cls = nn.Conv2d(512, n * 2, 1)
        self.reg = nn.Conv2d(512, n * 4, 1)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """features ``[B, C, h, w]`` -> objectness ``[B, h*w*A, 2]``, deltas ``[B, h*w*A, 4]``, anchors ``[h*w*A, 4]``."""
        b, _, h, w = features.shape
        x = F.relu(self.conv(features))
        obj = self.cls(x).permute(0, 2, 3, 1).reshape(b, -1, 2).float()  # float32 even under bf16 autocast
        deltas = self.reg(x).permute(0, 2, 3, 1).reshape(b, -1, 4).float()
        return obj, deltas, self.anchors.grid(h, w, features.device, torch.float32)


class SeedRCNN(nn.Module):
    """The notebook's Faster R-CNN behind the package's model contract (see :func:`core.models.build_model`).

    score_thresh: minimum foreground probability of a detection; boxes whose arg-max class is background are
    always dropped (with the default 0.0 that is exactly the notebook's decoding);
    nms_thresh: IoU of the class-aware NMS on the classified boxes; detections_per_img: cap per image.
    """

    rpn_fg_iou, rpn_bg_iou = 0.7, 0.3
    box_fg_iou, box_bg_iou = 0.5, 0.3
    box_batch_per_image, box_positive_fraction = 128, 0.5
    proposal_score_thresh, proposal_nms_thresh, proposals_per_image = 0.5, 0.3, 10

    def __init__(self, num_classes: int = 36, score_thresh: float = 0.0, nms_thresh: float = 0.5,
                 detections_per_img: int = 10) -> None:
        super().__init__()
        self.config = {"arch": "seed", "num_classes": num_classes, "score_thresh": score_thresh,
                       "nms_thresh": nms_thresh, "detections_per_img": detections_per_img}
        self.num_classes = num_classes
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.transform = ImageTransform(height=None, fill=None, size_divisible=1)
        self.backbone = nn.Sequential(
            *_conv_bn_relu(3, 64), nn.MaxPool2d(2),
            *_conv_bn_relu(64, 128), nn.MaxPool2d(2),
            *_conv_bn_relu(128, 256),
            *_conv_bn_relu(256, 256), nn.MaxPool2d(2),
            *_conv_bn_relu(256, 512),
            *_conv_bn_relu(512, 512),
        )
        self.rpn = SeedRPN(512, stride=8)
        self.roi_align = RoIAlign((7, 7), spatial_scale=1 / 8, sampling_ratio=2)
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 1024), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(1024, 512), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(512, num_classes + 1),
        )
        self.rpn_coder = BoxCoder(clamp=4.0)

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None):
        """images: list of ``Tensor[3, H_i, W_i]`` RGB in [0, 1]. Training (needs targets with ``boxes [N, 4]``
        x1, y1, x2, y2 pixels and ``labels [N]``): dict of losses ``rpn_cls``, ``rpn_reg``, ``cls``.
        Eval: list of ``{"boxes" [K, 4] original pixels, "labels" [K], "scores" [K]}`` sorted by centre x."""
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        batch, targets = self.transform(images, targets if self.training else None)
        features = self.backbone(batch.tensors)
        obj, deltas, anchors = self.rpn(features)
        proposals = clip_boxes(self.rpn_coder.decode(anchors, deltas.detach()),
                               batch.sizes[:, 0:1], batch.sizes[:, 1:2])  # [B, A, 4]
        if self.training:
            return self._losses(features, obj, deltas, anchors, proposals, targets)
        return self._detect(features, obj, proposals, batch)

    def _losses(self, features: Tensor, obj: Tensor, deltas: Tensor, anchors: Tensor, proposals: Tensor,
                targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        b = obj.shape[0]
        gt_boxes, gt_labels, valid = pad_targets(targets, features.device)
        has_gt = valid.any(dim=1, keepdim=True)  # images without boxes add nothing, as in the notebook
        zero = features.float().sum() * 0.0

        # RPN: every anchor that is clearly object or background, no sampling
        labels, matched = match(pairwise_iou(anchors, gt_boxes), valid, self.rpn_fg_iou, self.rpn_bg_iou)
        used = (labels != IGNORE) & has_gt
        ce = F.cross_entropy(obj.reshape(-1, 2), (labels == POSITIVE).long().reshape(-1), reduction="none")
        n_used = used.sum(dim=1)
        per_image = (ce.view(b, -1) * used).sum(dim=1) / n_used.clamp(min=1)
        rpn_cls = per_image.sum() / b + zero
        pos = (labels == POSITIVE) & has_gt
        matched_boxes = torch.gather(gt_boxes, 1, matched.unsqueeze(-1).expand(-1, -1, 4))
        reg_targets = self.rpn_coder.encode(anchors.expand_as(matched_boxes), matched_boxes)
        sl1 = F.smooth_l1_loss(deltas, reg_targets, reduction="none").sum(dim=-1)
        n_pos = pos.sum(dim=1)
        per_image = (sl1 * pos).sum(dim=1) / (4 * n_pos).clamp(min=1)
        rpn_reg = per_image.sum() / b + zero

        # classifier: 128 proposals per image, half object
        labels, matched = match(pairwise_iou(proposals, gt_boxes), valid, self.box_fg_iou, self.box_bg_iou)
        labels = labels.masked_fill(~has_gt, IGNORE)
        pos, neg = sample(labels, self.box_batch_per_image, self.box_positive_fraction)
        image, index = torch.nonzero(pos | neg, as_tuple=True)
        if image.numel() == 0:
            return {"rpn_cls": rpn_cls, "rpn_reg": rpn_reg, "cls": zero}
        classes = torch.where(pos[image, index], gt_labels[image, matched[image, index]], self.num_classes)
        rois = torch.cat((image.unsqueeze(1).to(proposals.dtype), proposals[image, index]), dim=1)
        logits = self.classifier(self.roi_align(features, rois).flatten(1)).float()
        return {"rpn_cls": rpn_cls, "rpn_reg": rpn_reg, "cls": F.cross_entropy(logits, classes)}

    def _detect(self, features: Tensor, obj: Tensor, proposals: Tensor, batch) -> list[dict[str, Tensor]]:
        b, a = obj.shape[:2]
        scores = torch.softmax(obj, dim=-1)[..., 1].reshape(-1)
        boxes = proposals.reshape(-1, 4)
        image = torch.arange(b, device=obj.device).repeat_interleave(a)
        keep = torch.nonzero(scores > self.proposal_score_thresh).squeeze(1)
        keep = keep[batched_nms(boxes[keep], scores[keep], image[keep], self.proposal_nms_thresh)]
        keep = keep[rank_in_group(image[keep]) < self.proposals_per_image]
        boxes, image = boxes[keep], image[keep]
        rois = torch.cat((image.unsqueeze(1).to(boxes.dtype), boxes), dim=1)
        logits = self.classifier(self.roi_align(features, rois).flatten(1)).float()
        return select_detections(logits, batch.to_original(boxes, image), image, b, self.score_thresh,
                                 self.nms_thresh, self.detections_per_img, num_classes=self.num_classes,
                                 background_argmax=True)
