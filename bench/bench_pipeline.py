"""Throughput of the whole queue against the detector alone, measured in the same run.

    python bench/bench_pipeline.py [--images 1000] [--checkpoint PATH] [--batch-size 32] [--device cpu]
    python bench/bench_pipeline.py --enqueue-only 100000 [--database-url URL]

Pipeline mode, on ``--images`` synthetic CAPTCHAs:
  (a) in-process: ``Detector.predict`` on all the paths (batched, grouped by width), all torch threads;
  (b) end to end: ``enqueue`` → Redis → one worker subprocess (one process, all torch threads) → rows committed in
      SQLite, timed from the start of ``enqueue`` until every image is done;
and the ratio (b) / (a). Both are steady-state figures: each side first makes one untimed pass over the same images
(model loading, per-shape kernel selection), then one timed pass.

Enqueue-only mode: ten images hard-linked N times in all, then scan + register + publish timed as ``enqueue`` does it
(paths/s). The messages are deleted from Redis afterwards.

Redis: ``CAPTCHA_BROKER_URL`` when it answers, else a private server for the run. Nothing is written to the repo.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import get_settings  # noqa: E402
from producer.enqueue import enqueue, wait_for_job  # noqa: E402
from producer.local_redis import local_redis  # noqa: E402


def resolve_checkpoint(path: str | None, workdir: Path) -> Path:
    """``--checkpoint``, else ``CAPTCHA_CHECKPOINT`` or the shipped one, else a seeded random model (noted)."""
    from core.checkpoint import default_checkpoint_path, save_checkpoint

    if path:
        return Path(path)
    configured = get_settings().checkpoint or default_checkpoint_path()
    if Path(configured).exists():
        return Path(configured)
    import torch

    from core.models import build_model

    print(f"note: no checkpoint at {configured}; timing a seeded random 'fast' model with a sharpened classifier")
    torch.manual_seed(0)
    model = build_model("fast")
    with torch.no_grad():
        model.box_head.cls.weight.normal_(0.0, 50.0)
        model.box_head.cls.bias[-1] = -20.0
    return save_checkpoint(model, workdir / "random.safetensors", {"version": "bench-random"})


def in_process(checkpoint: Path, paths: list[Path], batch_size: int, device: str) -> float:
    """Images/s of ``Detector.predict`` over ``paths`` (second of two passes)."""
    import torch

    from core.detector import Detector

    torch.set_num_threads(os.cpu_count() or 1)
    detector = Detector.load(checkpoint, device=device)
    detector.predict(paths, batch_size=batch_size)
    start = time.perf_counter()
    detector.predict(paths, batch_size=batch_size)
    return len(paths) / (time.perf_counter() - start)


def end_to_end(
    checkpoint: Path, folder: Path, n: int, batch_size: int, device: str, workdir: Path
) -> tuple[float, float, str]:
    """Images/s from ``enqueue`` to the last row committed (second of two jobs), the same from the database's
    timestamps, and the broker used."""
    from db.session import upgrade
    from worker.process import WorkerProcess

    database_url = f"sqlite:///{workdir / 'bench.db'}"
    upgrade(database_url)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    with local_redis(get_settings().broker_url) as broker:
        env = {"CAPTCHA_BROKER_URL": broker, "CAPTCHA_DATABASE_URL": database_url, "CAPTCHA_CHECKPOINT": str(checkpoint)}
        with WorkerProcess(workdir / "worker.log", queues=queue, concurrency=1, device=device,
                           batch_size=batch_size, env=env):  # fmt: skip
            for attempt in ("warm-up", "timed"):
                start = time.perf_counter()
                sent = enqueue([folder], force=True, queue=queue, database_url=database_url, broker_url=broker)
                waited = wait_for_job(sent.job_id, database_url=database_url, poll_s=0.1)
                elapsed = time.perf_counter() - start
                assert waited.done + waited.failed == n, f"{attempt}: {waited}"
    return n / elapsed, waited.images_per_s, broker


def bench_pipeline(args: argparse.Namespace, workdir: Path) -> None:
    from core.synth import generate

    folder = workdir / "captchas"
    generate(folder, args.images, seed=0, progress=False)
    images = folder / "images"
    paths = sorted(images.glob("*.png"))
    checkpoint = resolve_checkpoint(args.checkpoint, workdir)
    print(f"{len(paths)} synthetic CAPTCHAs, checkpoint {checkpoint}, device {args.device}, "
          f"batch {args.batch_size}, {os.cpu_count()} cores")  # fmt: skip

    detector_rate = in_process(checkpoint, paths, args.batch_size, args.device)
    print(f"(a) detector in-process      {detector_rate:8.1f} images/s")
    pipeline_rate, db_rate, broker = end_to_end(checkpoint, images, len(paths), args.batch_size, args.device, workdir)
    print(f"(b) enqueue → worker → rows  {pipeline_rate:8.1f} images/s   "
          f"(first enqueued → last finished: {db_rate:.1f} images/s; broker {broker})")  # fmt: skip
    print(f"ratio (b)/(a)                {pipeline_rate / detector_rate:8.2f}   (target >= 0.90)")


def bench_enqueue(args: argparse.Namespace, workdir: Path) -> None:
    import redis

    from core.synth import render_captcha
    from db.session import upgrade
    from producer.scan import scan

    n = args.enqueue_only
    folder = workdir / "many"
    folder.mkdir()
    # a few distinct images, each linked many times (a file system caps the links of one inode, ext4 at 65,000)
    sources = []
    for k in range(10):
        image, _ = render_captcha(f"abc{k}", random.Random(k))
        sources.append(workdir / f"source-{k}.png")
        image.save(sources[-1])
    start = time.perf_counter()
    for i in range(n):
        os.link(sources[i % len(sources)], folder / f"abc{i % len(sources)}-{i}.png")
    print(f"{n} hard links to {len(sources)} images made in {time.perf_counter() - start:.1f} s")

    database_url = args.database_url or f"sqlite:///{workdir / 'enqueue.db'}"
    upgrade(database_url)
    start = time.perf_counter()
    found = sum(1 for _ in scan([folder]))
    scan_s = time.perf_counter() - start
    queue = f"bench-enqueue-{uuid.uuid4().hex[:8]}"
    with local_redis(get_settings().broker_url) as broker:
        try:
            report = enqueue([folder], queue=queue, database_url=database_url, broker_url=broker)
        finally:
            client = redis.Redis.from_url(broker)
            client.delete(queue, *client.keys(f"_kombu.binding*.{queue}"))
            client.close()
    assert report.enqueued == found == n, report
    print(f"scan alone: {scan_s:.2f} s ({found / scan_s:,.0f} paths/s)")
    print(f"enqueue {n} paths (scan + register + publish), {report.messages} messages, database "
          f"{database_url.split(':', 1)[0]}: {report.seconds:.1f} s = {n / report.seconds:,.0f} paths/s "
          f"(target: under 30 s)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--checkpoint")
    parser.add_argument("--batch-size", type=int, default=get_settings().batch_size)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--enqueue-only", type=int, metavar="N", help="only time enqueueing N paths")
    parser.add_argument("--database-url", help="enqueue-only: database to register into (default: a fresh SQLite)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.enqueue_only:
            bench_enqueue(args, workdir)
        else:
            bench_pipeline(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
