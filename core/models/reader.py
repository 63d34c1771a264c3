"""Reading each character again from its own pixels.

The box head names a character from a 7 x 7 RoIAlign of the shared stride-4 feature map: enough to find glyphs and
to tell most of them apart, too coarse for the small ones (a 10 px lower-case glyph covers about two feature cells).
:class:`GlyphReader` crops every character's square neighbourhood out of the input image itself (at the network's
input scale), resamples it to ``crop x crop`` pixels and classifies it with a small CNN of its own. The square keeps
the glyph's aspect ratio (a bar stays a bar), the margin keeps a little of its surroundings, and the crop is taken
from the ink (1 - the image), so anything outside the image reads as white background.

Inside ``FastRCNN`` (``reader_width`` > 0) the detector still finds the boxes; the reader then names them, and the
context head, when there is one, corrects the reader's logits from the other characters of the image. Because the
reader needs no feature map, it can be trained alone on ground-truth boxes with the detector frozen
(``captcha-queue train --train-parts reader``), at several times the speed of whole-network training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from core.models.layers import ConvBN
from core.models.roi_align import roi_align
from core.models.transform import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_CHANNELS = (32, 48, 96, 128)  # stem, then the three stride-2 stages


class GlyphReader(nn.Module):
    """Square crops of characters -> hidden vectors ``[K, width]`` -> character logits ``[K, num_classes]``.

    ``crops(images, boxes, image)``: ``images [B, 3, H, W]`` normalised with ``mean`` / ``std`` (the detector's
    input batch), ``boxes [K, 4]`` x1, y1, x2, y2 in that batch's pixels, ``image [K]`` batch index of each box ->
    ``[K, 3, crop, crop]`` ink in [0, 1] (0 = white), centred on each box, side ``max(w, h) * (1 + margin)``.

    The CNN: 3x3 ConvBN ``channels[0]``, then three stride-2 stages of ``channels[1:]`` channels (two 3x3 convs in
    the first two, one in the last), 2 x 2 average pool, one linear layer to ``width`` (ReLU) and the class layer.
    With the default channels (32, 48, 96, 128): 0.34 M parameters at width 128 and about 11 M multiply-adds per
    character at crop 24 (20 M at crop 32).
    """

    def __init__(self, width: int = 128, crop: int = 24, margin: float = 0.15, num_classes: int = 36,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 channels: Sequence[int] = DEFAULT_CHANNELS) -> None:
        super().__init__()
        if crop % 8:
            raise ValueError(f"reader crop must be a multiple of 8, got {crop}")
        if len(channels) != 4:
            raise ValueError(f"reader channels needs 4 entries (stem and three stages), got {list(channels)}")
        c0, c1, c2, c3 = channels
        self.crop = crop
        self.margin = margin
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.net = nn.Sequential(
            ConvBN(3, c0),
            ConvBN(c0, c1, stride=2), ConvBN(c1, c1),
            ConvBN(c1, c2, stride=2), ConvBN(c2, c2),
            ConvBN(c2, c3, stride=2),
            nn.AdaptiveAvgPool2d(2),
        )
        self.fc = nn.Linear(c3 * 4, width)
        self.cls = nn.Linear(width, num_classes)

    def crops(self, images: Tensor, boxes: Tensor, image: Tensor) -> Tensor:
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        ink = 1.0 - (images * std + mean)
        boxes = boxes.float()
        centre = (boxes[:, :2] + boxes[:, 2:]) * 0.5
        half = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True).clamp(min=2.0) * (0.5 + 0.5 * self.margin)
        rois = torch.cat((image.unsqueeze(1).float(), centre - half, centre + half), dim=1)
        return roi_align(ink.contiguous(memory_format=torch.channels_last), rois, self.crop, 1.0, 2)

    def embed(self, crops: Tensor) -> Tensor:
        """``[K, 3, crop, crop]`` -> ``[K, width]``."""
        return torch.relu(self.fc(self.net(crops).flatten(1)))

    def predict(self, hidden: Tensor) -> Tensor:
        """``[K, width]`` -> character logits ``[K, num_classes]`` (float32, also under bf16 autocast)."""
        return self.cls(hidden).float()
