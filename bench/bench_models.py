"""Throughput of the ``seed`` and ``fast`` detectors, measured in the same run on synthetic 80x455 CAPTCHAs.

    python bench/bench_models.py [--threads 2] [--iters 5] [--batch 32] [--train-batch 8] [--precisions fp32,bf16]
                                 [--archs seed,fast,shipped,shipped-1view,shipped-gated,shipped-reader]
                                 [--view-gate 0.95]

Prints images/s for inference (eval mode, ``torch.inference_mode``, batch ``--batch``) and training (forward,
backward and an AdamW step at batch ``--train-batch``, 4-8 boxes per image) of each network in each precision
(``core.precision``: fp32, or bf16 autocast of the heavy layers), and the ratios against the seed network in fp32,
the baseline. Each figure is the median over ``--iters`` timed iterations after one warm-up; the seed network runs
``--seed-iters`` only. ``--device cuda`` measures on a GPU (synchronised before each clock reading).

Besides the two architectures (freshly initialised, as ``build_model`` makes them), ``shipped`` is the shipped
default checkpoint (trained, so it finds characters and runs its glyph reader and context head on them in eval) and
``shipped-reader`` the same network training only its reader and context head (``--train-parts reader``);
``shipped-1view`` is the shipped network reading each glyph in one view instead of its ``reader_views`` and
``shipped-gated`` the same reading only the glyphs it is unsure of in every view (``--view-gate``): what the views
cost.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.charset import CHARS, encode  # noqa: E402
from core.models import build_model  # noqa: E402
from core.precision import autocast, resolve_precision  # noqa: E402

HEIGHT, WIDTH = 80, 455


def synthetic_batch(n: int, seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``n`` CAPTCHAs of 4-8 characters resized to exactly 80x455, with their boxes."""
    from core.synth import render_captcha

    rng = random.Random(seed)
    images, targets = [], []
    for _ in range(n):
        text = "".join(rng.choice(CHARS) for _ in range(rng.randint(4, 8)))
        img, boxes = render_captcha(text, rng)
        sx, sy = WIDTH / img.width, HEIGHT / img.height
        img = img.resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
        b = torch.tensor(boxes, dtype=torch.float32) * torch.tensor([sx, sy, sx, sy])
        targets.append({"boxes": b, "labels": torch.tensor(encode(text))})
    return images, targets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_rate(fn, n_images: int, iters: int, device: torch.device) -> float:
    fn()  # warm-up (allocator, oneDNN kernel selection, anchor cache)
    times = []
    for _ in range(iters):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return n_images / statistics.median(times)


def bench_inference(model: torch.nn.Module, images: list[torch.Tensor], iters: int, precision: str = "fp32",
                    device: torch.device = torch.device("cpu")) -> float:
    model.eval()

    def run() -> None:
        with torch.inference_mode(), autocast(precision, device):
            model(images)

    return _median_rate(run, len(images), iters, device)


def bench_training(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict], iters: int,
                   precision: str = "fp32", device: torch.device = torch.device("cpu")) -> float:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with autocast(precision, device):
            losses = model(images, targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    return _median_rate(step, len(images), iters, device)


SHIPPED = ("shipped", "shipped-1view", "shipped-gated", "shipped-reader")


def _model(arch: str, view_gate: float = 0.95) -> torch.nn.Module:
    """A fresh ``seed`` / ``fast`` network, or the shipped checkpoint (one of ``SHIPPED``)."""
    if arch not in SHIPPED:
        return build_model(arch)
    from core.checkpoint import default_checkpoint_path, load_checkpoint

    model, _ = load_checkpoint(default_checkpoint_path())
    if arch == "shipped-reader":
        model.freeze_detector()
    if arch == "shipped-1view":  # its reader reads each crop once, upright, instead of in the shipped views
        model.reader.views = (0.0,)
    if arch == "shipped-gated":  # the other views only for the glyphs the first reads with less than view_gate
        model.reader.view_gate = view_gate
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per figure (default 5)")
    p.add_argument("--batch", type=int, default=32, help="inference batch size (default 32)")
    p.add_argument("--train-batch", type=int, default=8, help="training batch size (default 8)")
    p.add_argument("--seed-iters", type=int, default=2, help="timed iterations for the slow seed network (default 2)")
    p.add_argument("--archs", default="seed,fast", help="comma-separated architectures (default seed,fast)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, auto (default fp32,bf16)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--view-gate", type=float, default=0.95, help="reader view gate of shipped-gated (default 0.95)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, _ = synthetic_batch(args.batch, seed=0)
    train_images, train_targets = synthetic_batch(args.train_batch, seed=1)
    images, train_images = [i.to(device) for i in images], [i.to(device) for i in train_images]
    train_targets = [{k: v.to(device) for k, v in t.items()} for t in train_targets]
    precisions = list(dict.fromkeys(resolve_precision(x, device) for x in args.precisions.split(",")))
    rows: dict[tuple[str, str], tuple[int, float, float]] = {}
    for arch in args.archs.split(","):
        model = _model(arch, args.view_gate).to(device)
        iters = args.seed_iters if arch == "seed" else args.iters
        params = sum(p.numel() for p in model.parameters())
        for precision in precisions:
            infer = bench_inference(model, images, iters, precision, device)
            train = bench_training(model, train_images, train_targets, iters, precision, device)
            rows[arch, precision] = (params, infer, train)
            print(f"  measured {arch} {precision}: inference {infer:.1f} img/s, training {train:.1f} img/s", flush=True)

    print(f"\n{HEIGHT}x{WIDTH} images on {device}, {args.threads} threads, inference batch {args.batch}, "
          f"training batch {args.train_batch}")
    print(f"{'arch':<14} {'precision':<10} {'params':>12} {'infer img/s':>12} {'train img/s':>12}")
    for (arch, precision), (params, infer, train) in rows.items():
        print(f"{arch:<14} {precision:<10} {params:>12,} {infer:>12.1f} {train:>12.1f}")
    base = rows.get(("seed", "fp32"))
    if base is not None:
        for (arch, precision), (_, infer, train) in rows.items():
            if (arch, precision) != ("seed", "fp32"):
                print(f"{arch} {precision} / seed fp32: inference x{infer / base[1]:.1f}, training x{train / base[2]:.1f}")
    for arch in dict.fromkeys(a for a, _ in rows):
        if (arch, "fp32") in rows and (arch, "bf16") in rows:
            (_, fi, ft), (_, bi, bt) = rows[arch, "fp32"], rows[arch, "bf16"]
            print(f"{arch} bf16 / fp32: inference x{bi / fi:.2f}, training x{bt / ft:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
