"""Hot reload: a worker process follows the champion model version without restarting.

``DetectorHolder.current()`` is called before every batch. At most every ``poll_interval`` seconds it reads the
champion row (one indexed query); when the champion changed it loads the new version (sha256 checked against the
row for the weights and for their metadata, weights read with safetensors) and swaps it in for the following
batches, so every batch is decoded by exactly one version and every result row names it. When there is no
champion the process serves the configured checkpoint (``Settings.checkpoint`` or the shipped one).

A champion that cannot be loaded (missing file, changed bytes, weights that do not fit, no room on the device) is
refused: the error is logged and recorded, and the process keeps serving the version it has; it tries that
champion again after ``retry_after`` seconds. Every load, switch and refusal is a ``worker_events`` row (host, pid,
old and new version, time) and a log line.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import OperationalError, ProgrammingError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from db.models import ModelVersion, WorkerEvent, utcnow

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
RETRY_AFTER_S = 30.0


class DetectorHolder:
    """The detector one worker process decodes with, switched to each new champion between batches."""

    def __init__(
        self,
        sessions: sessionmaker,
        device: str,
        fallback: Path | None = None,
        poll_interval: float = POLL_INTERVAL_S,
        retry_after: float = RETRY_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sessions = sessions
        self.device = device
        self.fallback = fallback
        self.poll_interval = poll_interval
        self.retry_after = retry_after
        self.clock = clock
        self.detector: Any = None  # core.detector.Detector
        self.source: tuple | None = None  # ("version", number, sha256, path, metadata sha256) or ("checkpoint", path)
        self._next_poll = 0.0
        self._refused: dict[tuple, float] = {}  # source -> when it may be tried again
        self._lock = threading.Lock()

    def current(self) -> Any:
        """The detector for the next batch (loads the first one, or a new champion, when due). Thread-safe: the
        threads of one process share the holder and never load the same version twice."""
        with self._lock:
            now = self.clock()
            if self.detector is None or now >= self._next_poll:
                self._next_poll = now + self.poll_interval
                self._follow(now)
            return self.detector

    def _champion(self) -> ModelVersion | None:
        try:
            with self.sessions() as session:
                row = session.scalar(select(ModelVersion).where(ModelVersion.status == "champion"))
                if row is not None:
                    session.expunge(row)
                return row
        except (OperationalError, ProgrammingError) as exc:
            if self.detector is None:
                log.warning("cannot read the champion (%s); serving the configured checkpoint", exc.orig or exc)
                return None
            log.warning("cannot read the champion (%s); keeping %s", exc.orig or exc, self.detector.version)
            raise _KeepCurrent from None

    def _follow(self, now: float) -> None:
        from core.checkpoint import CheckpointError

        try:
            row = self._champion()
        except _KeepCurrent:
            return
        candidates: list[tuple] = []
        refusals: list[str] = []
        if row is not None:
            candidates.append(("version", row.number, row.sha256, row.path, row.metadata_sha256))
        if row is None or self.detector is None:  # no champion, or the champion may be refused at start
            candidates.append(("checkpoint", str(self.fallback)))
        for source in candidates:
            if source == self.source:
                return
            if self.detector is not None and self._refused.get(source, 0.0) > now:
                continue
            old = self.detector.version if self.detector is not None else None
            try:
                detector = self._load(source)
            except Exception as exc:  # a bad file (CheckpointError), or e.g. no room on the device: keep serving
                self._refused[source] = now + self.retry_after
                target = f"v{source[1]}" if source[0] == "version" else source[1]
                log.error("pid %d: refusing model %s: %s (serving %s)", os.getpid(), target, exc, old or "nothing yet")
                refusals.append(f"{target}: {exc}")
                self._record("refused", old, target, str(exc))
                continue
            self.detector, self.source = detector, source
            if old is None:
                log.info("pid %d: serving model %s from %s", os.getpid(), detector.version, detector.checkpoint_path)
                self._record("load", None, detector.version, str(detector.checkpoint_path))
            else:
                log.info("pid %d: switched model %s -> %s", os.getpid(), old, detector.version)
                self._record("switch", old, detector.version, str(detector.checkpoint_path))
            return
        if self.detector is None:
            raise CheckpointError("no model could be loaded: " + "; ".join(refusals or ["none to try"]))

    def _load(self, source: tuple) -> Any:
        from core.detector import Detector
        from core.registry import VersionRef, load_version

        if source[0] == "version":
            _, number, sha256, path, metadata_sha256 = source
            return load_version(VersionRef(number, path, sha256, metadata_sha256), device=self.device)
        return Detector.load(self.fallback, device=self.device)

    def _record(self, event: str, old: str | None, new: str | None, detail: str | None) -> None:
        try:
            with self.sessions() as session, session.begin():
                session.add(WorkerEvent(at=utcnow(), hostname=socket.gethostname(), pid=os.getpid(), event=event,
                                        old_version=old, new_version=new, detail=detail))  # fmt: skip
        except SQLAlchemyError as exc:  # an event is a record of what happened, never a reason to stop serving
            log.warning("could not record the %s event: %s", event, getattr(exc, "orig", None) or exc)


class _KeepCurrent(Exception):
    """The champion could not be read; the current detector stays."""
