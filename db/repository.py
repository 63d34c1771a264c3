"""Writes of the queue: jobs, image registration, decoding outcomes, progress counts.

Every function takes a ``Session`` first and never commits: the caller owns the transaction (the worker writes one
batch of outcomes per transaction, so a batch is either fully recorded or not at all). Statements work in bulk
(a few round trips per thousand images) and are safe to repeat: a redelivered batch overwrites its rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import BigInteger, Integer, String, Text, any_, bindparam, delete, func, insert, literal, null, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from db.models import Character, Image, Job, Result, utcnow

log = logging.getLogger(__name__)

REGISTER_CHUNK = 2_000  # paths per lookup query and insert batch
# the PostgreSQL advisory lock a registration holds (any 64-bit number; this one spells "captchar" in ASCII)
REGISTER_LOCK_KEY = 0x6361707463686172
OUTCOME_CHUNK = 500  # results per multi-row upsert (well under SQLite's bound-parameter limit)

T = TypeVar("T")


@dataclass
class CharOutcome:
    """One decoded character: position in the string, box (x1, y1, x2, y2 in original pixels), score."""

    index: int
    char: str
    box: tuple[float, float, float, float]
    score: float


@dataclass
class ImageOutcome:
    """What a worker found for one image. ``done`` needs ``model_version`` and ``text``; ``failed`` an ``error``."""

    image_id: int
    status: Literal["done", "failed"]
    error: str | None = None
    model_version: str | None = None
    text: str | None = None
    score: float | None = None
    chars: list[CharOutcome] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    load_ms: float = 0.0
    infer_ms: float = 0.0


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def create_job(session: Session, name: str | None) -> Job:
    """Add a job (flushed, so ``job.id`` is set)."""
    job = Job(name=name, total=0, created_at=utcnow())
    session.add(job)
    session.flush()
    return job


def _unique_files(files: Iterable[tuple[str, int, int]]) -> Iterator[tuple[str, int | None, int | None]]:
    seen: set[str] = set()
    for path, size, mtime_ns in files:
        path = os.path.abspath(path)
        if path not in seen:
            seen.add(path)
            yield path, size, mtime_ns


def register_images(
    session: Session, job: Job, files: Iterable[tuple[str, int, int]], force: bool = False
) -> list[tuple[int, str]]:
    """Register ``(path, size, mtime_ns)`` files under ``job``; return ``(image_id, path)`` of those to enqueue.

    A file already pending or done in any job with the same size and mtime is skipped unless ``force``; a failed
    or changed file is registered again. A path the job already holds is reset to pending rather than duplicated.
    Paths are made absolute; duplicates in ``files`` count once. Works in chunks: the registration lock (held until
    the caller's transaction ends, see ``_lock_registration``), one indexed lookup, one bulk insert and at most one
    bulk update per chunk.
    """
    if job.id is None:
        session.flush()
    table = Image.__table__
    now = utcnow()
    selected: list[tuple[int, str]] = []
    inserted = 0
    for chunk in _chunks(_unique_files(files), REGISTER_CHUNK):
        _lock_registration(session, job.id)
        known: dict[str, list[Any]] = {}
        lookup = select(table.c.id, table.c.job_id, table.c.path, table.c.size, table.c.mtime_ns, table.c.status)
        for row in session.execute(lookup.where(_one_of(session, table.c.path, [path for path, _, _ in chunk]))):
            known.setdefault(row.path, []).append(row)

        keep: list[str] = []
        new_files: list[tuple[str, int | None, int | None]] = []
        reset_rows: list[dict[str, Any]] = []
        ids: dict[str, int] = {}
        for path, size, mtime_ns in chunk:
            rows = known.get(path, [])
            unchanged = any(
                r.status in ("pending", "done") and r.size == size and r.mtime_ns == mtime_ns for r in rows
            )
            if unchanged and not force:
                continue
            keep.append(path)
            own = next((r for r in rows if r.job_id == job.id), None)
            if own is None:
                new_files.append((path, size, mtime_ns))
            else:
                ids[path] = own.id
                reset_rows.append({"b_id": own.id, "size": size, "mtime_ns": mtime_ns, "status": "pending",
                                   "error": None, "enqueued_at": now, "finished_at": None})  # fmt: skip

        if new_files:
            ids.update(_insert_images(session, job.id, new_files, now))
            inserted += len(new_files)
        if reset_rows:
            session.execute(update(table).where(table.c.id == bindparam("b_id")), reset_rows)
        selected.extend((ids[path], path) for path in keep)

    if inserted:
        session.execute(update(Job).where(Job.id == job.id).values(total=Job.total + inserted))
    return selected


def _lock_registration(session: Session, job_id: int) -> None:
    """Take the lock that makes registrations one at a time, held until the caller's transaction ends.

    Two ``enqueue`` runs of overlapping folders at the same moment each looked the paths up before either had
    inserted them, so both registered, and the workers decoded, every shared file. On PostgreSQL: a
    transaction-level advisory lock; on SQLite: the database's write lock, taken by a no-op write before the lookup
    (the driver begins a transaction only at a write, and a reader never waits for a writer).
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(REGISTER_LOCK_KEY)))
    elif dialect == "sqlite":
        jobs = Job.__table__
        session.execute(update(jobs).where(jobs.c.id == job_id).values(total=jobs.c.total))


def _one_of(session: Session, column: Any, values: list[Any]) -> Any:
    """``column IN values``; on PostgreSQL as ``= ANY(array)``, one parameter instead of thousands."""
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, values, type_=postgresql.ARRAY(column.type)))
    return column.in_(values)


def _insert_images(
    session: Session, job_id: int, files: list[tuple[str, int | None, int | None]], now: datetime
) -> dict[str, int]:
    """Insert pending images of one job; return their ids by path."""
    table = Image.__table__
    if session.get_bind().dialect.name == "postgresql":
        # one statement with three array parameters: far cheaper to send and parse than a multi-row VALUES
        paths, sizes, mtimes = (list(column) for column in zip(*files))
        source = select(
            literal(job_id, Integer),
            func.unnest(bindparam(None, paths, type_=postgresql.ARRAY(Text))),
            func.unnest(bindparam(None, sizes, type_=postgresql.ARRAY(BigInteger))),
            func.unnest(bindparam(None, mtimes, type_=postgresql.ARRAY(BigInteger))),
            literal("pending", String),
            literal(now, table.c.enqueued_at.type),
        )
        stmt = insert(table).from_select(["job_id", "path", "size", "mtime_ns", "status", "enqueued_at"], source)
        rows = session.execute(stmt.returning(table.c.path, table.c.id))
    else:
        rows = session.execute(
            insert(table).returning(table.c.path, table.c.id),
            [{"job_id": job_id, "path": path, "size": size, "mtime_ns": mtime_ns, "status": "pending",
              "error": None, "model_version": None, "enqueued_at": now, "finished_at": None}
             for path, size, mtime_ns in files],
        )  # fmt: skip
    return {path: image_id for path, image_id in rows}


def record_outcomes(session: Session, outcomes: Sequence[ImageOutcome]) -> None:
    """Write one batch of outcomes (call once per batch, inside one transaction).

    ``done``: upserts the ``Result`` on (image_id, model_version), replaces its characters, marks the image done.
    ``failed``: marks the image failed with the reason, unless it is already done (a redelivered message that fails,
    say because the file went away after it was read, never undoes a result); no result row is written. If an image
    appears twice in the batch the last outcome wins. Outcomes for images that no longer exist (job deleted) are
    skipped with a warning.
    Raises ``ValueError`` on a malformed outcome before writing anything.
    """
    latest: dict[int, ImageOutcome] = {}
    for outcome in outcomes:
        _validate(outcome)
        latest[outcome.image_id] = outcome
    if not latest:
        return

    images = Image.__table__
    existing: set[int] = set()
    for chunk in _chunks(latest, REGISTER_CHUNK):
        existing.update(session.scalars(select(images.c.id).where(images.c.id.in_(chunk))))
    missing = sorted(set(latest) - existing)
    if missing:
        log.warning("skipping outcomes for %d unknown image ids (e.g. %s)", len(missing), missing[:5])
    batch = [latest[i] for i in latest if i in existing]
    now = utcnow()

    done = [o for o in batch if o.status == "done"]
    for chunk in _chunks(done, OUTCOME_CHUNK):
        result_ids = _upsert_results(session, chunk, now)
        characters = Character.__table__
        session.execute(delete(characters).where(characters.c.result_id.in_(list(result_ids.values()))))
        rows = [
            {"result_id": result_ids[(o.image_id, o.model_version)], "index": c.index, "char": c.char,
             "x1": float(c.box[0]), "y1": float(c.box[1]), "x2": float(c.box[2]), "y2": float(c.box[3]),
             "score": float(c.score)}  # fmt: skip
            for o in chunk
            for c in o.chars
        ]
        if rows:
            session.execute(insert(characters), rows)

    stmt = (
        update(images)
        .where(images.c.id == bindparam("b_id"))
        .values(
            status=bindparam("b_status"),
            error=bindparam("b_error"),
            model_version=func.coalesce(bindparam("b_version", type_=images.c.model_version.type),
                                        images.c.model_version),
            finished_at=bindparam("b_finished", type_=images.c.finished_at.type),
        )
    )  # fmt: skip
    for status, where in (("done", None), ("failed", images.c.status != "done")):
        params = [
            {"b_id": o.image_id, "b_status": o.status, "b_error": o.error if o.status == "failed" else None,
             "b_version": o.model_version, "b_finished": now}  # fmt: skip
            for o in batch
            if o.status == status
        ]
        if params:
            session.execute(stmt if where is None else stmt.where(where), params)


def _validate(outcome: ImageOutcome) -> None:
    if outcome.status == "done":
        if not outcome.model_version or outcome.text is None:
            raise ValueError(f"image {outcome.image_id}: a done outcome needs model_version and text")
        for c in outcome.chars:
            if len(c.char) != 1 or len(c.box) != 4:
                raise ValueError(f"image {outcome.image_id}: bad character {c!r}")
        if len({c.index for c in outcome.chars}) != len(outcome.chars):
            raise ValueError(f"image {outcome.image_id}: character indices repeat")
    elif outcome.status == "failed":
        if not outcome.error:
            raise ValueError(f"image {outcome.image_id}: a failed outcome needs an error")
    else:
        raise ValueError(f"image {outcome.image_id}: status must be 'done' or 'failed', not {outcome.status!r}")


def _upsert_results(
    session: Session, outcomes: Sequence[ImageOutcome], now: datetime
) -> dict[tuple[int, str], int]:
    """Insert or overwrite the results of ``outcomes``; return their ids keyed by (image_id, model_version)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as upsert
    else:
        raise NotImplementedError(f"record_outcomes supports SQLite and PostgreSQL, not {dialect}")
    results = Result.__table__
    rows = [
        {"image_id": o.image_id, "model_version": o.model_version, "text": o.text,
         "score": float(o.score if o.score is not None else _mean_score(o)),
         "width": int(o.width or 0), "height": int(o.height or 0),
         "load_ms": float(o.load_ms), "infer_ms": float(o.infer_ms), "created_at": now}  # fmt: skip
        for o in outcomes
    ]
    # one statement executed over many parameter sets ("insertmanyvalues"): compiled once and cached, where a
    # multi-row ``.values(rows)`` would be compiled again on every call
    stmt = upsert(results)
    overwrite = ("text", "score", "width", "height", "load_ms", "infer_ms", "created_at")
    stmt = stmt.on_conflict_do_update(
        index_elements=[results.c.image_id, results.c.model_version],
        set_={name: stmt.excluded[name] for name in overwrite},
    ).returning(results.c.id, results.c.image_id, results.c.model_version)
    return {(row.image_id, row.model_version): row.id for row in session.execute(stmt, rows)}


def _mean_score(outcome: ImageOutcome) -> float:
    return sum(c.score for c in outcome.chars) / len(outcome.chars) if outcome.chars else 0.0


def job_counts(session: Session, job_id: int | None = None, times: bool = True) -> dict[str, Any]:
    """Progress of one job (or all jobs): ``job_id, total, done, failed, pending, first_enqueued_at,
    last_finished_at`` (aware UTC datetimes or None). ``times=False`` leaves the two times None and counts through
    the (job_id, status) index alone, without reading the table's rows: what a poll of a large job needs."""
    columns = [Image.status, func.count()]
    if times:
        columns += [func.min(Image.enqueued_at), func.max(Image.finished_at)]
    else:
        columns += [null(), null()]
    stmt = select(*columns).group_by(Image.status)
    if job_id is not None:
        stmt = stmt.where(Image.job_id == job_id)
    counts: dict[str, Any] = {"job_id": job_id, "total": 0, "done": 0, "failed": 0, "pending": 0,
                              "first_enqueued_at": None, "last_finished_at": None}  # fmt: skip
    for status, count, first, last in session.execute(stmt):
        counts["total"] += count
        counts[status] = counts.get(status, 0) + count
        if first is not None and (counts["first_enqueued_at"] is None or first < counts["first_enqueued_at"]):
            counts["first_enqueued_at"] = first
        if last is not None and (counts["last_finished_at"] is None or last > counts["last_finished_at"]):
            counts["last_finished_at"] = last
    return counts


def fail_pending(session: Session, image_ids: Sequence[int], reason: str) -> int:
    """Mark those of ``image_ids`` still pending as failed with ``reason`` (finished ones keep their outcome).

    Returns the number of images marked.
    """
    marked = 0
    now = utcnow()
    for chunk in _chunks(image_ids, REGISTER_CHUNK):
        result = session.execute(
            update(Image)
            .where(Image.id.in_(chunk), Image.status == "pending")
            .values(status="failed", error=reason, finished_at=now)
        )
        marked += result.rowcount
    return marked


def stored_paths(session: Session, image_ids: Sequence[int]) -> dict[int, str]:
    """The stored path (text form) of each of ``image_ids`` that exists: id -> path."""
    found: dict[int, str] = {}
    for chunk in _chunks(image_ids, REGISTER_CHUNK):
        rows = session.execute(select(Image.id, Image.path).where(Image.id.in_(chunk)))
        found.update((row.id, row.path) for row in rows)
    return found
