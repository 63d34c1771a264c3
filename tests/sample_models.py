"""Small models the tests (and the benchmarks' fallback) decode with: no checkpoint file, no training.

* ``TINY``: the smallest ``fast`` configuration, for training and checkpoint tests;
* ``eager_tiny_model(seed)``: a tiny untrained network that reports detections;
* ``sharpened_random_model()``: a full-size seeded random ``fast`` network that emits characters;
* ``small_checkpoint(dir)``: the shipped checkpoint, else ``sharpened_random_model`` saved in ``dir``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from core.models import build_model

TINY = {"widths": [8, 16, 16], "depths": [0, 0], "feature_width": 16, "head_width": 32}


def eager_tiny_model(seed: int) -> torch.nn.Module:
    """A tiny untrained ``fast`` network that reports detections: the last logit of its box head is the objectness
    (``core.models.fast.BoxHead``), so raising that bias makes proposals characters of random classes."""
    torch.manual_seed(seed)
    model = build_model("fast", **TINY, score_thresh=0.0)
    with torch.no_grad():
        model.box_head.cls.bias[-1] += 8.0
    return model


def sharpened_random_model() -> torch.nn.Module:
    """``build_model("fast")`` with seeded random weights and large class-layer weights (peaked, stable arg-max);
    the last class logit (background or objectness, depending on the head) is biased whichever way makes the model
    detect characters on a synthetic CAPTCHA."""
    from core.detector import image_to_tensor
    from core.synth import render_captcha

    probe = image_to_tensor(render_captcha("ab12", random.Random(0))[0])
    for last_bias in (-100.0, 100.0):
        torch.manual_seed(0)
        model = build_model("fast").eval()
        with torch.no_grad():
            model.box_head.cls.weight.normal_(0.0, 50.0)
            model.box_head.cls.bias[-1] = last_bias
            if len(model([probe])[0]["labels"]) > 0:
                return model
    raise AssertionError("no sharpening of the random model detects characters")


def small_checkpoint(directory: Path, version: str = "test-random") -> Path:
    """The shipped checkpoint if present, else ``sharpened_random_model`` saved in ``directory`` (a random model
    decodes deterministically, which is all the tests that use it compare)."""
    from core.checkpoint import default_checkpoint_path, save_checkpoint

    shipped = default_checkpoint_path()
    if shipped.exists():
        return shipped
    return save_checkpoint(sharpened_random_model(), directory / "random.safetensors", {"version": version})
