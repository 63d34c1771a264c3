"""Throughput of the whole queue against the detector alone, measured in the same run.

    python bench/bench_pipeline.py [--images 1000] [--repeat 3] [--checkpoint PATH] [--batch-size 32] [--device cpu]
    python bench/bench_pipeline.py --enqueue-only 100000 [--database-url URL]

Pipeline mode, on ``--images`` synthetic CAPTCHAs:
  (a) in-process: ``Detector.predict`` on all the paths (batched, grouped by aspect ratio), all torch threads;
  (b) end to end: ``enqueue`` → Redis → one worker subprocess (one process, all torch threads) → rows committed in
      SQLite, timed from the start of ``enqueue`` until every image is done;
and the ratio (b) / (a). Both are steady-state figures: each side first makes one untimed pass over the same images
(model loading, per-shape kernel selection); then ``--repeat`` rounds alternate (a) and (b), so that other load on
the machine hits both alike, and the best and median of each are printed, with the CPU time each side spends per
image (the bench process for (a); the bench process, which enqueues and polls, plus the worker process for (b)),
a figure that other load on the machine disturbs far less than wall time.

Enqueue-only mode: ten images hard-linked N times in all, then scan + register + publish timed as ``enqueue`` does it
(paths/s). The messages are deleted from Redis afterwards.

Redis: ``CAPTCHA_BROKER_URL`` when it answers, else a private server for the run. Nothing is written to the repo.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # sample_models: the fallback model

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
    from sample_models import sharpened_random_model

    print(f"note: no checkpoint at {configured}; timing a seeded random 'fast' model with a sharpened class layer")
    return save_checkpoint(sharpened_random_model(), workdir / "random.safetensors", {"version": "bench-random"})


def bench_pipeline(args: argparse.Namespace, workdir: Path) -> None:
    import torch

    from core.detector import Detector
    from core.synth import generate
    from db.session import upgrade
    from worker.process import WorkerProcess

    folder = workdir / "captchas"
    generate(folder, args.images, seed=0, progress=False)
    images = folder / "images"
    paths = sorted(images.glob("*.png"))
    n = len(paths)
    checkpoint = resolve_checkpoint(args.checkpoint, workdir)
    print(f"{n} synthetic CAPTCHAs, checkpoint {checkpoint}, device {args.device}, batch {args.batch_size}, "
          f"{os.cpu_count()} cores, {args.repeat} rounds")  # fmt: skip

    torch.set_num_threads(os.cpu_count() or 1)
    detector = Detector.load(checkpoint, device=args.device)

    def in_process() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        detector.predict(paths, batch_size=args.batch_size)
        return n / (time.perf_counter() - start), (time.process_time() - cpu) * 1000 / n

    database_url = f"sqlite:///{workdir / 'bench.db'}"
    upgrade(database_url)
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    with local_redis(get_settings().broker_url) as broker:
        env = {"CAPTCHA_BROKER_URL": broker, "CAPTCHA_DATABASE_URL": database_url, "CAPTCHA_CHECKPOINT": str(checkpoint)}
        with WorkerProcess(workdir / "worker.log", queues=queue, concurrency=1, device=args.device,
                           batch_size=args.batch_size, env=env) as worker:  # fmt: skip

            def end_to_end() -> tuple[float, float]:
                start, cpu, worker_cpu = time.perf_counter(), time.process_time(), cpu_seconds(worker.process.pid)
                sent = enqueue([images], force=True, queue=queue, database_url=database_url, broker_url=broker)
                waited = wait_for_job(sent.job_id, database_url=database_url, poll_s=0.1)
                assert waited.done + waited.failed == n, waited
                used = time.process_time() - cpu + cpu_seconds(worker.process.pid) - worker_cpu
                return n / (time.perf_counter() - start), used * 1000 / n

            # untimed pass on each side: model loading, per-shape kernel selection, file cache
            in_process()
            end_to_end()
            # alternate the two so that load from other processes on the machine hits both alike
            runs: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}
            for _ in range(args.repeat):
                runs["a"].append(in_process())
                runs["b"].append(end_to_end())

    rate = {k: [r for r, _ in v] for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    best_a, best_b = max(rate["a"]), max(rate["b"])
    med_a, med_b = statistics.median(rate["a"]), statistics.median(rate["b"])
    print(f"(a) detector in-process      best {best_a:7.1f}  median {med_a:7.1f} images/s   CPU {cpu['a']:6.1f} ms/image")
    print(f"(b) enqueue → worker → rows  best {best_b:7.1f}  median {med_b:7.1f} images/s   CPU {cpu['b']:6.1f} ms/image"
          f"   (broker {broker})")  # fmt: skip
    print(f"ratio (b)/(a)                best {best_b / best_a:7.2f}  median {med_b / med_a:7.2f}   (target >= 0.90); "
          f"CPU per image (a)/(b) {cpu['a'] / cpu['b']:.2f}")  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``); its worker threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds, alternating (a) and (b)")
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
