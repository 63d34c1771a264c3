"""Starting a Celery worker for the decode queue (``captcha-queue worker``).

Pool choice: one process (``solo`` pool: no fork at all) unless ``concurrency`` > 1 on CPU, where prefork children
each load their own detector on their first message. A CUDA device always gets ``solo`` with one process: run one
worker per GPU (``--device cuda:0``, ``--device cuda:1``, ...). ``--device auto`` with several processes is asked
whether it would mean the GPU, by a short-lived child process (``resolve_worker_device``), and is then held to the
same rule. The parent never imports torch, so nothing touches CUDA before a fork. Torch intra-op threads per process
default to cores / concurrency.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from collections.abc import Callable

from core.celery_app import DECODE_QUEUE, app
from core.config import get_settings, is_device_name
from worker.runtime import torch_threads

POOLS = ("auto", "solo", "prefork", "threads")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


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
    if not is_device_name(device):
        raise WorkerConfigError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if pool not in POOLS:
        raise WorkerConfigError(f"--pool must be one of {', '.join(POOLS)}")
    if loglevel.upper() not in LOG_LEVELS:
        raise WorkerConfigError(f"--loglevel {loglevel!r}: expected {', '.join(level.lower() for level in LOG_LEVELS)}")
    queues = ",".join(name.strip() for name in queues.split(",") if name.strip())
    if not queues:
        raise WorkerConfigError("--queues names no queue (e.g. --queues decode or --queues decode,train)")
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
        f"--loglevel={loglevel.upper()}",
        f"--hostname={name}",
        "--without-gossip",
        "--without-mingle",
    ]


def cuda_devices_in_child(python: str = sys.executable) -> int:
    """How many CUDA devices PyTorch sees, asked in a child process so that this one never touches CUDA. Raises
    ``WorkerConfigError`` when the child cannot tell (it failed or hung): guessing "no GPU" could start several
    processes on one."""
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
        return int(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        detail = exc.stderr.strip().splitlines()[-1] if getattr(exc, "stderr", None) else str(exc)
        raise WorkerConfigError(
            f"could not ask PyTorch how many GPUs there are ({detail}); pass --device cpu, or check the installation"
        ) from None


def resolve_worker_device(
    device: str, concurrency: int, pool: str, cuda_count: Callable[[], int] = cuda_devices_in_child
) -> str:
    """``device``, except that ``auto`` becomes ``cuda`` where it would pick the GPU and the pool could run several
    processes or threads (``worker_argv`` then refuses them, as for an explicit ``--device cuda``). A single solo
    process keeps ``auto``, resolved when its detector loads, without asking."""
    if device != "auto" or (concurrency == 1 and pool in ("auto", "solo")):
        return device
    return "cuda" if cuda_count() > 0 else device


def champion_in_database(url: str | None = None) -> bool:
    """Whether the database names a champion version (which a worker serves before ``CAPTCHA_CHECKPOINT``). False
    when it cannot tell: no such SQLite file (none is created), no schema, or no answer."""
    from sqlalchemy import select
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from db.models import ModelVersion
    from db.session import database_url, session_factory

    url = database_url(url)
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and (not parsed.database or not os.path.isfile(parsed.database)):
            return False
        with session_factory(url)() as session:
            return session.scalar(select(ModelVersion.id).where(ModelVersion.status == "champion").limit(1)) is not None
    except SQLAlchemyError:
        return False


def check_before_start(
    device: str,
    checkpoint: str | os.PathLike | None,
    cuda_count: Callable[[], int] = cuda_devices_in_child,
    champion: Callable[[], bool] = champion_in_database,
) -> None:
    """Refuse to start (``WorkerConfigError``) a worker that could only fail every image it takes: a configured
    checkpoint file that does not exist while the database has no champion to serve instead, or a CUDA device that
    PyTorch does not see (asked in a child process)."""
    if checkpoint is not None and not os.path.isfile(checkpoint) and not champion():
        raise WorkerConfigError(
            f"CAPTCHA_CHECKPOINT {checkpoint}: no such file, and the database names no champion version to serve "
            "instead (or could not be asked)"
        )
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        count = cuda_count()
        if index >= count:
            raise WorkerConfigError(f"--device {device}: PyTorch sees {count} CUDA device(s) here (use --device cpu)")


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
    cuda_count = functools.cache(cuda_devices_in_child)  # one child process asks, at most
    device = resolve_worker_device(device or settings.device, concurrency, pool, cuda_count)
    argv = worker_argv(queues, concurrency, device, pool, loglevel, hostname)
    check_before_start(device, settings.checkpoint, cuda_count, lambda: champion_in_database(settings.database_url))
    # pool processes read their settings from the environment they inherit
    os.environ["CAPTCHA_DEVICE"] = device
    os.environ["CAPTCHA_BATCH_SIZE"] = str(batch_size or settings.batch_size)
    os.environ["CAPTCHA_TORCH_THREADS"] = str(torch_threads(settings, concurrency))
    get_settings.cache_clear()
    app.worker_main(argv)
