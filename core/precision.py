"""Numeric precision of the network's heavy layers.

Convolutions and fully connected layers can run in bfloat16 under ``torch.autocast`` while everything numerically
delicate stays in float32: anchors, box coding, RoIAlign sample positions, losses, scores (the networks cast their
heads' outputs back to float32). On hardware with native bfloat16 arithmetic (Intel AMX / AVX512-BF16 CPUs, CUDA
GPUs of compute capability 8.0 and later) this roughly halves the time of a training step and of an inference batch;
elsewhere bfloat16 is emulated and slower, so ``"auto"`` picks it only where it is native.

Precisions are named ``"fp32"`` and ``"bf16"``; ``"auto"`` resolves to one of them for a device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import lru_cache

import torch

PRECISIONS = ("auto", "fp32", "bf16")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AMX tiles or AVX512-BF16), read from ``/proc/cpuinfo``."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"}) and torch.backends.mkldnn.is_available()
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bf16"`` where ``device`` has native bfloat16, else ``"fp32"``; other names as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the enclosed forward pass in ``precision`` (a resolved name: ``"fp32"`` or ``"bf16"``) on ``device``."""
    if precision == "bf16":
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
            yield
    elif precision == "fp32":
        yield
    else:
        raise ValueError(f"precision must be 'fp32' or 'bf16' here, got {precision!r}")
