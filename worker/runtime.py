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

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a worker process needs to decode messages."""

    detector: "object"  # core.detector.Detector (typed loosely so this module imports without torch)
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
    """Load the detector (``Settings.checkpoint``/``device``) and open the database for this process."""
    import torch

    from core.detector import Detector
    from db.session import session_factory

    settings = settings or get_settings()
    threads = torch_threads(settings)
    torch.set_num_threads(threads)
    detector = Detector.load(settings.checkpoint, device=settings.device)
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
        detector=detector,
        sessions=session_factory(settings.database_url),
        batch_size=settings.batch_size,
        max_pixels=settings.max_image_pixels,
        max_width=settings.max_image_width,
        allowed_roots=tuple(Path(os.path.realpath(r)) for r in settings.allowed_roots),
    )
