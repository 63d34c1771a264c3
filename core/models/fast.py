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
            -> objectness + 36 character logits (factorised, see BoxHead), 4 class-agnostic box deltas
    reader  (optional, ``reader_width`` > 0) a small CNN that names each character again from a square crop of the
            input image around its box (``core/models/reader.py``; with ``reader_resolution="original"``, of the
            image at its own size, before the rescale to ``input_height``); in eval, with ``reader_views``, from the
            mean of its vectors over the crop turned by each of those angles (with ``reader_view_gate`` < 1, only for
            the glyphs its first view reads with a top probability below the gate)
    context (optional, ``context_layers`` > 0) a transformer encoder over each image's characters that corrects their
            character logits (the reader's where there is one, else the box head's) from the others' appearance and
            sizes (``core/models/context.py``)

Losses (training): ``rpn_cls`` (binary cross-entropy over ``rpn_batch_per_image`` sampled anchors per image),
``rpn_reg`` (smooth L1 of positive anchors), ``cls`` (negative log-likelihood of the factorised 37-way class
distribution over ``box_batch_per_image`` sampled proposals per image, ground truth included), ``box_reg`` (smooth
L1 of the second-stage deltas of positives, times ``box_reg_weight``), with a glyph reader ``reader``
(cross-entropy of its logits on every image's ground-truth characters, their boxes jittered) and with a context head
``context`` (cross-entropy of the corrected logits on the same boxes). After ``freeze_detector()`` training returns
only ``reader`` and ``context`` and never runs the backbone. Matching,
sampling and proposal selection run batched over the padded batch (batched NMS with image offsets); RoIAlign is a
weighted gather (``roi_align.py``).
In eval mode BatchNorm is folded into the convolutions and the backbone runs channels-last. With a context head,
eval selects detections as without, then reads them again: RoIAlign on the final boxes and box head (foreground
probability), glyph reader on crops of the input, context head; each label is the final arg-max, its score that
class's probability times the box's foreground probability.

``box_source`` is a decode setting for ``core.detector.Detector`` rather than for this module: with ``"colour"`` or
``"both"`` the Detector segments each image by colour (``core.segment.colour_segments``) and has ``read_boxes`` read
those boxes instead of, or as well as, detecting (see ``Detector.predict``); ``both_gate`` (below 1, with ``"both"``
only) detects as well only where the colour reading is unsure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from core.models.anchors import AnchorGrid, anchor_shapes
from core.models.boxes import BoxCoder, clip_boxes, pairwise_iou
from core.models.context import ContextHead, box_geometry
from core.models.decode import rank_in_group, select_detections
from core.models.layers import BasicBlock, ConvBN
from core.models.matching import IGNORE, match, pad_targets, sample
from core.models.roi_align import roi_align
from core.models.reader import DEFAULT_CHANNELS as DEFAULT_READER_CHANNELS, GlyphReader
from core.models.transform import ImageBatch, ImageTransform

# where ``core.detector.Detector`` takes the characters' boxes from (the network's own forward always detects)
BOX_SOURCES = ("detector", "colour", "both")
READER_RESOLUTIONS = ("input", "original")


class Backbone(nn.Module):
    """``[B, 3, H, W]`` -> ``[B, feature_width, H/4, W/4]`` (H, W multiples of 8)."""

    def __init__(self, widths: Sequence[int], depths: Sequence[int], feature_width: int) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.stem = ConvBN(3, w0, stride=2)
        self.stage1 = nn.Sequential(ConvBN(w0, w1, stride=2), *[BasicBlock(w1) for _ in range(depths[0])])
        self.stage2 = nn.Sequential(ConvBN(w1, w2, stride=2), *[BasicBlock(w2) for _ in range(depths[1])])
        self.lateral1 = nn.Conv2d(w1, feature_width, 1)
        self.lateral2 = nn.Conv2d(w2, feature_width, 1)
        self.smooth = ConvBN(feature_width, feature_width)

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
        obj = self.cls(x).permute(0, 2, 3, 1).reshape(b, -1)
        return obj.float(), self.reg(x).permute(0, 2, 3, 1).reshape(b, -1, 4).float()  # float32 under autocast too


class BoxHead(nn.Module):
    """Two fully connected layers on pooled RoI features, then class log-probabilities and class-agnostic deltas.

    Classification is factorised: an objectness logit ``o`` and 36 character logits ``z`` give
    ``log p(char c) = log sigmoid(o) + log_softmax(z)_c`` and ``log p(background) = log sigmoid(-o)``, returned as
    37 log-probabilities. Cross-entropy on them is binary cross-entropy on ``o`` plus, for characters only, a
    36-way cross-entropy on ``z``: telling characters apart is not drowned by the many background boxes.
    """

    def __init__(self, in_features: int, width: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, width)
        self.cls = nn.Linear(width, num_classes + 1)  # num_classes character logits, then the objectness logit
        self.reg = nn.Linear(width, 4)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.normal_(self.reg.weight, std=0.001)
        nn.init.zeros_(self.cls.bias)
        nn.init.zeros_(self.reg.bias)

    def embed(self, x: Tensor) -> Tensor:
        """``[R, C, s, s]`` -> hidden vectors ``[R, width]`` (what the class and box layers read)."""
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``[R, C, s, s]`` -> log-probabilities ``[R, num_classes + 1]`` (last = background), deltas ``[R, 4]``."""
        return self.predict(self.embed(x))

    def predict(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Hidden vectors ``[R, width]`` -> log-probabilities ``[R, num_classes + 1]``, deltas ``[R, 4]``."""
        logits = self.cls(x).float()  # float32 from here, also under bf16 autocast
        chars, obj = logits[:, :-1], logits[:, -1:]
        log_probs = torch.cat((F.log_softmax(chars, dim=1) + F.logsigmoid(obj), F.logsigmoid(-obj)), dim=1)
        return log_probs, self.reg(x).float()


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
        roi_sampling_ratio: int = 2,
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
        box_reg_weight: float = 0.25,
        score_thresh: float = 0.5,
        nms_thresh: float = 0.5,
        cross_class_nms_thresh: float | None = 0.7,
        containment_thresh: float | None = 0.8,
        detections_per_img: int = 16,
        context_layers: int = 0,
        context_width: int = 128,
        context_heads: int = 4,
        context_jitter: float = 0.1,
        reader_width: int = 0,
        reader_crop: int = 24,
        reader_margin: float = 0.15,
        reader_channels: Sequence[int] = DEFAULT_READER_CHANNELS,
        reader_warp: float = 0.0,
        reader_views: Sequence[float] = (0.0,),
        reader_view_gate: float = 1.0,
        reader_resolution: str = "input",
        box_source: str = "detector",
        both_gate: float = 1.0,
    ) -> None:
        super().__init__()
        if box_source not in BOX_SOURCES:
            raise ValueError(f"box_source must be one of {', '.join(BOX_SOURCES)}, got {box_source!r}")
        if not 0.0 < both_gate <= 1.0:
            raise ValueError(f"both_gate must be in (0, 1], got {both_gate}")
        if both_gate < 1.0 and box_source != "both":
            raise ValueError(f"both_gate needs box_source 'both' (it says when to detect as well), not {box_source!r}")
        if len(widths) != 3 or len(depths) != 2:
            raise ValueError("widths needs 3 entries (stem, stage1, stage2) and depths 2 (stage1, stage2)")
        reader_views = tuple(float(v) for v in reader_views)
        if reader_views != (0.0,) and not reader_width:
            raise ValueError(f"reader_views {list(reader_views)} needs a glyph reader (reader_width > 0); "
                             "a network without one reads each glyph from its box features, in one view")
        if reader_view_gate != 1.0 and not reader_width:
            raise ValueError("reader_view_gate needs a glyph reader (reader_width > 0)")
        if reader_resolution not in READER_RESOLUTIONS:
            raise ValueError(f"reader_resolution must be one of {', '.join(READER_RESOLUTIONS)}, "
                             f"got {reader_resolution!r}")
        if reader_resolution != "input" and not reader_width:
            raise ValueError("reader_resolution needs a glyph reader (reader_width > 0)")
        self.config = {
            "arch": "fast",
            "num_classes": num_classes,
            "input_height": input_height,
            "widths": list(widths),
            "depths": list(depths),
            "feature_width": feature_width,
            "anchor_sizes": list(anchor_sizes),
            "aspect_ratios": list(aspect_ratios),
            "roi_size": roi_size,
            "roi_sampling_ratio": roi_sampling_ratio,
            "head_width": head_width,
            "rpn_fg_iou": rpn_fg_iou,
            "rpn_bg_iou": rpn_bg_iou,
            "rpn_batch_per_image": rpn_batch_per_image,
            "rpn_positive_fraction": rpn_positive_fraction,
            "rpn_pre_nms_top_n_train": rpn_pre_nms_top_n_train,
            "rpn_post_nms_top_n_train": rpn_post_nms_top_n_train,
            "rpn_pre_nms_top_n_test": rpn_pre_nms_top_n_test,
            "rpn_post_nms_top_n_test": rpn_post_nms_top_n_test,
            "rpn_nms_thresh": rpn_nms_thresh,
            "box_fg_iou": box_fg_iou,
            "box_bg_iou": box_bg_iou,
            "box_batch_per_image": box_batch_per_image,
            "box_positive_fraction": box_positive_fraction,
            "box_reg_weight": box_reg_weight,
            "score_thresh": score_thresh,
            "nms_thresh": nms_thresh,
            "cross_class_nms_thresh": cross_class_nms_thresh,
            "containment_thresh": containment_thresh,
            "detections_per_img": detections_per_img,
        }
        if context_layers:  # older checkpoints, written before the context head existed, have none of these keys
            self.config.update(context_layers=context_layers, context_width=context_width,
                               context_heads=context_heads)
        if reader_width:  # likewise for the glyph reader
            self.config.update(reader_width=reader_width, reader_crop=reader_crop, reader_margin=reader_margin,
                               reader_channels=list(reader_channels), reader_warp=reader_warp)
            if reader_views != (0.0,):  # likewise: checkpoints read in one view unless they say otherwise
                self.config["reader_views"] = list(reader_views)
            if reader_view_gate < 1.0:  # and every glyph in every view unless they say otherwise
                self.config["reader_view_gate"] = float(reader_view_gate)
            if reader_resolution != "input":  # and crop from the network's input unless they say otherwise
                self.config["reader_resolution"] = reader_resolution
        if context_layers or reader_width:  # both train on jittered ground-truth boxes
            self.config["context_jitter"] = context_jitter
        if box_source != "detector":  # likewise: checkpoints decode their own detections unless they say otherwise
            self.config["box_source"] = box_source
        if both_gate < 1.0:  # and, reading both ways, detect in every image unless they say otherwise
            self.config["both_gate"] = float(both_gate)
        self.num_classes = num_classes
        self.transform = ImageTransform(height=input_height, fill=1.0, size_divisible=8,
                                        keep_originals=reader_resolution == "original")
        self.backbone = Backbone(widths, depths, feature_width)
        self.anchors = AnchorGrid(anchor_shapes(anchor_sizes, aspect_ratios), self.stride)
        self.rpn = RPNHead(feature_width, self.anchors.num_anchors)
        self.box_head = BoxHead(feature_width * roi_size * roi_size, head_width, num_classes)
        self.reader = (GlyphReader(reader_width, reader_crop, reader_margin, num_classes, channels=reader_channels,
                                   views=reader_views, view_gate=reader_view_gate) if reader_width else None)
        self.context = (ContextHead(reader_width or head_width, context_width, context_layers, context_heads,
                                    num_classes) if context_layers else None)
        self.detector_frozen = False  # set by freeze_detector(): training then fits only the reader and context head
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
        if self.training and self.detector_frozen:
            gt_boxes, gt_labels, gt_valid = pad_targets(targets, batch.tensors.device)
            return self._reread_losses(None, batch, gt_boxes, gt_labels, gt_valid)
        features = self.backbone(batch.tensors.contiguous(memory_format=torch.channels_last))
        obj, deltas = self.rpn(features)
        anchors = self.anchors.grid(features.shape[-2], features.shape[-1], features.device, torch.float32)
        proposals, valid = self._proposals(batch, obj.detach(), deltas.detach(), anchors)
        if self.training:
            return self._losses(features, obj, deltas, anchors, proposals, valid, targets, batch)
        c = self.config
        image, index = torch.nonzero(valid, as_tuple=True)
        boxes = proposals[image, index]
        log_probs, box_deltas = self._classify(features, boxes, image)
        boxes = self.box_coder.decode(boxes, box_deltas)
        options = dict(
            num_images=len(batch.sizes), score_thresh=c["score_thresh"], nms_thresh=c["nms_thresh"],
            detections_per_img=c["detections_per_img"], cross_class_nms_thresh=c["cross_class_nms_thresh"],
            num_classes=self.num_classes, containment_thresh=c["containment_thresh"],
        )
        if self.context is None and self.reader is None:
            return select_detections(log_probs, batch.to_original(boxes, image), image, **options)
        boxes = clip_boxes(boxes, batch.sizes[image, 0], batch.sizes[image, 1])  # the reread works in batch pixels
        return self._reread(features, batch, select_detections(log_probs, boxes, image, **options))

    @torch.no_grad()
    def read_boxes(self, images: Sequence[Tensor], boxes: Sequence[Tensor]) -> list[Tensor]:
        """Character logits ``[N_i, num_classes]`` (float32) for given boxes ``[N_i, 4]`` (x1, y1, x2, y2, original
        pixels) of ``images`` (list of ``Tensor[3, H_i, W_i]`` RGB in [0, 1]), read as eval ``forward`` reads its own
        detections: by the glyph reader (in its views) where there is one, else by the box head, then corrected by
        the context head where there is one. Given the boxes eval ``forward`` returned, a network with a reader or a
        context head gives back their labels. Used to measure the reading apart from the finding (true boxes in)."""
        if len(boxes) != len(images):
            raise ValueError(f"got {len(boxes)} box lists for {len(images)} images")
        targets = [{"boxes": b, "labels": torch.zeros(len(b), dtype=torch.int64)} for b in boxes]
        batch, targets = self.transform(images, targets)
        padded, _, mask = pad_targets(targets, batch.tensors.device)
        features = None
        if self.reader is None:
            features = self.backbone(batch.tensors.contiguous(memory_format=torch.channels_last))
        _, _, logits = self._read(features, batch, padded, mask)
        return list(logits.split(mask.sum(dim=1).tolist()))

    @staticmethod
    def stale_prefixes(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[str, ...]:
        """Prefixes of the weights that cannot carry over from a network built with settings ``old`` into one built
        with ``new`` (``build_model`` keyword arguments, as stored in a checkpoint's ``model_config``).

        The context head reads the glyph reader's vectors where there is a reader and the box head's where there is
        none, so it starts fresh whenever the reader is added, removed or resized; a reader of another width or other
        channels starts fresh too (its crop size and margin change no weight).
        """
        def reader(config: Mapping[str, Any]) -> tuple[int, list[int]]:
            return config.get("reader_width", 0), list(config.get("reader_channels", DEFAULT_READER_CHANNELS))

        (old_width, old_channels), (new_width, new_channels) = reader(old), reader(new)
        if (old_width, old_channels) == (new_width, new_channels):
            return ()
        return ("reader.", "context.") if old_width and new_width else ("context.",)

    def freeze_detector(self) -> None:
        """Train only the glyph reader and the context head: every other weight stops taking gradients, and
        training ``forward`` skips the detector and returns only the ``reader`` (and ``context``) losses."""
        if self.reader is None:
            raise ValueError("freeze_detector needs a glyph reader (reader_width > 0)")
        for name, param in self.named_parameters():
            param.requires_grad_(name.startswith(("reader.", "context.")))
        self.detector_frozen = True

    def _read(self, features: Tensor | None, batch: ImageBatch, boxes: Tensor, mask: Tensor,
              warp: float = 0.0) -> tuple[Tensor | None, Tensor, Tensor]:
        """Read the characters ``boxes [B, N, 4]`` (batch pixels, padded; ``mask [B, N]`` marks real ones) again;
        ``warp``: strength of the glyph reader's random crop warps (training only, see ``GlyphReader.crops``).

        Returns, for the K real boxes in ``mask`` order: the box head's log-probabilities ``[K, 37]`` (None without
        ``features``, which only the glyph reader can do without), the base character logits ``[K, num_classes]``
        (the glyph reader's, else the box head's) and the final ones (base plus the context head's corrections)."""
        c = self.config
        image, index = torch.nonzero(mask, as_tuple=True)
        flat = boxes[image, index]
        log_probs = hidden = None
        if features is not None:
            rois = torch.cat((image.unsqueeze(1).to(flat.dtype), flat), dim=1)
            hidden = self.box_head.embed(roi_align(features, rois, c["roi_size"], 1.0 / self.stride,
                                                   c["roi_sampling_ratio"]))
            log_probs, _ = self.box_head.predict(hidden)
        if self.reader is not None:
            if batch.originals is not None:  # crops of the images at their own size
                hidden = self.reader.read(batch.originals, batch.to_original(flat, image), image, warp)
            else:
                hidden = self.reader.read(batch.tensors, flat, image, warp)
            base = self.reader.predict(hidden)
        else:
            base = log_probs[:, :-1]
        if self.context is None:
            return log_probs, base, base
        padded = hidden.new_zeros(*mask.shape, hidden.shape[1])
        padded[image, index] = hidden
        corrections = self.context(padded, box_geometry(boxes, mask, batch.sizes), mask)
        return log_probs, base, base + corrections[image, index]

    def _reread(self, features: Tensor, batch: ImageBatch, detections: list[dict[str, Tensor]]) -> list[dict]:
        """Relabel each image's detections (boxes in batch pixels) with the glyph reader and / or the context head;
        boxes to original pixels.

        A character's score is the probability of its label times the box's foreground probability."""
        counts = [len(d["boxes"]) for d in detections]
        if not any(counts):
            return detections  # no boxes to reread or to map
        boxes, _, mask = pad_targets(detections, features.device)
        log_probs, _, logits = self._read(features, batch, boxes, mask)
        scores, labels = torch.softmax(logits, dim=1).max(dim=1)
        scores = scores * -torch.expm1(log_probs[:, -1])  # times 1 - p(background)
        flat = batch.to_original(boxes[mask], torch.nonzero(mask, as_tuple=True)[0])
        return [
            {"boxes": bx, "labels": lab, "scores": s}
            for bx, lab, s in zip(flat.split(counts), labels.split(counts), scores.split(counts))
        ]

    def _classify(self, features: Tensor, boxes: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
        """Class log-probabilities ``[R, 37]`` and box deltas ``[R, 4]`` for ``boxes [R, 4]`` (batch pixels) of
        ``image [R]``."""
        rois = torch.cat((image.unsqueeze(1).to(boxes.dtype), boxes), dim=1)
        c = self.config
        return self.box_head(roi_align(features, rois, c["roi_size"], 1.0 / self.stride, c["roi_sampling_ratio"]))

    def _proposals(self, batch: ImageBatch, obj: Tensor, deltas: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
        """Top-scoring decoded anchors of each image after NMS, padded: boxes ``[B, P, 4]`` (batch pixels) and
        ``valid [B, P]``, best first. Anchors centred in an image's padding (a narrow image batched with wider ones)
        never compete for its places, so an image is proposed the same boxes alone or in any batch."""
        c = self.config
        mode = "train" if self.training else "test"
        pre_n, post_n = c[f"rpn_pre_nms_top_n_{mode}"], c[f"rpn_post_nms_top_n_{mode}"]
        b, a = obj.shape
        cx, cy = (anchors[:, 0] + anchors[:, 2]) * 0.5, (anchors[:, 1] + anchors[:, 3]) * 0.5
        inside = (cx < batch.sizes[:, 1:2]) & (cy < batch.sizes[:, 0:1])  # [B, A]
        obj = obj.masked_fill(~inside, float("-inf"))
        scores, idx = obj.topk(min(pre_n, a), dim=1)  # [B, k]
        boxes = self.rpn_coder.decode(anchors[idx], deltas.gather(1, idx.unsqueeze(-1).expand(-1, -1, 4)))
        boxes = clip_boxes(boxes, batch.sizes[:, 0:1], batch.sizes[:, 1:2]).reshape(-1, 4)
        scores = scores.reshape(-1)
        image = torch.arange(b, device=obj.device).repeat_interleave(idx.shape[1])
        ok = torch.nonzero(((boxes[:, 2] - boxes[:, 0]) >= 1.0) & ((boxes[:, 3] - boxes[:, 1]) >= 1.0)
                           & torch.isfinite(scores)).squeeze(1)  # fmt: skip
        keep = ok[batched_nms(boxes[ok], scores[ok], image[ok], c["rpn_nms_thresh"])]
        rank = rank_in_group(image[keep])
        keep, rank = keep[rank < post_n], rank[rank < post_n]
        out = boxes.new_zeros(b, post_n, 4)
        valid = torch.zeros(b, post_n, dtype=torch.bool, device=obj.device)
        out[image[keep], rank] = boxes[keep]
        valid[image[keep], rank] = True
        return out, valid

    def _losses(self, features: Tensor, obj: Tensor, deltas: Tensor, anchors: Tensor, proposals: Tensor,
                valid: Tensor, targets: list[dict[str, Tensor]], batch: ImageBatch) -> dict[str, Tensor]:
        c = self.config
        gt_boxes, gt_labels, gt_valid = pad_targets(targets, features.device)
        zero = features.float().sum() * 0.0

        # RPN: balanced sample of anchors per image
        labels, matched = match(pairwise_iou(anchors, gt_boxes), gt_valid, c["rpn_fg_iou"], c["rpn_bg_iou"],
                                allow_low_quality=True)
        pos, neg = sample(labels, c["rpn_batch_per_image"], c["rpn_positive_fraction"])
        chosen = pos | neg
        n_sampled = max(int(chosen.sum()), 1)
        rpn_cls = F.binary_cross_entropy_with_logits(obj[chosen], pos[chosen].to(obj.dtype), reduction="sum")
        image, index = torch.nonzero(pos, as_tuple=True)
        reg_targets = self.rpn_coder.encode(anchors[index], gt_boxes[image, matched[image, index]])
        rpn_reg = F.smooth_l1_loss(deltas[image, index], reg_targets, beta=1 / 9, reduction="sum")
        losses = {"rpn_cls": rpn_cls / n_sampled + zero, "rpn_reg": rpn_reg / n_sampled + zero}

        # second stage: proposals plus the ground truth boxes, balanced sample per image
        boxes = torch.cat((proposals, gt_boxes), dim=1)  # [B, P + G, 4]
        labels, matched = match(pairwise_iou(boxes, gt_boxes), gt_valid, c["box_fg_iou"], c["box_bg_iou"])
        labels = labels.masked_fill(~torch.cat((valid, gt_valid), dim=1), IGNORE)
        pos, neg = sample(labels, c["box_batch_per_image"], c["box_positive_fraction"])
        image, index = torch.nonzero(pos | neg, as_tuple=True)
        if image.numel() == 0:
            return {**losses, "cls": zero, "box_reg": zero}
        boxes, is_pos, gt_index = boxes[image, index], pos[image, index], matched[image, index]
        classes = torch.where(is_pos, gt_labels[image, gt_index], self.num_classes)
        log_probs, box_deltas = self._classify(features, boxes, image)
        box_targets = self.box_coder.encode(boxes[is_pos], gt_boxes[image, gt_index][is_pos])
        box_reg = F.smooth_l1_loss(box_deltas[is_pos], box_targets, beta=1 / 9, reduction="sum") / image.numel()
        box_reg = box_reg * c["box_reg_weight"]
        losses = {**losses, "cls": F.nll_loss(log_probs, classes), "box_reg": box_reg + zero}
        if self.context is not None or self.reader is not None:
            losses.update({k: v + zero for k, v in self._reread_losses(features, batch, gt_boxes, gt_labels,
                                                                       gt_valid).items()})
        return losses

    def _reread_losses(self, features: Tensor | None, batch: ImageBatch, gt_boxes: Tensor, gt_labels: Tensor,
                       gt_valid: Tensor) -> dict[str, Tensor]:
        """Cross-entropy of the glyph reader (``reader``) and of the context-corrected logits (``context``) on each
        image's ground-truth characters, their boxes jittered by up to ``context_jitter`` of their size per side (as
        detections are never exact) and the reader's crops warped at random by ``reader_warp``."""
        names = [n for n, part in (("reader", self.reader), ("context", self.context)) if part is not None]
        if not bool(gt_valid.any()):
            zero = batch.tensors.float().sum() * 0.0
            return {n: zero for n in names}
        sizes = batch.sizes
        wh = (gt_boxes[..., 2:] - gt_boxes[..., :2]).repeat(1, 1, 2)
        noise = (torch.rand_like(gt_boxes) * 2.0 - 1.0) * self.config["context_jitter"] * wh
        boxes = clip_boxes(gt_boxes + noise, sizes[:, 0:1], sizes[:, 1:2])
        _, base, logits = self._read(features if self.reader is None else None, batch, boxes, gt_valid,
                                     self.config.get("reader_warp", 0.0))
        labels = gt_labels[gt_valid]
        losses = {}
        if self.reader is not None:
            losses["reader"] = F.cross_entropy(base, labels)
        if self.context is not None:
            losses["context"] = F.cross_entropy(logits, labels)
        return losses
