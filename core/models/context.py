"""Reading each character in the light of the others in its image.

Alone, many glyphs of this family are ambiguous: an upper-case ``O`` and a ``0``, a lower-case ``o`` and a small
``0``, an upper-case ``I`` (label ``i``), an ``l`` and a ``1`` are often the same shape. The rest of the image settles
most of them: all glyphs of one image share a case and a font size, so a round glyph as tall as the capitals around
it is an ``O`` in an upper-case image and a ``0`` in a lower-case one, and a plain bar is an ``i`` where the other
letters are capitals and an ``l`` where they are not.

:class:`ContextHead` is a small transformer encoder over the characters of one image. Each character enters as its
box head's hidden vector (appearance) plus its box geometry relative to the image and to the image's median character
height; every character attends to the others, and a linear layer reads 36 corrections to the box head's own
character logits from the result. The corrections start at zero, so a new context head starts out reading exactly
as the box head does and learns only what the neighbours add.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

GEOMETRY_FEATURES = 7


def box_geometry(boxes: Tensor, mask: Tensor, sizes: Tensor) -> Tensor:
    """Per-box geometry features ``[B, N, 7]`` from ``boxes [B, N, 4]`` (x1, y1, x2, y2 batch pixels, padded),
    ``mask [B, N]`` (True for real boxes) and image ``sizes [B, 2]`` (height, width in batch pixels).

    Features: centre x / width, centre y / height, box width and height / height, log of box width and height over
    the image's median box height, and the box's rank from the left over the number of boxes. Padding gets zeros.
    """
    boxes = boxes.float()
    w = (boxes[..., 2] - boxes[..., 0]).clamp(min=1.0)
    h = (boxes[..., 3] - boxes[..., 1]).clamp(min=1.0)
    cx = (boxes[..., 0] + boxes[..., 2]) * 0.5
    cy = (boxes[..., 1] + boxes[..., 3]) * 0.5
    height, width = sizes[:, 0:1].float(), sizes[:, 1:2].float()
    median = torch.where(mask, h, torch.nan).nanmedian(dim=1, keepdim=True).values.nan_to_num(1.0).clamp(min=1.0)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1)
    rank = torch.where(mask, cx, torch.inf).argsort(dim=1).argsort(dim=1)
    feats = torch.stack(
        (cx / width, cy / height, w / height, h / height, torch.log(w / median), torch.log(h / median), rank / count),
        dim=-1,
    )
    return feats * mask.unsqueeze(-1)


class ContextHead(nn.Module):
    """Transformer encoder over the characters of each image -> corrections to their character logits.

    ``forward(hidden [B, N, F], geometry [B, N, 7], mask [B, N])`` -> ``[B, N, num_classes]`` (float32), zero for a
    freshly built head.
    Padding positions (mask False) are ignored as keys; their outputs are meaningless. A row without any real box is
    allowed (its outputs are meaningless too).
    """

    def __init__(self, in_features: int, width: int, layers: int, heads: int, num_classes: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_features + GEOMETRY_FEATURES, width), nn.LayerNorm(width))
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.cls = nn.Linear(width, num_classes)
        nn.init.zeros_(self.cls.weight)
        nn.init.zeros_(self.cls.bias)

    def forward(self, hidden: Tensor, geometry: Tensor, mask: Tensor) -> Tensor:
        x = self.embed(torch.cat((hidden, geometry.to(hidden.dtype)), dim=-1))
        padding = ~mask
        padding[:, 0] &= mask.any(dim=1)  # an image without boxes keeps one key, so attention stays finite
        x = self.encoder(x, src_key_padding_mask=padding)
        return self.cls(self.norm(x)).float()
