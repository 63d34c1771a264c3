"""Reads behind ``captcha-queue results``, ``status`` and ``render``: decoded rows, job progress, queue depth.

A result row describes one image: its job, path, status and error, and the result written by the model version of
its latest attempt (``text``, ``score``, size, characters with boxes x1, y1, x2, y2 in original pixels); the
result fields are None for pending and failed images. Every value is JSON-native (datetimes as ISO 8601 strings).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import and_, false, func, select
from sqlalchemy.orm import Session

from db.models import MAX_ID, Character, Image, Job, Result
from db.repository import job_counts

PAGE = 1_000  # images fetched per round trip while streaming results

_COLUMNS = (
    Image.id.label("image_id"),
    Image.job_id,
    Image.path,
    Image.status,
    Image.error,
    Image.model_version,
    Image.finished_at,
    Result.id.label("result_id"),
    Result.text,
    Result.score,
    Result.width,
    Result.height,
    Result.load_ms,
    Result.infer_ms,
)


def text_condition(pattern: str) -> Any:
    """SQL condition on ``Result.text`` for a glob (``*``, ``?``) or LIKE (``%``, ``_``) pattern; plain text matches
    exactly. Decoded texts are lowercase, so the pattern is lowercased."""
    like = pattern.lower().replace("*", "%").replace("?", "_")
    if "%" in like or "_" in like:
        return Result.text.like(like)
    return Result.text == like


def _shown_result() -> Any:
    """Join condition: the result of a done image's latest model version."""
    return and_(Result.image_id == Image.id, Result.model_version == Image.model_version, Image.status == "done")


def _as_id(job: int | str) -> int | None:
    """``job`` as a job id when it can be one (an int, or a string of ASCII digits, within the id column's range),
    else None: ``20240101123456`` is then a name, not an id no column could hold."""
    value = job if isinstance(job, int) else int(job) if job.isascii() and job.isdigit() else None
    return value if value is not None and 0 <= value <= MAX_ID else None


def resolve_job(session: Session, job: int | str) -> int | None:
    """The id of the job given by id or by name (a string of digits is an id when such a job exists; a name shared
    by several jobs means the latest of them); None when there is no such job."""
    job_id = _as_id(job)
    if job_id is not None and session.get(Job, job_id) is not None:
        return job_id
    if isinstance(job, int):
        return None
    return session.scalar(select(Job.id).where(Job.name == job).order_by(Job.id.desc()).limit(1))


def _job_condition(job: int | str) -> Any:
    """A job given by id (an int) or by name; a string of digits is the job with that id when there is one, else
    the jobs with that name (``enqueue --job 2024`` makes a name of digits)."""
    job_id = _as_id(job)
    if isinstance(job, int):
        return Image.job_id == job_id if job_id is not None else false()
    by_name = select(Job.id).where(Job.name == job)
    if job_id is not None:
        by_id = select(Job.id).where(Job.id == job_id)
        return Image.job_id.in_(by_id.union(by_name.where(~by_id.exists())))
    return Image.job_id.in_(by_name)


def iter_results(
    session: Session,
    job: int | str | None = None,
    status: str | None = None,
    text: str | None = None,
    min_score: float | None = None,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream result rows (see the module docstring) in image order, a page at a time; filters as ``query_results``."""
    stmt = select(*_COLUMNS).outerjoin(Result, _shown_result())
    if job is not None:
        stmt = stmt.where(_job_condition(job))
    if status is not None:
        stmt = stmt.where(Image.status == status)
    if text is not None:
        stmt = stmt.where(text_condition(text))
    if min_score is not None:
        stmt = stmt.where(Result.score >= min_score)
    last_id = 0
    remaining = limit
    while remaining is None or remaining > 0:
        page = PAGE if remaining is None else min(PAGE, remaining)
        rows = session.execute(stmt.where(Image.id > last_id).order_by(Image.id).limit(page)).all()
        if not rows:
            return
        yield from _with_characters(session, rows)
        last_id = rows[-1].image_id
        if remaining is not None:
            remaining -= len(rows)
        if len(rows) < page:
            return


def query_results(
    session: Session,
    job: int | str | None = None,
    status: str | None = None,
    text: str | None = None,
    min_score: float | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Result rows filtered by job (id or name), image status, text pattern (glob or LIKE), minimum score; at most
    ``limit`` rows, in image order. Each row: ``job, image_id, path, status, text, score, error, model_version,
    width, height, load_ms, infer_ms, finished_at, chars: [{index, char, box: [x1, y1, x2, y2], score}]``."""
    return list(iter_results(session, job=job, status=status, text=text, min_score=min_score, limit=limit))


def latest_result(session: Session, path: str) -> dict[str, Any] | None:
    """The most recently finished decoded row for the absolute ``path`` in any job, or None."""
    stmt = (
        select(*_COLUMNS)
        .join(Result, _shown_result())
        .where(Image.path == path)
        .order_by(Image.finished_at.desc(), Image.id.desc())
        .limit(1)
    )
    rows = session.execute(stmt).all()
    return next(iter(_with_characters(session, rows)), None)


def _with_characters(session: Session, rows: list[Any]) -> list[dict[str, Any]]:
    result_ids = [row.result_id for row in rows if row.result_id is not None]
    chars: dict[int, list[dict[str, Any]]] = {}
    if result_ids:
        stmt = select(Character).where(Character.result_id.in_(result_ids)).order_by(Character.index)
        for c in session.scalars(stmt):
            chars.setdefault(c.result_id, []).append(
                {"index": c.index, "char": c.char, "box": [c.x1, c.y1, c.x2, c.y2], "score": c.score}
            )
    return [
        {
            "job": row.job_id,
            "image_id": row.image_id,
            "path": row.path,
            "status": row.status,
            "text": row.text,
            "score": row.score,
            "error": row.error,
            "model_version": row.model_version,
            "width": row.width,
            "height": row.height,
            "load_ms": row.load_ms,
            "infer_ms": row.infer_ms,
            "finished_at": row.finished_at.isoformat() if row.finished_at else None,
            "chars": chars.get(row.result_id, []) if row.result_id is not None else [],
        }
        for row in rows
    ]


def job_status(session: Session, job_id: int | None = None) -> dict[str, Any]:
    """``job_counts`` plus ``images_per_s`` (finished images over the time from the first enqueue to the last
    finish) and ``eta_s`` (pending / images_per_s; None while nothing has finished)."""
    counts = job_counts(session, job_id)
    finished = counts["done"] + counts["failed"]
    rate = None
    first, last = counts["first_enqueued_at"], counts["last_finished_at"]
    if finished and first is not None and last is not None:
        span = (last - first).total_seconds()
        if span > 0:
            rate = finished / span
    counts["images_per_s"] = rate
    counts["eta_s"] = counts["pending"] / rate if rate else (0.0 if counts["pending"] == 0 else None)
    return counts


def list_jobs(session: Session, limit: int = 20) -> list[dict[str, Any]]:
    """The latest ``limit`` jobs, newest first: ``id, name, created_at, total, done, failed, pending``."""
    jobs = session.scalars(select(Job).order_by(Job.id.desc()).limit(limit)).all()
    counts: dict[int, dict[str, int]] = {job.id: {"done": 0, "failed": 0, "pending": 0} for job in jobs}
    if jobs:
        stmt = (
            select(Image.job_id, Image.status, func.count())
            .where(Image.job_id.in_(list(counts)))
            .group_by(Image.job_id, Image.status)
        )
        for job_id, status, count in session.execute(stmt):
            counts[job_id][status] = count
    return [
        {"id": job.id, "name": job.name, "created_at": job.created_at, "total": job.total, **counts[job.id]}
        for job in jobs
    ]


def queue_depth(broker_url: str, queue: str = "decode") -> int | None:
    """Messages waiting in the Redis broker's ``queue`` (``LLEN``); None when the broker cannot be reached."""
    import redis

    try:
        client = redis.Redis.from_url(broker_url, socket_connect_timeout=1.0, socket_timeout=1.0)
        try:
            return int(client.llen(queue))
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return None
