"""Speed of synthetic CAPTCHA generation: images/s of ``core.synth.generate`` into a temporary folder.

Baseline, measured in the same run: one process (``workers=1``). The target is 10,000 images in under a minute on
a 2-core machine, so the script also prints the projected time for 10,000 images.

    python bench/bench_synth.py [--count 2000] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.synth import generate  # noqa: E402


def rate(count: int, workers: int) -> float:
    """Images per second of ``generate(count, workers=workers)`` into a fresh temporary folder."""
    with tempfile.TemporaryDirectory(prefix="bench-synth-") as tmp:
        start = time.perf_counter()
        generate(tmp, count, seed=0, workers=workers, progress=False)
        return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="images per measurement (default 2000)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes (default: cores)")
    args = parser.parse_args()

    baseline = rate(max(args.count // 4, 1), workers=1)
    measured = rate(args.count, workers=args.workers)
    print(f"baseline   workers=1 : {baseline:8.1f} images/s")
    print(f"generate   workers={args.workers} : {measured:8.1f} images/s  ({measured / baseline:.2f}x baseline)")
    print(f"projected 10,000 images: {10_000 / measured:.1f} s (target < 60 s)")


if __name__ == "__main__":
    main()
