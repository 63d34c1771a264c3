"""The detectors' input transform: optional rescale to a fixed height, normalisation, padding to one batch tensor.

Unlike torchvision's ``GeneralizedRCNNTransform`` it never upsizes to 800 px: CAPTCHAs are small and wide, so the
only rescale is to the network's input height, keeping the aspect ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageBatch:
    """A padded batch and the geometry needed to map boxes back to the original images.

    tensors: ``[B, 3, H, W]`` normalised; sizes: ``[B, 2]`` float (height, width) of each image inside the batch;
    scales: ``[B, 2]`` float (sx, sy) = transformed / original; original_sizes: ``[B, 2]`` float (height, width);
    originals: ``[B, 3, H0, W0]`` the same images normalised and padded at their own size (before the rescale), or
    None unless the transform was asked to keep them (``keep_originals``).
    """

    tensors: Tensor
    sizes: Tensor
    scales: Tensor
    original_sizes: Tensor
    originals: Tensor | None = None

    def to_original(self, boxes: Tensor, batch_index: Tensor) -> Tensor:
        """Map ``boxes [K, 4]`` (batch pixels) of images ``batch_index [K]`` to original pixels, clipped to the image."""
        s = self.scales[batch_index].repeat(1, 2)
        out = boxes / s
        h = self.original_sizes[batch_index, 0:1]
        w = self.original_sizes[batch_index, 1:2]
        out[:, 0::2] = torch.minimum(out[:, 0::2].clamp(min=0), w)
        out[:, 1::2] = torch.minimum(out[:, 1::2].clamp(min=0), h)
        return out


def check_images(images: Sequence[Tensor] | Tensor) -> list[Tensor]:
    """Validate the model input: a list of ``Tensor[3, H, W]`` floats (or one ``[B, 3, H, W]`` tensor)."""
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected a list of [3, H, W] tensors or a [B, 3, H, W] tensor, got shape {tuple(images.shape)}")
        images = list(images.unbind(0))
    images = list(images)
    if not images:
        raise ValueError("expected at least one image")
    for i, img in enumerate(images):
        if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
            shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
            raise ValueError(f"image {i}: expected a float Tensor[3, H, W] (RGB in [0, 1]), got {shape}")
        if not img.is_floating_point():
            raise ValueError(f"image {i}: expected a float tensor in [0, 1], got {img.dtype}")
        if img.shape[1] < 1 or img.shape[2] < 1:
            raise ValueError(f"image {i}: empty image {tuple(img.shape)}")
    return images


class ImageTransform(nn.Module):
    """Turns a list of RGB ``Tensor[3, H_i, W_i]`` in ``[0, 1]`` into an :class:`ImageBatch`.

    height: rescale every image to this height keeping the aspect ratio (bilinear, antialiased); None keeps sizes.
    fill: padding colour in input space (before normalisation); None pads with the mean (zero after normalisation).
    size_divisible: the batch height and width are rounded up to a multiple of this.
    keep_originals: also pad the images at their own size into ``ImageBatch.originals`` (for a reader that crops
    from the original pixels rather than the rescaled ones).
    """

    def __init__(self, height: int | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, fill: float | None = None, size_divisible: int = 1,
                 keep_originals: bool = False) -> None:
        super().__init__()
        self.height = height
        self.keep_originals = keep_originals
        self.size_divisible = size_divisible
        mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)
        fill_t = torch.zeros(3) if fill is None else (torch.full((3,), float(fill)) - mean_t.view(3)) / std_t.view(3)
        self.register_buffer("fill", fill_t, persistent=False)

    def _target_size(self, h: int, w: int) -> tuple[int, int]:
        if self.height is None:
            return h, w
        return self.height, max(1, round(w * self.height / h))

    def forward(self, images: Sequence[Tensor] | Tensor,
                targets: Sequence[dict[str, Tensor]] | None = None) -> tuple[ImageBatch, list[dict[str, Tensor]] | None]:
        images = check_images(images)
        device = self.mean.device
        orig = [(int(img.shape[1]), int(img.shape[2])) for img in images]
        new = [self._target_size(h, w) for h, w in orig]
        d = self.size_divisible
        batch_h = -(-max(h for h, _ in new) // d) * d
        batch_w = -(-max(w for _, w in new) // d) * d
        batch = self.fill.view(1, 3, 1, 1).expand(len(images), 3, batch_h, batch_w).clone()
        originals = None
        if self.keep_originals:
            originals = self.fill.view(1, 3, 1, 1).expand(len(images), 3, max(h for h, _ in orig),
                                                          max(w for _, w in orig)).clone()
        # images of one size are resized and normalised together
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(orig):
            groups.setdefault(size, []).append(i)
        for (h, w), idx in groups.items():
            x = torch.stack([images[i] for i in idx]).to(device=device, dtype=torch.float32)
            x = (x - self.mean) / self.std  # before the resize, which is linear: normalised once for both
            if originals is not None:
                originals[idx, :, :h, :w] = x
            nh, nw = new[idx[0]]
            if (nh, nw) != (h, w):
                x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h)
            batch[idx, :, :nh, :nw] = x
        sizes = torch.tensor(new, dtype=torch.float32, device=device)
        original = torch.tensor(orig, dtype=torch.float32, device=device)
        scales = torch.stack((sizes[:, 1] / original[:, 1], sizes[:, 0] / original[:, 0]), dim=1)
        out_targets = None
        if targets is not None:
            if len(targets) != len(images):
                raise ValueError(f"got {len(targets)} targets for {len(images)} images")
            out_targets = []
            for i, t in enumerate(targets):
                boxes = torch.as_tensor(t["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
                labels = torch.as_tensor(t["labels"], dtype=torch.int64, device=device).reshape(-1)
                if boxes.shape[0] != labels.shape[0]:
                    raise ValueError(f"target {i}: {boxes.shape[0]} boxes but {labels.shape[0]} labels")
                out_targets.append({"boxes": boxes * scales[i].repeat(2), "labels": labels})
        return ImageBatch(batch, sizes, scales, original, originals), out_targets
