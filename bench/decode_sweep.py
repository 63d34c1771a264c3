"""How many images the detector reads at the wrong length under other decoding thresholds.

The network runs once over a folder of ``<text>-<n>.png`` images; the candidate boxes it hands to
``select_detections`` are kept and decoded again with every combination of ``score_thresh``,
``cross_class_nms_thresh`` and ``containment_thresh`` below, counting the images with fewer or more characters than
their text. The glyph reader never changes a count, so this measures the detector alone.

    python bench/decode_sweep.py --images runs/real/train --limit 1500 [--checkpoint CKPT]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

import core.models.fast as fast_module
from core.checkpoint import default_checkpoint_path, load_checkpoint
from core.detector import image_to_tensor
from core.formats import list_images, text_from_filename
from core.images import load_image
from core.precision import autocast, resolve_precision

SCORES = (0.2, 0.3, 0.4, 0.5, 0.6)
CROSS = (0.5, 0.6, 0.7, 0.8, None)
CONTAIN = (0.7, 0.8, 0.9, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--limit", type=int, default=0, help="the first N images by name (0: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    model, _ = load_checkpoint(args.checkpoint or default_checkpoint_path(), device=torch.device("cpu"))
    model.eval()
    paths = [p for p in list_images(args.images) if text_from_filename(p)]
    paths = paths[: args.limit] if args.limit else paths
    images = [image_to_tensor(load_image(p)) for p in paths]
    lengths = [len(text_from_filename(p)) for p in paths]

    candidates = []  # per batch: (image indices, class log-probabilities, boxes, image of each box)
    original = fast_module.select_detections

    def keep(log_probs, boxes, image, **options):
        candidates.append((log_probs.float(), boxes.float(), image))
        return original(log_probs, boxes, image, **options)

    fast_module.select_detections = keep
    order = sorted(range(len(images)), key=lambda i: images[i].shape[-1])
    batches = [order[s : s + args.batch_size] for s in range(0, len(order), args.batch_size)]
    start = time.perf_counter()
    with torch.inference_mode(), autocast(resolve_precision("auto", "cpu"), "cpu"):
        for batch in batches:
            model([images[i] for i in batch])
    fast_module.select_detections = original
    print(f"{len(images)} images through the network in {time.perf_counter() - start:.1f} s")

    c = model.config

    def wrong_lengths(score: float, cross: float | None, contain: float | None) -> tuple[int, int]:
        short = long = 0
        for batch, (log_probs, boxes, image) in zip(batches, candidates):
            dets = original(log_probs, boxes, image, num_images=len(batch), score_thresh=score,
                            nms_thresh=c["nms_thresh"], detections_per_img=c["detections_per_img"],
                            cross_class_nms_thresh=cross, containment_thresh=contain,
                            num_classes=model.num_classes)  # fmt: skip
            for i, det in zip(batch, dets):
                short += len(det["labels"]) < lengths[i]
                long += len(det["labels"]) > lengths[i]
        return short, long

    shipped = (c["score_thresh"], c["cross_class_nms_thresh"], c["containment_thresh"])
    rows = []
    for thresholds in itertools.product(SCORES, CROSS, CONTAIN):
        s, l = wrong_lengths(*thresholds)
        rows.append((s + l, s, l, thresholds))
    s, l = wrong_lengths(*shipped)
    print(f"checkpoint's thresholds (score, cross-class, containment) {shipped}: {s + l} wrong lengths "
          f"({s} short, {l} long)")
    print("best ten:")
    for total, s, l, t in sorted(rows, key=lambda r: r[0])[:10]:
        print(f"  score {t[0]}, cross-class {t[1]}, containment {t[2]}: {total} ({s} short, {l} long)")


if __name__ == "__main__":
    main()
