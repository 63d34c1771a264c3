"""Reading each character again from its own pixels.

The box head names a character from a 7 x 7 RoIAlign of the shared stride-4 feature map: enough to find glyphs and
to tell most of them apart, too coarse for the small ones (a 10 px lower-case glyph covers about two feature cells).
:class:`GlyphReader` crops every character's square neighbourhood out of the input image itself (at the network's
input scale, or at the image's own with ``reader_resolution="original"``), resamples it to ``crop x crop`` pixels
and classifies it with a small CNN of its own. The square keeps the glyph's aspect ratio (a bar stays a bar), the
margin keeps a little of its surroundings, and the crop is taken from the ink (1 - the image), so anything outside
the image reads as white background. In training each crop can also be warped at random (``reader_warp``: rotated,
sheared, stretched), so that the reader sees every glyph of its training set in many shapes, as the glyphs of real
CAPTCHAs vary from one image to the next. In eval the reader can also read each crop in several ``views`` (the crop
turned by each of a few angles) and average what it sees, which corrects some of the glyphs one view misreads
(test-time augmentation, at the cost of one reader pass per view).

Inside ``FastRCNN`` (``reader_width`` > 0) the detector still finds the boxes; the reader then names them, and the
context head, when there is one, corrects the reader's logits from the other characters of the image. Because the
reader needs no feature map, it can be trained alone on ground-truth boxes with the detector frozen
(``captcha-queue train --train-parts reader``), at several times the speed of whole-network training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.models.decode import rank_in_group
from core.models.layers import ConvBN
from core.models.transform import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_CHANNELS = (32, 48, 96, 128)  # stem, then the three stride-2 stages
# The random change of one crop at warp 1.0 (each range scales with warp): rotation up to 20 degrees either way, a
# horizontal shear up to 0.25, and each axis stretched or squeezed by up to 15 % (exp of +-0.15).
WARP = {"rotate": math.radians(20.0), "shear": 0.25, "stretch": 0.15}


class GlyphReader(nn.Module):
    """Square crops of characters -> hidden vectors ``[K, width]`` -> character logits ``[K, num_classes]``.

    ``crops(images, boxes, image)``: ``images [B, 3, H, W]`` normalised with ``mean`` / ``std`` (the detector's
    input batch), ``boxes [K, 4]`` x1, y1, x2, y2 in that batch's pixels, ``image [K]`` batch index of each box ->
    ``[K, 3, crop, crop]`` ink in [0, 1] (0 = white), centred on each box, side ``max(w, h) * (1 + margin)``.
    With ``warp`` > 0 (training) each crop is also rotated, sheared and stretched at random (see ``WARP``), the way
    one glyph differs from the next in real CAPTCHAs.

    The CNN: 3x3 ConvBN ``channels[0]``, then three stride-2 stages of ``channels[1:]`` channels (two 3x3 convs in
    the first two, one in the last), 2 x 2 average pool, one linear layer to ``width`` (ReLU) and the class layer.
    With the default channels (32, 48, 96, 128): 0.34 M parameters at width 128 and about 11 M multiply-adds per
    character at crop 24 (20 M at crop 32).

    ``read`` is crops then ``embed``; in eval mode with ``views`` (rotation angles in degrees, e.g. ``(0, 7, -7)``)
    it embeds each crop once per view, turned by that angle about its centre, and returns the mean vector; with
    ``view_gate`` < 1 only for the crops whose first view leaves the reader unsure (top probability below the gate).
    """

    def __init__(self, width: int = 128, crop: int = 24, margin: float = 0.15, num_classes: int = 36,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 channels: Sequence[int] = DEFAULT_CHANNELS, views: Sequence[float] = (0.0,),
                 view_gate: float = 1.0) -> None:
        super().__init__()
        if crop % 8:
            raise ValueError(f"reader crop must be a multiple of 8, got {crop}")
        if len(channels) != 4:
            raise ValueError(f"reader channels needs 4 entries (stem and three stages), got {list(channels)}")
        c0, c1, c2, c3 = channels
        if not views:
            raise ValueError("reader views needs at least one angle")
        self.crop = crop
        self.margin = margin
        if not 0.0 < view_gate <= 1.0:
            raise ValueError(f"reader view gate must be in (0, 1], got {view_gate}")
        self.views = tuple(float(v) for v in views)
        self.view_gate = float(view_gate)
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

    def read(self, images: Tensor, boxes: Tensor, image: Tensor, warp: float = 0.0) -> Tensor:
        """Hidden vectors ``[K, width]`` of the characters ``boxes [K, 4]`` of ``image [K]`` (as ``crops``); in eval
        mode the mean over ``self.views``. With ``view_gate`` below 1, every glyph is read in the first view and only
        those whose top class probability there is below ``view_gate`` also in the others (the rest keep the first
        view's vector): most of the views' accuracy for a fraction of their cost, as most glyphs are read surely."""
        if self.training or self.views == (0.0,):
            return self.embed(self.crops(images, boxes, image, warp))
        k, v = len(boxes), len(self.views)
        first = self.embed(self._crops(images, boxes, image, rotations(self.views[:1], boxes.device).expand(k, 2, 2)))
        if self.view_gate >= 1.0:
            unsure = torch.arange(k, device=boxes.device)
        else:
            unsure = (self.predict(first).softmax(dim=1).amax(dim=1) < self.view_gate).nonzero().squeeze(1)
        u = len(unsure)
        if u == 0:
            return first
        turns = rotations(self.views[1:], boxes.device).repeat_interleave(u, dim=0)  # [(V - 1) * U, 2, 2], view-major
        crops = self._crops(images, boxes[unsure].repeat(v - 1, 1), image[unsure].repeat(v - 1), turns)
        others = self.embed(crops).view(v - 1, u, -1).sum(dim=0).to(first.dtype)
        hidden = first.clone()
        hidden[unsure] = (first[unsure] + others) / v
        return hidden

    def crops(self, images: Tensor, boxes: Tensor, image: Tensor, warp: float = 0.0) -> Tensor:
        warps = random_warps(len(boxes), warp, boxes.device) if warp > 0.0 else None
        return self._crops(images, boxes, image, warps)

    def _crops(self, images: Tensor, boxes: Tensor, image: Tensor, warps: Tensor | None) -> Tensor:
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        ink = 1.0 - (images * std + mean)
        boxes = boxes.float()
        centre = (boxes[:, :2] + boxes[:, 2:]) * 0.5
        half = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True).clamp(min=2.0) * (0.5 + 0.5 * self.margin)
        return self._sample(ink, centre, half, image, warps)

    def _sample(self, ink: Tensor, centre: Tensor, half: Tensor, image: Tensor, warps: Tensor | None) -> Tensor:
        """The square crops, each offset from its centre passed through ``warps [K, 2, 2]`` when given: for every
        output pixel the mean of 2 x 2 bilinear samples, as RoIAlign (``aligned=True``, sampling ratio 2) takes them,
        all in one ``grid_sample`` over each image's crops side by side (a third of the time of the RoIAlign gather
        on a CPU). Samples past the image's edge read as no ink."""
        b, _, height, width = ink.shape
        k, n = len(centre), 2 * self.crop  # two samples per output pixel and axis, averaged
        if k == 0:
            return ink.new_zeros(0, 3, self.crop, self.crop)
        t = (torch.arange(n, device=ink.device, dtype=torch.float32) + 0.5) / n * 2.0 - 1.0
        ys, xs = torch.meshgrid(t, t, indexing="ij")
        offsets = torch.stack((xs, ys), dim=-1).view(1, n * n, 2)  # x, y in [-1, 1] of the square's half side
        if warps is not None:  # written out rather than a matmul, which autocast would run in bfloat16
            x, y, w = offsets[..., 0], offsets[..., 1], warps.unsqueeze(1)
            offsets = torch.stack((w[..., 0, 0] * x + w[..., 0, 1] * y, w[..., 1, 0] * x + w[..., 1, 1] * y), dim=-1)
        points = centre.unsqueeze(1) - 0.5 + half.unsqueeze(1) * offsets  # pixel coordinates, centres at integers
        grid = torch.stack((points[..., 0] * (2.0 / max(width - 1, 1)) - 1.0,
                            points[..., 1] * (2.0 / max(height - 1, 1)) - 1.0), dim=-1)
        rank = rank_in_group(image)  # each crop's slot among its image's crops
        slots = grid.new_full((b, int(rank.max()) + 1, n * n, 2), -2.0)  # unused slots sample outside: no ink
        slots[image, rank] = grid
        sampled = F.grid_sample(ink, slots.view(b, -1, n, 2), mode="bilinear", padding_mode="zeros",
                                align_corners=True)  # [B, 3, slots * n, n]
        sampled = sampled.view(b, 3, -1, n, n).transpose(1, 2)[image, rank]  # [K, 3, n, n]
        return F.avg_pool2d(sampled, 2).contiguous(memory_format=torch.channels_last)

    def embed(self, crops: Tensor) -> Tensor:
        """``[K, 3, crop, crop]`` -> ``[K, width]``."""
        return torch.relu(self.fc(self.net(crops).flatten(1)))

    def predict(self, hidden: Tensor) -> Tensor:
        """``[K, width]`` -> character logits ``[K, num_classes]`` (float32, also under bf16 autocast)."""
        return self.cls(hidden).float()


def rotations(degrees: Sequence[float], device: torch.device | str = "cpu") -> Tensor:
    """``[len(degrees), 2, 2]`` rotation matrices, in the form ``random_warps`` returns."""
    angle = torch.tensor([math.radians(d) for d in degrees], dtype=torch.float32, device=device)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.stack((cos, -sin, sin, cos), dim=1).view(-1, 2, 2)


def random_warps(count: int, strength: float, device: torch.device | str = "cpu") -> Tensor:
    """``count`` random 2 x 2 matrices (rotation @ shear @ stretch, ranges ``WARP`` times ``strength``), drawn from
    torch's global generator."""
    r = torch.rand(count, 4, device=device) * 2.0 - 1.0
    angle, shear = r[:, 0] * WARP["rotate"] * strength, r[:, 1] * WARP["shear"] * strength
    sx, sy = torch.exp(r[:, 2] * WARP["stretch"] * strength), torch.exp(r[:, 3] * WARP["stretch"] * strength)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # rotate [[cos, -sin], [sin, cos]] @ skew [[1, shear], [0, 1]] @ stretch [[sx, 0], [0, sy]], written out so that
    # it stays float32 under autocast
    return torch.stack((cos * sx, (cos * shear - sin) * sy, sin * sx, (sin * shear + cos) * sy), dim=1).view(-1, 2, 2)
