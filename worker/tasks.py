"""Celery tasks: thin wrappers around ``worker.decode``.

The task object is created once per worker process; its ``runtime`` property loads the detector and opens the
database on the first message that process receives (never in the parent before a fork, never within the 4 s
``worker_process_init`` budget).
"""

from __future__ import annotations

import logging
import os
import threading

from celery import Task
from celery.exceptions import Reject
from sqlalchemy.exc import OperationalError

from core.celery_app import DECODE_TASK, app
from core.config import get_settings
from db.session import session_factory
from worker.decode import MessageError, decode_images, fail_all, fail_unfinished, parse_images, registered_items
from worker.runtime import Runtime, load_runtime

log = logging.getLogger(__name__)


class DecodeTask(Task):
    """Task base class holding the per-process ``Runtime`` (loaded once per process, even when several threads of
    the ``threads`` pool ask at once)."""

    _runtime: Runtime | None = None
    _lock = threading.Lock()

    @property
    def runtime(self) -> Runtime:
        with self._lock:
            if self._runtime is None or self._runtime.pid != os.getpid():
                self._runtime = load_runtime()
            return self._runtime


@app.task(
    name=DECODE_TASK,
    bind=True,
    base=DecodeTask,
    ignore_result=True,
    acks_late=True,
    autoretry_for=(OperationalError,),
    retry_backoff=5,
    # a retry waits in the worker, its message unacknowledged: past the visibility timeout Redis would hand out a
    # second copy, so the longest wait stays well under it
    retry_backoff_max=min(300, max(5, get_settings().visibility_timeout // 3)),
    max_retries=None,  # as long as the database is unreachable: giving up would leave the images pending unsent
)
def decode(self: DecodeTask, job_id: int, images: list) -> dict:
    """Decode one message's images (``[[image_id, path], ...]`` of job ``job_id``) and record the outcomes."""
    try:
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise MessageError(f"job_id must be a whole number, got {type(job_id).__name__}")
        items = parse_images(images)
    except MessageError as exc:
        job_id = job_id if isinstance(job_id, int) else "?"
        log.error("job %s: rejecting malformed message: %s", job_id, exc)
        raise Reject(str(exc), requeue=False) from exc
    items, foreign = registered_items(session_factory(get_settings().database_url), items)
    if foreign:
        log.error(
            "job %s: %d of %d images are not registered under these ids and paths in this worker's database "
            "(e.g. id %d, %r): was the job enqueued into another database? Check that the producer and the workers "
            "use the same CAPTCHA_DATABASE_URL; those images are left as they are",
            job_id, len(foreign), len(foreign) + len(items), *foreign[0],
        )  # fmt: skip
    try:
        rt = self.runtime
    except Exception as exc:
        reason = f"worker could not load the detector: {type(exc).__name__}: {exc}"
        log.exception("job %s: %s", job_id, reason)
        fail_all(items, reason)
        raise
    try:
        summary = decode_images(
            items,
            rt.holder.current(),
            rt.sessions,
            rt.batch_size,
            max_pixels=rt.max_pixels,
            max_width=rt.max_width,
            allowed_roots=rt.allowed_roots,
            refresh=rt.holder.current,
        )
    except OperationalError:
        raise  # the database is unreachable: retried (autoretry_for), nothing can be recorded now
    except Exception as exc:
        # an unexpected error is acknowledged like a success: record it, so no image stays pending without a message
        reason = f"worker error: {type(exc).__name__}: {exc}"
        marked = fail_unfinished(rt.sessions, items, reason)
        log.exception("job %s: %s; %d unfinished images marked failed", job_id, reason, marked)
        raise
    n = max(1, len(items))
    log.info(
        "job %s: %d images, %d done, %d failed; load %.1f ms/img, infer %.1f ms/img, write %.1f ms/img",
        job_id,
        len(items),
        summary.done,
        summary.failed,
        summary.load_ms / n,
        summary.infer_ms / n,
        summary.write_ms / n,
    )
    return {"done": summary.done, "failed": summary.failed}
