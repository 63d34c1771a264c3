"""Throughput of the ``seed`` and ``fast`` detectors, measured in the same run on synthetic 80x455 CAPTCHAs.

    python bench/bench_models.py [--threads 2] [--iters 5] [--batch 32] [--train-batch 8]

Prints images/s for inference (eval mode, ``torch.inference_mode``, batch ``--batch``) and training (forward,
backward and an AdamW step at batch ``--train-batch``, 4-8 boxes per image), and the fast/seed ratios. Each figure
is the median over ``--iters`` timed iterations after one warm-up; the seed trains for ``--seed-train-iters`` only.
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


def _median_rate(fn, n_images: int, iters: int) -> float:
    fn()  # warm-up (allocator, oneDNN kernel selection, anchor cache)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n_images / statistics.median(times)


def bench_inference(model: torch.nn.Module, images: list[torch.Tensor], iters: int) -> float:
    model.eval()

    def run() -> None:
        with torch.inference_mode():
            model(images)

    return _median_rate(run, len(images), iters)


def bench_training(model: torch.nn.Module, images: list[torch.Tensor], targets: list[dict], iters: int) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        losses = model(images, targets)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()

    return _median_rate(step, len(images), iters)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per figure (default 5)")
    p.add_argument("--batch", type=int, default=32, help="inference batch size (default 32)")
    p.add_argument("--train-batch", type=int, default=8, help="training batch size (default 8)")
    p.add_argument("--seed-iters", type=int, default=2, help="timed iterations for the slow seed network (default 2)")
    p.add_argument("--archs", default="seed,fast", help="comma-separated architectures (default seed,fast)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, _ = synthetic_batch(args.batch, seed=0)
    train_images, train_targets = synthetic_batch(args.train_batch, seed=1)
    rows: dict[str, tuple[int, float, float]] = {}
    for arch in args.archs.split(","):
        model = build_model(arch)
        iters = args.seed_iters if arch == "seed" else args.iters
        params = sum(p.numel() for p in model.parameters())
        infer = bench_inference(model, images, iters)
        train = bench_training(model, train_images, train_targets, iters)
        rows[arch] = (params, infer, train)
        print(f"  measured {arch}: inference {infer:.1f} img/s, training {train:.1f} img/s", flush=True)

    print(f"\n{HEIGHT}x{WIDTH} images, {args.threads} threads, inference batch {args.batch}, "
          f"training batch {args.train_batch}")
    print(f"{'arch':<6} {'params':>12} {'infer img/s':>12} {'train img/s':>12}")
    for arch, (params, infer, train) in rows.items():
        print(f"{arch:<6} {params:>12,} {infer:>12.1f} {train:>12.1f}")
    if "seed" in rows and "fast" in rows:
        (_, si, st), (_, fi, ft) = rows["seed"], rows["fast"]
        print(f"fast/seed: inference x{fi / si:.1f}, training x{ft / st:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
