"""The character detectors: ``fast`` (default, built for throughput) and ``seed`` (the original notebook network).

Both follow torchvision's detection conventions::

    model = build_model("fast")
    model(images, targets)  # training: dict of losses ("rpn_cls", "rpn_reg", "cls", ...); the total is their sum
    model.eval(); model(images)  # list of {"boxes" [K, 4] x1y1x2y2 original px, "labels" [K], "scores" [K]}

``images`` is a list of ``Tensor[3, H_i, W_i]`` RGB in [0, 1] of any sizes; the model owns its transform.
``model.config`` is JSON-able and ``build_model(**model.config)`` rebuilds the same architecture.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing

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
    hints = typing.get_type_hints(cls.__init__)
    for key, value in config.items():
        if key in hints and not _fits(value, hints[key]):
            raise ValueError(f"{arch} network setting {key}: {value!r} is not {_describe(hints[key])}")
    return cls(num_classes=num_classes, **config)


def _fits(value: object, hint: object) -> bool:
    """Whether a JSON value suits a constructor argument's type (int, float, str, bool, ``X | None``, a sequence)."""
    origin = typing.get_origin(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if origin in (collections.abc.Sequence, list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value) if args else True
    return True  # a type this check does not know: the constructor decides


def _describe(hint: object) -> str:
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin in (collections.abc.Sequence, list, tuple) and typing.get_args(hint):
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ')}s"
    return names.get(hint, str(hint))  # type: ignore[call-overload]


__all__ = ["ARCHS", "FastRCNN", "SeedRCNN", "build_model", "text_from_detections"]
