"""The fast network: a small Faster R-CNN built for CAPTCHA throughput on CPU and GPU.

Every image is rescaled to ``input_height`` (keeping its aspect ratio) and padded with white. A residual backbone
with two stride-2 convolutions up front (stride 4 before any wide layer) produces a stride-4 and a stride-8 map; a
light top-down merge gives one stride-4 feature map that the RPN and the RoI head share:

    stem    3x3 s2 conv -> widths[0]                           (stride 2)
    stage1  3x3 s2 conv -> widths[1], depths[0] basic blocks    (stride 4)
    stage2  3x3 s2 conv -> widths[2], depths[1] basic blocks    (stride 8)
    merge   1x1(stage1) + upsample(1x1(stage2)), 3x3 conv       -> feature_width channels, stride 4
    RPN     3x3 conv, per anchor 1 objectness logit + 4 deltas  (anchor_sizes x aspect_ratios at stride 4)
    head    RoIAlign roi_size x roi_size (scale 1/4) -> FC head_width -> FC head_width
            -> 37 class logits + 4 class-agnostic box deltas

Losses (training): ``rpn_cls`` (binary cross-entropy over ``rpn_batch_per_image`` sampled anchors per image),
``rpn_reg`` (smooth L1 of positive anchors), ``cls`` (37-way cross-entropy over ``box_batch_per_image`` sampled
proposals per image, ground truth included), ``box_reg`` (smooth L1 of the second-stage deltas of positives).
Matching, sampling and proposal selection run batched over the padded batch (batched NMS with image offsets).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, roi_align

from core.models.anchors import AnchorGrid, anchor_shapes
from core.models.boxes import BoxCoder, clip_boxes, pairwise_iou
from core.models.decode import rank_in_group, select_detections
from core.models.matching import match, pad_targets, sample
from core.models.transform import ImageBatch, ImageTransform


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1, kernel: int = 3) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BN, identity shortcut."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(width, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.conv2(self.conv1(x))))


class Backbone(nn.Module):
    """``[B, 3, H, W]`` -> ``[B, feature_width, H/4, W/4]`` (H, W multiples of 8)."""

    def __init__(self, widths: Sequence[int], depths: Sequence[int], feature_width: int) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.stem = ConvBNReLU(3, w0, stride=2)
        self.stage1 = nn.Sequential(ConvBNReLU(w0, w1, stride=2), *[BasicBlock(w1) for _ in range(depths[0])])
        self.stage2 = nn.Sequential(ConvBNReLU(w1, w2, stride=2), *[BasicBlock(w2) for _ in range(depths[1])])
        self.lateral1 = nn.Conv2d(w1, feature_width, 1)
        self.lateral2 = nn.Conv2d(w2, feature_width, 1)
        self.smooth = ConvBNReLU(feature_width, feature_width)

    def forward(self, x: Tensor) -> Tensor:
        c1 = self.stage1(self.stem(x))
        c2 = self.stage2(c1)
        top = F.interpolate(self.lateral2(c2), size=c1.shape[-2:], mode="nearest")
        return self.smooth(self.lateral1(c1) + top)


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then per anchor one objectness logit and four deltas."""

    def __init__(self, width: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.cls = nn.Conv2d(width, num_anchors, 1)
        self.reg = nn.Conv2d(width, num_anchors * 4, 1)
        for layer in (self.conv, self.cls, self.reg):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, C, h, w]`` -> objectness ``[B, h*w*A]``, deltas ``[B, h*w*A, 4]``."""
        b = x.shape[0]
        x = F.relu(self.conv(x))
        return self.cls(x).permute(0, 2, 3, 1).reshape(b, -1), self.reg(x).permute(0, 2, 3, 1).reshape(b, -1, 4)


class BoxHead(nn.Module):
    """Two fully connected layers on pooled RoI features, then class logits and class-agnostic deltas."""

    def __init__(self, in_features: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, width)
        self.cls = nn.Linear(width, num_classes + 1)
        self.reg = nn.Linear(width, 4)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.normal_(self.reg.weight, std=0.001)
        nn.init.zeros_(self.cls.bias)
        nn.init.zeros_(self.reg.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[R, C, s, s]`` -> logits ``[R, num_classes + 1]``, deltas ``[R, 4]``."""
        x = F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))
        return self.cls(x), self.reg(x)


class FastRCNN(nn.Module):
    """The default detector (see the module docstring); every constructor argument is a ``config`` key."""

    stride = 4

    def __init__(
        self,
        num_classes: int = 36,
        input_height: int = 64,
        widths: Sequence[int] = (32, 64, 128),
        depths: Sequence[int] = (1, 2),
        feature_width: int = 64,
        anchor_sizes: Sequence[float] = (12.0, 20.0, 32.0),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        roi_size: int = 7,
        head_width: int = 256,
        rpn_fg_iou: float = 0.7,
        rpn_bg_iou: float = 0.3,
        rpn_batch_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_pre_nms_top_n_train: int = 600,
        rpn_post_nms_top_n_train: int = 150,
        rpn_pre_nms_top_n_test: int = 300,
        rpn_post_nms_top_n_test: int = 40,
        rpn_nms_thresh: float = 0.7,
        box_fg_iou: float = 0.5,
        box_bg_iou: float = 0.5,
        box_batch_per_image: int = 64,
        box_positive_fraction: float = 0.5,
        score_thresh: float = 0.5,
        nms_thresh: float = 0.5,
        cross_class_nms_thresh: float | None = 0.7,
        detections_per_img: int = 16,
    ) -> None:
        super().__init__()
        self.config = {
            "arch": "fast", "num_classes": num_classes, "input_height": input_height, "widths": list(widths),
            "depths": list(depths), "feature_width": feature_width, "anchor_sizes": list(anchor_sizes),
            "aspect_ratios": list(aspect_ratios), "roi_size": roi_size, "head_width": head_width,
            "rpn_fg_iou": rpn_fg_iou, "rpn_bg_iou": rpn_bg_iou, "rpn_batch_per_image": rpn_batch_per_image,
            "rpn_positive_fraction": rpn_positive_fraction, "rpn_pre_nms_top_n_train": rpn_pre_nms_top_n_train,
            "rpn_post_nms_top_n_train": rpn_post_nms_top_n_train, "rpn_pre_nms_top_n_test": rpn_pre_nms_top_n_test,
            "rpn_post_nms_top_n_test": rpn_post_nms_top_n_test, "rpn_nms_thresh": rpn_nms_thresh,
            "box_fg_iou": box_fg_iou, "box_bg_iou": box_bg_iou, "box_batch_per_image": box_batch_per_image,
            "box_positive_fraction": box_positive_fraction, "score_thresh": score_thresh, "nms_thresh": nms_thresh,
            "cross_class_nms_thresh": cross_class_nms_thresh, "detections_per_img": detections_per_img,
        }
        if len(widths) != 3 or len(depths) != 2:
            raise ValueError("widths needs 3 entries (stem, stage1, stage2) and depths 2 (stage1, stage2)")
        self.num_classes = num_classes
        self.transform = ImageTransform(height=input_height, fill=1.0, size_divisible=8)
        self.backbone = Backbone(widths, depths, feature_width)
        self.anchors = AnchorGrid(anchor_shapes(anchor_sizes, aspect_ratios), self.stride)
        self.rpn = RPNHead(feature_width, self.anchors.num_anchors)
        self.roi_size = roi_size
        self.box_head = BoxHead(feature_width * roi_size * roi_size, head_width, num_classes)
        self.rpn_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]] | None = None):
        """images: list of ``Tensor[3, H_i, W_i]`` RGB in [0, 1], any sizes. Training (targets with ``boxes [N, 4]``
        x1, y1, x2, y2 original pixels, ``labels [N]`` in 0..35): dict of losses ``rpn_cls``, ``rpn_reg``, ``cls``,
        ``box_reg``. Eval: list of ``{"boxes" [K, 4] original pixels, "labels" [K], "scores" [K]}`` sorted by
        box centre x."""
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        batch, targets = self.transform(images, targets if self.training else None)
        features = self.backbone(batch.tensors)
        obj, deltas = self.rpn(features)
        anchors = self.anchors.grid(features.shape[-2], features.shape[-1], features.device, features.dtype)
        if self.training:
            return self._losses(batch, features, obj, deltas, anchors, targets)
        boxes, image = self._proposals(batch, obj, deltas, anchors, train=False)
        logits, box_deltas = self._classify(features, boxes, image)
        boxes = self.box_coder.decode(boxes, box_deltas)
        return select_detections(
            logits, batch.to_original(boxes, image), image, len(batch.sizes), self.config["score_thresh"],
            self.config["nms_thresh"], self.config["detections_per_img"], self.config["cross_class_nms_thresh"],
            num_classes=self.num_classes,
        )

    def _classify(self, features: Tensor, boxes: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        rois = torch.cat((image.unsqueeze(1).to(boxes.dtype), boxes), dim=1)
        pooled = roi_align(features, rois, self.roi_size, 1.0 / self.stride, sampling_ratio=2, aligned=True)
        return self.box_head(pooled)

    def _proposals(self, batch: ImageBatch, obj: Tensor, deltas: Tensor, anchors: Tensor,
                   train: bool) -> tuple[Tensor, Tensor]:
        """Top-scoring decoded anchors per image after NMS: boxes ``[R, 4]`` (batch pixels), image index ``[R]``."""
        c = self.config
        pre_n = c["rpn_pre_nms_top_n_train"] if train else c["rpn_pre_nms_top_n_test"]
        post_n = c["rpn_post_nms_top_n_train"] if train else c["rpn_post_nms_top_n_test"]
        b, a = obj.shape
        obj = obj.detach()
        scores, idx = obj.topk(min(pre_n, a), dim=1)  # [B, k]
        boxes = self.rpn_coder.decode(anchors[idx], deltas.detach().gather(1, idx.unsqueeze(-1).expand(-1, -1, 4)))
        boxes = clip_boxes(boxes, batch.sizes[:, 0:1], batch.sizes[:, 1:2]).reshape(-1, 4)
        scores = scores.reshape(-1)
        image = torch.arange(b, device=obj.device).repeat_interleave(idx.shape[1])
        ok = torch.nonzero(((boxes[:, 2] - boxes[:, 0]) >= 1.0) & ((boxes[:, 3] - boxes[:, 1]) >= 1.0)).squeeze(1)
        keep = ok[batched_nms(boxes[ok], scores[ok], image[ok], c["rpn_nms_thresh"])]
        keep = keep[rank_in_group(image[keep]) < post_n]
        return boxes[keep], image[keep]

    def _losses(self, batch: ImageBatch, features: Tensor, obj: Tensor, deltas: Tensor, anchors: Tensor,
                targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        c = self.config
        b, a = obj.shape
        device = features.device
        gt_boxes, gt_labels, valid = pad_targets(targets, device)
        zero = features.sum() * 0.0

        # RPN: balanced sample of anchors per image
        labels, matched = match(pairwise_iou(anchors, gt_boxes), valid, c["rpn_fg_iou"], c["rpn_bg_iou"], allow_low_quality=True)
        group = torch.arange(b, device=device).repeat_interleave(a)
        pos, neg = sample(labels.reshape(-1), group, b, c["rpn_batch_per_image"], c["rpn_positive_fraction"])
        n_sampled = max(int((pos | neg).sum()), 1)
        chosen = pos | neg
        rpn_cls = F.binary_cross_entropy_with_logits(obj.reshape(-1)[chosen], pos[chosen].float(),
                                                     reduction="sum") / n_sampled
        pos_idx = torch.nonzero(pos).squeeze(1)
        matched_boxes = gt_boxes.reshape(-1, 4)[(group * gt_boxes.shape[1] + matched.reshape(-1))[pos_idx]]
        reg_targets = self.rpn_coder.encode(anchors.repeat(b, 1)[pos_idx], matched_boxes)
        rpn_reg = F.smooth_l1_loss(deltas.reshape(-1, 4)[pos_idx], reg_targets, beta=1 / 9,
                                   reduction="sum") / n_sampled

        # second stage: proposals plus the ground truth, balanced sample per image
        boxes, image = self._proposals(batch, obj, deltas, anchors, train=True)
        gt_image = torch.arange(b, device=device).unsqueeze(1).expand_as(valid)[valid]
        boxes = torch.cat((boxes, gt_boxes[valid]))
        image = torch.cat((image, gt_image))
        iou = pairwise_iou(boxes.unsqueeze(1), gt_boxes[image])  # [R, 1, G]: each box against its image's boxes
        labels, matched = match(iou, valid[image], c["box_fg_iou"], c["box_bg_iou"])
        labels, matched = labels.squeeze(1), matched.squeeze(1)
        pos, neg = sample(labels, image, b, c["box_batch_per_image"], c["box_positive_fraction"])
        chosen = torch.nonzero(pos | neg).squeeze(1)
        if chosen.numel() == 0:
            return {"rpn_cls": rpn_cls + zero, "rpn_reg": rpn_reg + zero, "cls": zero, "box_reg": zero}
        boxes, image, matched, is_pos = boxes[chosen], image[chosen], matched[chosen], pos[chosen]
        classes = gt_labels[image, matched]
        classes = torch.where(is_pos, classes, torch.full_like(classes, self.num_classes))
        logits, box_deltas = self._classify(features, boxes, image)
        cls = F.cross_entropy(logits, classes)
        box_targets = self.box_coder.encode(boxes[is_pos], gt_boxes[image, matched][is_pos])
        box_reg = F.smooth_l1_loss(box_deltas[is_pos], box_targets, beta=1 / 9, reduction="sum") / chosen.numel()
        return {"rpn_cls": rpn_cls + zero, "rpn_reg": rpn_reg + zero, "cls": cls, "box_reg": box_reg + zero}
