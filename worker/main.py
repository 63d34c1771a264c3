"""Starting a Celery worker for the decode queue (``captcha-queue worker``).

Pool choice: one process (``solo`` pool: no fork at all) unless ``concurrency`` > 1 on CPU, where prefork children
each load their own detector on their first message. A CUDA device always gets ``solo`` with one process: run one
worker per GPU (``--device cuda:0``, ``--device cuda:1``, ...). The parent never imports torch, so nothing touches
CUDA before a fork. Torch intra-op threads per process default to cores / concurrency.
"""

from __future__ import annotations

import os
import socket

from core.celery_app import DECODE_QUEUE, app
from core.config import get_settings
from worker.runtime import torch_threads

POOLS = ("auto", "solo", "prefork", "threads")


class WorkerConfigError(ValueError):
    """Options that cannot work together (e.g. several processes on one CUDA device)."""


def worker_argv(
    queues: str = DECODE_QUEUE,
    concurrency: int = 1,
    device: str = "auto",
    pool: str = "auto",
    loglevel: str = "info",
    hostname: str | None = None,
) -> list[str]:
    """The ``celery worker`` arguments for these options; raises ``WorkerConfigError`` for impossible ones."""
    if concurrency < 1:
        raise WorkerConfigError("--concurrency must be at least 1")
    if pool not in POOLS:
        raise WorkerConfigError(f"--pool must be one of {', '.join(POOLS)}")
    if device.startswith("cuda"):
        if concurrency != 1 or pool not in ("auto", "solo"):
            raise WorkerConfigError(
                "a CUDA worker runs one process (--concurrency 1, solo pool); start one worker per GPU "
                "with --device cuda:0, --device cuda:1, ..."
            )
        pool = "solo"
    elif pool == "auto":
        pool = "solo" if concurrency == 1 else "prefork"
    if pool == "solo" and concurrency != 1:
        raise WorkerConfigError("the solo pool runs one process: use --concurrency 1 or --pool prefork")
    name = hostname or f"decode-{os.getpid()}@{socket.gethostname()}"
    return [
        "worker",
        f"--queues={queues}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--loglevel={loglevel}",
        f"--hostname={name}",
        "--without-gossip",
        "--without-mingle",
    ]


def start_worker(
    queues: str = DECODE_QUEUE,
    concurrency: int = 1,
    device: str | None = None,
    batch_size: int | None = None,
    pool: str = "auto",
    loglevel: str = "info",
    hostname: str | None = None,
) -> None:
    """Run a worker in this process until it is stopped (SIGTERM: warm shutdown, running messages finish)."""
    settings = get_settings()
    device = device or settings.device
    argv = worker_argv(queues, concurrency, device, pool, loglevel, hostname)
    # pool processes read their settings from the environment they inherit
    os.environ["CAPTCHA_DEVICE"] = device
    os.environ["CAPTCHA_BATCH_SIZE"] = str(batch_size or settings.batch_size)
    os.environ["CAPTCHA_TORCH_THREADS"] = str(torch_threads(settings, concurrency))
    get_settings.cache_clear()
    app.worker_main(argv)
