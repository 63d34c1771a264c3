"""Precision: bf16 autocast keeps the contract (float32 outputs and losses), reads like fp32, and is chosen by name,
by setting, or automatically from the hardware."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torchvision.ops import box_iou

from core.checkpoint import default_checkpoint_path, read_metadata
from core.config import get_settings
from core.detector import Detector, detect, image_to_tensor
from core.models import build_model
from core.precision import autocast, cpu_has_native_bf16, resolve_precision
from core.synth import generate, render_captcha
from core.train import TrainConfig, train_model

from sample_models import TINY


def test_names_resolve_and_bad_names_are_refused() -> None:
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError):
        with autocast("auto", "cpu"):  # autocast takes a resolved name only
            pass


def _samples(n: int, seed: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    rng = random.Random(seed)
    images, targets = [], []
    for i in range(n):
        img, boxes = render_captcha(["ab12", "x9y8z", "k3mqp7"][i % 3], rng)
        images.append(image_to_tensor(img))
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.arange(len(boxes)) % 36})
    return images, targets


@pytest.mark.parametrize("arch", ["fast", "seed"])
def test_bf16_losses_and_outputs_stay_float32(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, **(TINY if arch == "fast" else {}))
    images, targets = _samples(2, seed=1)
    model.train()
    with autocast("bf16", "cpu"):
        losses = model(images, targets)
    assert set(losses) >= {"rpn_cls", "rpn_reg", "cls"}
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    sum(losses.values()).backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    model.eval()
    with torch.inference_mode(), autocast("bf16", "cpu"):
        out = model(images)
    assert len(out) == 2
    for det in out:
        assert det["boxes"].dtype == torch.float32 and det["scores"].dtype == torch.float32
        assert det["labels"].dtype == torch.int64


def test_bf16_reads_like_fp32() -> None:
    """The shipped checkpoint decodes synthetic CAPTCHAs alike in both precisions, on boxes that overlap closely."""
    detector = Detector.load(default_checkpoint_path(), device="cpu", precision="fp32")
    rng = random.Random(11)
    images = [image_to_tensor(render_captcha(text, rng)[0]) for text in ("ab12", "hello9", "k3mqp7z", "w0rd5") * 4]
    full = detect(detector.model, images, batch_size=8, precision="fp32")
    half = detect(detector.model, images, batch_size=8, precision="bf16")
    same = 0
    for a, b in zip(full, half):
        if torch.equal(a["labels"], b["labels"]):
            same += 1
            assert box_iou(a["boxes"], b["boxes"]).diagonal().min() > 0.8  # the same glyph, within a pixel or so
            assert torch.allclose(a["scores"], b["scores"], atol=0.05)
    assert same >= 14, f"only {same} of 16 images read the same in bf16"


def test_detector_precision_comes_from_argument_or_settings(monkeypatch) -> None:
    path = default_checkpoint_path()
    assert Detector.load(path, device="cpu", precision="bf16").precision == "bf16"
    monkeypatch.setenv("CAPTCHA_PRECISION", "fp32")
    get_settings.cache_clear()
    try:
        det = Detector.load(path, device="cpu")
        assert det.precision == "fp32" and "precision='fp32'" in repr(det)
        monkeypatch.setenv("CAPTCHA_PRECISION", "fp64")
        get_settings.cache_clear()
        with pytest.raises(ValueError):
            get_settings()
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_records_its_precision(tmp_path: Path, precision: str) -> None:
    generate(tmp_path / "train", 6, seed=0, workers=1, progress=False)
    cfg = TrainConfig(
        images=tmp_path / "train" / "images", labels=tmp_path / "train" / "labels", out=tmp_path / "ck.safetensors",
        model_config=TINY, epochs=1, batch_size=3, num_workers=0, seed=1, precision=precision,
    )  # fmt: skip
    result = train_model(cfg)
    meta = read_metadata(result.checkpoint)
    assert meta["data_summary"]["precision"] == precision
    assert meta["train_config"]["precision"] == precision
    assert result.history[0]["loss"] > 0 and torch.isfinite(torch.tensor(result.history[0]["loss"]))
