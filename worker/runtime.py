"""Per-process worker state: the detector and the database session factory, created on first use.

Nothing here runs at import time. A Celery worker forks its pool processes (prefork) before any task runs, so the
model, torch's thread pool, CUDA and the database engine all live in the process that uses them: CUDA is never
initialised before a fork and no pooled connection is shared across one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import sessionmaker

from core.config import Settings, get_settings
from worker.hot_reload import DetectorHolder

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a worker process needs to decode messages."""

    holder: DetectorHolder  # the detector, following the champion model version (``worker.hot_reload``)
    sessions: sessionmaker
    batch_size: int
    max_pixels: int
    max_width: int
    allowed_roots: tuple[Path, ...] = field(default_factory=tuple)
    pid: int = field(default_factory=os.getpid)


def torch_threads(settings: Settings, concurrency: int = 1) -> int:
    """Intra-op threads for one worker process: ``Settings.torch_threads`` or cores / processes (at least 1)."""
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, (os.cpu_count() or 1) // max(1, concurrency))


def load_runtime(settings: Settings | None = None) -> Runtime:
    """Open the database and load the detector for this process: the champion model version, or
    ``Settings.checkpoint`` (else the shipped one) when there is none."""
    import torch

    from core.checkpoint import default_checkpoint_path
    from db.session import session_factory

    settings = settings or get_settings()
    threads = torch_threads(settings)
    torch.set_num_threads(threads)
    sessions = session_factory(settings.database_url)
    holder = DetectorHolder(sessions, settings.device, fallback=settings.checkpoint or default_checkpoint_path())
    detector = holder.current()
    log.info(
        "pid %d: detector %s from %s on %s, %d torch threads, batch size %d",
        os.getpid(),
        detector.version,
        detector.checkpoint_path,
        detector.device,
        threads,
        settings.batch_size,
    )
    return Runtime(
        holder=holder,
        sessions=sessions,
        batch_size=settings.batch_size,
        max_pixels=settings.max_image_pixels,
        max_width=settings.max_image_width,
        allowed_roots=tuple(Path(os.path.realpath(r)) for r in settings.allowed_roots),
    )
