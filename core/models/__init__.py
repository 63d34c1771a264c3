"""The character detectors: ``fast`` (default, built for throughput) and ``seed`` (the original notebook network).

Both follow torchvision's detection conventions::

    model = build_model("fast")
    model(images, targets)  # training: dict of losses ("rpn_cls", "rpn_reg", "cls", ...); the total is their sum
    model.eval(); model(images)  # list of {"boxes" [K, 4] x1y1x2y2 original px, "labels" [K], "scores" [K]}

``images`` is a list of ``Tensor[3, H_i, W_i]`` RGB in [0, 1] of any sizes; the model owns its transform.
``model.config`` is JSON-able and ``build_model(**model.config)`` rebuilds the same architecture.
"""

from __future__ import annotations

import inspect

from torch import nn

from core.models.decode import text_from_detections
from core.models.fast import FastRCNN
from core.models.seed import SeedRCNN

ARCHS: dict[str, type[nn.Module]] = {"fast": FastRCNN, "seed": SeedRCNN}


def build_model(arch: str = "fast", num_classes: int = 36, **config) -> nn.Module:
    """A freshly initialised detector of architecture ``arch`` (``"fast"`` or ``"seed"``).

    ``config`` overrides the architecture's keyword arguments (see :class:`FastRCNN` and :class:`SeedRCNN`);
    unknown keys raise ``ValueError``.
    """
    try:
        cls = ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHS)}") from None
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "num_classes"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(unknown)} of the {arch} network; known: {', '.join(sorted(known))}"
        )
    return cls(num_classes=num_classes, **config)


__all__ = ["ARCHS", "FastRCNN", "SeedRCNN", "build_model", "text_from_detections"]
