"""Inference throughput of ``Detector.predict`` against two baselines measured in the same run.

    python bench/bench_detector.py [--images 256] [--batch-size 32] [--checkpoint CKPT] [--threads N]

Baselines: one image per forward pass, and batches taken in input order (mixed widths padded to the widest). The
detector groups images by aspect ratio before batching, so it should beat both; the script prints images/s and ratios.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from core.detector import Detector, image_to_tensor
from core.synth import render_captcha


def _time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = random.Random(0)
    letters = "0123456789abcdefghijklmnopqrstuvwxyz"
    images = [render_captcha("".join(rng.choice(letters) for _ in range(rng.randint(4, 8))), rng)[0]
              for _ in range(args.images)]  # fmt: skip
    detector = Detector.load(args.checkpoint, device=args.device)
    model, device = detector.model, detector.device
    tensors = [image_to_tensor(img) for img in images]
    detector.predict(images[: args.batch_size], batch_size=args.batch_size)  # warm-up

    def single() -> None:
        with torch.inference_mode():
            for t in tensors:
                model([t.to(device)])

    def input_order() -> None:
        with torch.inference_mode():
            for i in range(0, len(tensors), args.batch_size):
                model([t.to(device) for t in tensors[i : i + args.batch_size]])

    def grouped() -> None:
        detector.predict(images, batch_size=args.batch_size)

    n = len(images)
    rates = {name: n / _time(fn, args.repeat) for name, fn in
             (("one image per pass", single), ("input-order batches", input_order), ("Detector.predict", grouped))}  # fmt: skip
    print(f"{detector!r}, {n} synthetic images, batch size {args.batch_size}, {torch.get_num_threads()} threads")
    for name, rate in rates.items():
        print(f"  {name:<22} {rate:8.1f} images/s")
    print(f"Detector.predict vs one image per pass:  {rates['Detector.predict'] / rates['one image per pass']:.2f}x")
    print(f"Detector.predict vs input-order batches: {rates['Detector.predict'] / rates['input-order batches']:.2f}x")


if __name__ == "__main__":
    main()
