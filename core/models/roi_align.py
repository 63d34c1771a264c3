"""RoIAlign as a weighted gather: the same numbers as ``torchvision.ops.roi_align(..., aligned=True)``, much faster
on CPU, in both directions.

Every output bin is the mean of ``sampling_ratio**2`` bilinear samples; each sample is a weighted sum of four
feature-map cells. The cells and weights are computed for all RoIs at once, then one ``embedding_bag`` call over the
feature map viewed as ``[B * H * W, C]`` rows gathers them (its backward is a vectorised scatter-add, where
torchvision's CPU kernel walks every sample and channel in scalar code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _sample_points(rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int,
                   height: int, width: int) -> tuple[Tensor, Tensor]:
    """Flat cell indices ``[R * s * s, 4 * n * n]`` and bilinear weights (same shape) for ``R`` RoIs."""
    s, n = output_size, sampling_ratio
    image = rois[:, 0].long()
    x1, y1, x2, y2 = (rois[:, 1:] * spatial_scale - 0.5).unbind(1)
    # sample offsets inside the RoI, as fractions of its size: bins of 1/s, n evenly spaced points per bin
    t = ((torch.arange(s * n, device=rois.device, dtype=rois.dtype) + 0.5) / (s * n))
    xs = x1[:, None] + (x2 - x1)[:, None] * t  # [R, s*n]
    ys = y1[:, None] + (y2 - y1)[:, None] * t
    y = ys.view(-1, s, 1, n, 1).expand(-1, s, s, n, n)  # [R, bin_y, bin_x, sample_y, sample_x]
    x = xs.view(-1, 1, s, 1, n).expand(-1, s, s, n, n)
    inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    y = y.clamp(min=0)
    x = x.clamp(min=0)
    y0 = y.floor().clamp(max=height - 1)
    x0 = x.floor().clamp(max=width - 1)
    y = torch.where(y0 >= height - 1, y0, y)
    x = torch.where(x0 >= width - 1, x0, x)
    y1c = (y0 + 1).clamp(max=height - 1)
    x1c = (x0 + 1).clamp(max=width - 1)
    ly, lx = y - y0, x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    base = (image * (height * width)).view(-1, 1, 1, 1, 1)
    y0, x0, y1c, x1c = y0.long(), x0.long(), y1c.long(), x1c.long()
    index = torch.stack((base + y0 * width + x0, base + y0 * width + x1c,
                         base + y1c * width + x0, base + y1c * width + x1c), dim=-1)
    weight = torch.stack((hy * hx, hy * lx, ly * hx, ly * lx), dim=-1) * (inside.to(rois.dtype) / (n * n)).unsqueeze(-1)
    # [R, s, s, n, n, 4] -> one bag of 4*n*n cells per output bin
    return index.reshape(-1, 4 * n * n), weight.reshape(-1, 4 * n * n)


def roi_align(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float,
              sampling_ratio: int = 1) -> Tensor:
    """Pool ``features [B, C, H, W]`` over ``rois [R, 5]`` (batch index, x1, y1, x2, y2 in input pixels).

    Returns ``[R, C, output_size, output_size]`` (a channels-last view), equal to torchvision's
    ``roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned=True)``.
    """
    b, c, h, w = features.shape
    r = rois.shape[0]
    if r == 0:
        return features.new_zeros(0, c, output_size, output_size)
    # sample positions in float32 whatever the feature precision (bfloat16 cannot resolve pixels past 256)
    index, weight = _sample_points(rois.float(), output_size, spatial_scale, sampling_ratio, h, w)
    rows = features.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view when features are channels-last
    pooled = F.embedding_bag(index, rows, mode="sum", per_sample_weights=weight.to(features.dtype))
    return pooled.view(r, output_size, output_size, c).permute(0, 3, 1, 2)
