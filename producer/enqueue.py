"""Enqueueing: register image files as a job in the database, then send their ids and paths to the workers.

Messages carry ``{"job_id": int, "images": [[image_id, path], ...]}`` (JSON, never image bytes; paths in the text
form of ``core.paths.path_to_text``, as stored in the database), up to ``Settings.paths_per_message`` paths each,
all published over one broker connection. Files are registered and sent in chunks: each chunk is committed before
its messages are sent, so a worker never receives an id the database does not have yet, and workers start on the
first chunk while the rest is still being registered. Within a chunk, images are sent ordered by aspect ratio
(``producer.aspect``), so each message holds images of similar widths.

If publishing fails, the images of that chunk and later ones that were not sent are marked ``failed`` with the
broker's error, so nothing is left ``pending`` without a message; enqueueing the folder again picks them up.

This module never imports torch: the task is sent by name.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from core.celery_app import DECODE_QUEUE, DECODE_TASK, app
from core.config import get_settings, mask_url
from core.paths import is_allowed, path_to_text, resolve_roots
from db.models import MAX_PATH_BYTES
from producer.aspect import by_aspect
from producer.scan import ScannedFile, scan

log = logging.getLogger(__name__)

REGISTER_CHUNK = 20_000


class EnqueueError(RuntimeError):
    """Enqueueing could not complete (broker unreachable, publishing failed); the message says what happened."""


@dataclass(frozen=True)
class EnqueueReport:
    job_id: int
    found: int  # image files found by the scan
    enqueued: int  # registered in the job and sent to the workers
    skipped: int  # unchanged files already pending or done (no --force)
    messages: int
    seconds: float


@dataclass(frozen=True)
class WaitReport:
    job_id: int
    total: int
    done: int
    failed: int
    pending: int
    seconds: float  # from the first image enqueued to the last one finished (or waited, if unknown)

    @property
    def images_per_s(self) -> float:
        finished = self.done + self.failed
        return finished / self.seconds if self.seconds > 0 else 0.0


def chunked(items: Sequence, size: int) -> Iterable[Sequence]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _progress(enabled: bool, description: str, total: int | None):
    """A rich progress bar on stderr (stdout carries only results, e.g. the job id)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
    task = progress.add_task(description, total=total)
    return progress, task


def check_allowed(files: Sequence[ScannedFile], allowed: Sequence[Path]) -> None:
    """Raise ``EnqueueError`` naming the files that resolve (symbolic links followed) outside ``allowed``."""
    outside = [f.path for f in files if not is_allowed(f.path, allowed)]
    if outside:
        examples = "; ".join(f"{path_to_text(p)} -> {path_to_text(os.path.realpath(p))}" for p in outside[:3])
        raise EnqueueError(
            f"{len(outside)} of {len(files)} images lie outside the allowed roots "
            f"({', '.join(str(r) for r in allowed)}; CAPTCHA_ALLOWED_ROOTS), e.g. {examples}. Nothing was enqueued."
        )


def publish(
    producer,
    job_id: int,
    images: Sequence[tuple[int, str]],
    queue: str,
    per_message: int,
    on_sent: Callable[[int], None] | None = None,
) -> int:
    """Send ``images`` ((image_id, path) pairs) as ``worker.decode`` messages on ``queue``; returns messages sent.

    ``producer`` is a kombu producer on an open connection, reused for every message. ``on_sent(n)`` is called
    after each message with the number of paths it carried.
    """
    sent = 0
    for group in chunked(images, per_message):
        app.send_task(
            DECODE_TASK,
            kwargs={"job_id": job_id, "images": [[int(i), str(p)] for i, p in group]},
            queue=queue,
            producer=producer,
        )
        sent += 1
        if on_sent is not None:
            on_sent(len(group))
    return sent


def _mark_not_sent(session, image_ids: Sequence[int], reason: str) -> None:
    import sqlalchemy as sa

    from db.models import Image

    now = datetime.now(timezone.utc)
    for ids in chunked(list(image_ids), 1000):
        session.execute(
            sa.update(Image)
            .where(Image.id.in_(ids), Image.status == "pending")
            .values(status="failed", error=f"not enqueued: {reason}", finished_at=now)
        )


def enqueue(
    roots: Iterable[str | Path],
    *,
    recursive: bool = False,
    pattern: str | None = None,
    job_name: str | None = None,
    force: bool = False,
    queue: str = DECODE_QUEUE,
    paths_per_message: int | None = None,
    database_url: str | None = None,
    broker_url: str | None = None,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
) -> EnqueueReport:
    """Create a job for the images under ``roots`` and send them to the workers; see the module docstring.

    Raises ``producer.scan.ScanError`` for a root that does not exist and ``EnqueueError`` when an image resolves
    outside ``Settings.allowed_roots`` or the broker cannot be reached (nothing registered in both cases), or when
    publishing fails midway (the unsent images are marked failed).
    """
    from db.repository import create_job, register_images
    from db.session import refresh_statistics, session_factory

    settings = get_settings()
    per_message = paths_per_message or settings.paths_per_message
    broker_url = broker_url or settings.broker_url
    started = time.perf_counter()

    files = list(scan(roots, recursive=recursive, pattern=pattern, warn=warn))
    check_allowed(files, resolve_roots(settings.allowed_roots))
    rows = []
    for f in files:
        text = path_to_text(f.path)
        if len(text.encode()) > MAX_PATH_BYTES:  # PostgreSQL would refuse its whole chunk of 20,000
            (warn or log.warning)(f"skipping {text[:80]}...: path too long to store ({len(text.encode())} bytes, "
                                  f"at most {MAX_PATH_BYTES})")  # fmt: skip
            continue
        rows.append((text, f.size, f.mtime_ns))

    with app.connection_for_write(broker_url) as conn:
        try:
            conn.ensure_connection(max_retries=1)
        except Exception as exc:  # kombu wraps every transport error differently
            raise EnqueueError(f"cannot reach the broker at {mask_url(broker_url)}: {exc}") from exc

        factory = session_factory(database_url)
        bar, task = _progress(progress, "enqueue", len(rows))
        enqueued = skipped = messages = 0
        with factory() as session, bar, app.amqp.Producer(conn) as producer:
            job = create_job(session, job_name)
            session.commit()
            job_id = job.id
            for index, chunk in enumerate(chunked(rows, REGISTER_CHUNK)):
                todo = register_images(session, job, chunk, force=force)
                session.commit()  # before reading headers, so a SQLite write lock is never held over file reads
                skipped += len(chunk) - len(todo)
                bar.advance(task, len(chunk) - len(todo))
                sent_paths = 0

                def on_sent(n: int) -> None:
                    nonlocal sent_paths
                    sent_paths += n
                    bar.advance(task, n)

                try:
                    todo = by_aspect(todo)
                    messages += publish(producer, job_id, todo, queue, per_message, on_sent)
                except BaseException as exc:  # Ctrl-C and SIGTERM too: registered but unsent is never left pending
                    reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, Exception) else "interrupted"
                    session.rollback()
                    _mark_not_sent(session, [i for i, _ in todo[sent_paths:]], reason)
                    session.commit()
                    if not isinstance(exc, Exception):
                        raise
                    rest = max(0, len(rows) - (index + 1) * REGISTER_CHUNK)
                    raise EnqueueError(
                        f"publishing to {mask_url(broker_url)} failed after {enqueued + sent_paths} images of job "
                        f"{job_id}: {reason}; {len(todo) - sent_paths} images marked failed, {rest} not registered. "
                        "Enqueue the same folders again to retry them."
                    ) from exc
                enqueued += len(todo)
            refresh_statistics(session)  # what a job added changes the planner's best indexes
            session.commit()

    return EnqueueReport(
        job_id=job_id,
        found=len(rows),
        enqueued=enqueued,
        skipped=skipped,
        messages=messages,
        seconds=time.perf_counter() - started,
    )


def wait_for_job(
    job_id: int,
    *,
    database_url: str | None = None,
    poll_s: float = 0.5,
    timeout_s: float | None = None,
    progress: bool = False,
    alive: Callable[[], bool] | None = None,
    on_stall: Callable[[float], None] | None = None,
    stall_s: float = 60.0,
) -> WaitReport:
    """Poll the database until every image of ``job_id`` is done or failed (or ``timeout_s`` passed, or ``alive``,
    asked at every poll, says that whatever decodes the job is gone).

    Shows a progress bar of (done + failed) / total when ``progress``. ``on_stall(seconds)`` is called once when no
    image has finished for ``stall_s`` seconds (no worker on the queue, or one writing to another database). Returns
    the final counts.
    """
    from db.repository import job_counts
    from db.session import session_factory

    factory = session_factory(database_url)
    started = time.perf_counter()
    bar, task = _progress(progress, f"job {job_id}", None)
    last_change, last_finished, stalled = started, -1, False
    with bar:
        while True:
            asked = time.perf_counter()
            with factory() as session:
                counts = job_counts(session, job_id, times=False)
            took = time.perf_counter() - asked
            finished = counts["done"] + counts["failed"]
            bar.update(task, total=counts["total"], completed=finished)
            if finished >= counts["total"]:
                break
            now = time.perf_counter()
            if finished != last_finished:
                last_change, last_finished = now, finished
            elif on_stall is not None and not stalled and now - last_change >= stall_s:
                stalled = True
                on_stall(now - last_change)
            if timeout_s is not None and time.perf_counter() - started > timeout_s:
                break
            if alive is not None and not alive():
                break
            # the database's time goes to the workers, however large the job; never past the timeout or 10 s
            pause = min(max(poll_s, 10 * took), 10.0)
            if timeout_s is not None:
                pause = max(0.0, min(pause, timeout_s - (time.perf_counter() - started)))
            time.sleep(pause)

    with factory() as session:
        counts = job_counts(session, job_id)
    finished = counts["done"] + counts["failed"]
    seconds = time.perf_counter() - started
    first, last = counts.get("first_enqueued_at"), counts.get("last_finished_at")
    if first is not None and last is not None and finished >= counts["total"]:
        seconds = max((last - first).total_seconds(), 1e-6)
    return WaitReport(
        job_id=job_id,
        total=counts["total"],
        done=counts["done"],
        failed=counts["failed"],
        pending=counts["pending"],
        seconds=seconds,
    )

