"""Training augmentation: boxes follow the pixels, colours change, runs repeat under a seed, train uses it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.augment import Augment, Augmented
from core.checkpoint import read_metadata
from core.synth import generate
from core.train import TrainConfig, train_model

from sample_models import TINY

BOXES = torch.tensor([[10.0, 20.0, 30.0, 60.0], [50.0, 10.0, 62.0, 70.0], [80.0, 30.0, 110.0, 50.0]])


def _glyphs() -> torch.Tensor:
    """A white 80 x 128 image with one dark filled rectangle per box in BOXES (each its own colour)."""
    image = torch.ones(3, 80, 128)
    colours = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.6, 0.1], [0.1, 0.1, 0.7]])
    for (x1, y1, x2, y2), colour in zip(BOXES.int().tolist(), colours):
        image[:, y1:y2, x1:x2] = colour.view(3, 1, 1)
    return image


def _ink_box(image: torch.Tensor, box: torch.Tensor) -> list[float]:
    """The bounding box of the non-white pixels near ``box`` (searched in the box grown by 4 px)."""
    x1, y1, x2, y2 = box.tolist()
    h, w = image.shape[1:]
    ya, yb, xa, xb = max(0, int(y1) - 4), min(h, int(y2) + 4), max(0, int(x1) - 4), min(w, int(x2) + 4)
    ink = (image[:, ya:yb, xa:xb].min(dim=0).values < 0.75).nonzero()
    return [xa + ink[:, 1].min().item(), ya + ink[:, 0].min().item(), xa + ink[:, 1].max().item() + 1,
            ya + ink[:, 0].max().item() + 1]  # fmt: skip


@pytest.mark.parametrize("seed", range(8))
def test_boxes_follow_the_glyphs_through_stretch_and_margin(seed: int) -> None:
    torch.manual_seed(seed)
    augment = Augment(p_margin=1.0, margin=(0.1, 0.4), max_lines=0, contrast=(1.0, 1.0), p_gray=0.0)
    image, boxes = augment(_glyphs(), BOXES)
    assert image.shape[1] > 80  # the margin was added
    assert boxes.shape == BOXES.shape
    for box in boxes:
        ink = _ink_box(image, box)
        assert ink == pytest.approx(box.tolist(), abs=1.5), (ink, box.tolist())
    assert torch.equal(BOXES, BOXES.clone())  # the caller's boxes are not changed in place


@pytest.mark.parametrize("seed", range(6))
def test_crop_cuts_the_empty_sides_and_never_a_glyph(seed: int) -> None:
    torch.manual_seed(seed)
    augment = Augment(p_crop=1.0, crop_margin=(0.05, 0.1), p_margin=0.0, max_lines=0, contrast=(1.0, 1.0),
                      p_gray=0.0, stretch=(1.0, 1.0))  # fmt: skip
    wide = torch.ones(3, 80, 300)
    wide[:, :, :128] = _glyphs()  # the glyphs on the left, 172 px of background on the right
    image, boxes = augment(wide, BOXES)
    # margins of 4-8 px beyond the glyphs' span (10..110): about 118-126 px remain
    assert 110 <= image.shape[2] <= 128, image.shape
    assert boxes[:, 0].min() >= 3 and boxes[:, 2].max() <= image.shape[2]
    for box in boxes:
        assert _ink_box(image, box) == pytest.approx(box.tolist(), abs=1.0)


def test_augmented_widths_follow_the_crop(tmp_path: Path) -> None:
    from core.formats import LabelledFolder

    generate(tmp_path, 4, seed=2, workers=1, progress=False)
    plain = LabelledFolder(tmp_path / "images", tmp_path / "labels")
    cropped = Augmented(plain, Augment(), plain.extents)
    for i, (w, h, x1, x2) in enumerate(plain.extents):
        assert 0 <= x1 < x2 <= w and h == 80
        boxes = plain[i]["boxes"]
        assert (x1, x2) == pytest.approx((boxes[:, 0].min().item(), boxes[:, 2].max().item()))
        assert cropped.widths[i] == min(w, round(x2 - x1 + 1.1 * h))
    assert Augmented(plain, Augment(p_crop=0.0), plain.extents).widths == plain.widths


def test_colours_change_but_glyphs_stay_dark_on_light() -> None:
    torch.manual_seed(0)
    augment = Augment(p_permute=1.0, p_gray=0.0, contrast=(1.0, 1.0), stretch=(1.0, 1.0), p_margin=0.0, max_lines=0)
    seen = set()
    for _ in range(20):
        image, boxes = augment(_glyphs(), BOXES)
        assert torch.equal(boxes, BOXES)
        seen.add(tuple(image[:, 30, 15].tolist()))  # a pixel of the first (red) glyph
        assert image[:, 0, 0].tolist() == [1.0, 1.0, 1.0]  # the background stays white
    assert len(seen) >= 3  # the channels were put in several orders


def test_lines_cross_the_image_and_the_same_seed_repeats() -> None:
    augment = Augment(max_lines=2)
    torch.manual_seed(5)
    first = [augment(_glyphs(), BOXES) for _ in range(4)]
    torch.manual_seed(5)
    again = [augment(_glyphs(), BOXES) for _ in range(4)]
    for (a, ab), (b, bb) in zip(first, again):
        assert torch.equal(a, b) and torch.equal(ab, bb)
    torch.manual_seed(1)
    lined = [Augment(max_lines=2, p_permute=0, p_gray=0, contrast=(1, 1), stretch=(1, 1), p_margin=0)(_glyphs(), BOXES)[0]
             for _ in range(10)]  # fmt: skip
    # some draws add dark pixels outside every glyph (a line through the white background)
    outside = torch.ones(80, 128, dtype=torch.bool)
    for x1, y1, x2, y2 in BOXES.int().tolist():
        outside[y1:y2, x1:x2] = False
    assert any(((img.min(dim=0).values < 0.6) & outside).any() for img in lined)
    assert all(((img.min(dim=0).values < 0.6) & outside).sum() < 0.1 * outside.sum() for img in lined)


def test_augmented_dataset_changes_samples_and_keeps_labels(tmp_path: Path) -> None:
    from core.formats import LabelledFolder

    generate(tmp_path, 3, seed=4, workers=1, progress=False)
    plain = LabelledFolder(tmp_path / "images", tmp_path / "labels")
    torch.manual_seed(0)
    augmented = Augmented(plain, Augment(p_permute=1.0))
    for i in range(len(plain)):
        a, b = plain[i], augmented[i]
        assert a["text"] == b["text"] and torch.equal(a["labels"], b["labels"])
        assert a["image"].shape != b["image"].shape or not torch.equal(a["image"], b["image"])


def test_train_with_augment_records_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate(data / "train", 8, seed=0, workers=1, progress=False)
    generate(data / "val", 2, seed=1, workers=1, progress=False)
    cfg = TrainConfig(
        images=data / "train" / "images", labels=data / "train" / "labels", val_images=data / "val" / "images",
        val_labels=data / "val" / "labels", out=tmp_path / "ck.safetensors", model_config=TINY, epochs=1,
        batch_size=4, num_workers=0, seed=1, augment=True,
    )  # fmt: skip
    result = train_model(cfg)
    meta = read_metadata(result.checkpoint)
    assert meta["train_config"]["augment"] is True
    assert meta["data_summary"]["augment"]["stretch"] == [0.8, 1.2]
    assert result.history[0]["loss"] > 0
