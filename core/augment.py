"""Training-time augmentation of labelled CAPTCHAs: new colours, shapes and clutter, boxes kept exact.

``Augment`` turns one sample (``image Tensor[3, H, W]`` RGB in [0, 1], ``boxes Tensor[N, 4]`` x1, y1, x2, y2 in
pixels) into a randomly changed one. Each step mirrors a way real CAPTCHAs of one family differ from each other:

- colour: the three channels in a random order (a red glyph becomes blue or green), sometimes grey, and a contrast
  change around white (glyphs paler or darker against the light background);
- shape: the width stretched or squeezed (condensed and wide fonts) and a white-ish margin added above and below
  (smaller glyphs once the network rescales the image to its input height);
- framing: the image cut left and right to the glyphs plus a random margin (real CAPTCHAs leave a random amount of
  empty background beside the text). It also saves some work: about half of a real image's width is empty, and the
  network's cost grows with the width;
- clutter: thin dark lines drawn across the image, as the generator of the real images does.

Boxes move with the pixels (stretch scales x, the margin shifts y, the crop shifts x); the crop never cuts into a
box, so no glyph is lost. The
randomness comes from ``torch``'s generator (seeded per DataLoader worker by ``train``), so a seeded run repeats.
``Augmented`` wraps a labelled dataset and applies an ``Augment`` to every sample it returns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


@dataclass
class Augment:
    """Random changes to one training sample; every probability and range is a field (stored with the run)."""

    p_permute: float = 0.5  # shuffle the RGB channels
    p_gray: float = 0.1  # replace the colours by their mean
    contrast: tuple[float, float] = (0.6, 1.3)  # scale of (pixel - white): < 1 paler glyphs, > 1 darker
    stretch: tuple[float, float] = (0.8, 1.2)  # width factor
    p_margin: float = 0.3  # add a margin above and below
    margin: tuple[float, float] = (0.0, 0.3)  # total margin as a fraction of the height
    max_lines: int = 2  # draw 0..max_lines thin dark lines
    p_crop: float = 0.8  # cut the image left and right to the glyphs plus a margin
    crop_margin: tuple[float, float] = (0.1, 1.0)  # margin on each side, as a fraction of the height

    def __call__(self, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """``image [3, H, W]`` in [0, 1], ``boxes [N, 4]`` x1, y1, x2, y2 pixels -> a changed copy of both (the
        image may change width and height; the boxes follow)."""
        image, boxes = image.clone(), boxes.clone()
        image, boxes = self._crop(image, boxes)
        image = self._colour(image)
        image, boxes = self._stretch(image, boxes)
        image, boxes = self._margin(image, boxes)
        image = self._lines(image)
        return image.clamp_(0.0, 1.0), boxes

    def as_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(()))

    def _colour(self, image: Tensor) -> Tensor:
        if float(torch.rand(())) < self.p_permute:
            image = image[torch.randperm(3)]
        if float(torch.rand(())) < self.p_gray:
            image = image.mean(dim=0, keepdim=True).expand(3, -1, -1).clone()
        c = self._uniform(*self.contrast)
        return 1.0 - (1.0 - image) * c

    def _crop(self, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        if boxes.numel() == 0 or float(torch.rand(())) >= self.p_crop:
            return image, boxes
        h, w = image.shape[1:]
        left = int(boxes[:, 0].min() - self._uniform(*self.crop_margin) * h)
        right = int(boxes[:, 2].max() + self._uniform(*self.crop_margin) * h) + 1
        left, right = max(0, left), min(w, right)
        if right - left < 8:
            return image, boxes
        boxes[:, 0::2] -= left
        return image[:, :, left:right], boxes

    def expected_width(self, width: int, height: int, x1: float, x2: float) -> int:
        """Roughly how wide a sample of ``width`` x ``height`` whose glyphs span ``x1..x2`` comes out (before the
        stretch): for batching samples of similar widths together."""
        if self.p_crop < 0.5:
            return width
        return min(width, round(x2 - x1 + sum(self.crop_margin) * height))

    def _stretch(self, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        s = self._uniform(*self.stretch)
        h, w = image.shape[1:]
        new_w = max(8, round(w * s))
        if new_w == w:
            return image, boxes
        image = F.interpolate(image[None], size=(h, new_w), mode="bilinear", align_corners=False, antialias=new_w < w)[0]
        boxes[:, 0::2] *= new_w / w
        return image, boxes

    def _margin(self, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        if float(torch.rand(())) >= self.p_margin:
            return image, boxes
        h = image.shape[1]
        total = round(h * self._uniform(*self.margin))
        if total < 1:
            return image, boxes
        top = int(torch.randint(0, total + 1, ()))
        # the background colour: the brightest decile of the border pixels, per channel
        border = torch.cat((image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]), dim=1)
        fill = border.quantile(0.9, dim=1)
        out = fill.view(3, 1, 1).expand(3, h + total, image.shape[2]).clone()
        out[:, top : top + h] = image
        boxes[:, 1::2] += top
        return out, boxes

    def _lines(self, image: Tensor) -> Tensor:
        n = int(torch.randint(0, self.max_lines + 1, ()))
        if n == 0:
            return image
        h, w = image.shape[1:]
        ys = torch.arange(h, dtype=torch.float32).view(h, 1)
        xs = torch.arange(w, dtype=torch.float32).view(1, w)
        for _ in range(n):
            y0, y1 = self._uniform(0, h - 1), self._uniform(0, h - 1)
            width = self._uniform(0.6, 1.6)
            # distance of each pixel to the line through (0, y0) and (w - 1, y1)
            slope = (y1 - y0) / max(1, w - 1)
            dist = (ys - (y0 + slope * xs)).abs() / (1 + slope * slope) ** 0.5
            alpha = (1.0 - (dist - width / 2).clamp(min=0)).clamp(0, 1)  # antialiased edge
            colour = torch.rand(3) * 0.4  # dark
            image = image * (1 - alpha) + colour.view(3, 1, 1) * alpha
        return image


class Augmented(Dataset):
    """A labelled dataset whose samples (``image``, ``boxes``, ...) pass through ``augment``. ``extents`` (the
    parent's ``(width, height, x1, x2)`` per sample: image size and the glyphs' horizontal span) give ``.widths``,
    the expected widths after the crop, for bucketing; without them the parent's widths are used."""

    def __init__(self, dataset: Dataset, augment: Augment,
                 extents: list[tuple[int, int, float, float]] | None = None) -> None:
        self.dataset = dataset
        self.augment = augment
        self.widths = None if extents is None else [augment.expected_width(*e) for e in extents]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        sample["image"], sample["boxes"] = self.augment(sample["image"], sample["boxes"])
        return sample
