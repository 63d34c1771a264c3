"""Decoding one message: load its images, run the detector in batches, write each batch in one transaction.

The detector pads every image of a batch to the widest one, so a message is first ordered by aspect ratio (read
from the file headers) and cut into batches of ``batch_size`` neighbours in width. Reading the next batch (PNG
decoding, in background threads) and writing the previous one (a writer thread) overlap inference on the current
one. An image that cannot be read becomes a ``failed`` outcome with a readable reason and the rest of the batch goes
on; if inference fails for a batch, its images are retried one by one so only the offending image fails. Writes go
through ``db.repository.record_outcomes``, which upserts, so a redelivered message rewrites the same rows.
"""

from __future__ import annotations

import logging
import os
import reprlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from core.images import ImageError, load_image, read_aspect
from core.paths import is_allowed, safe_text, text_to_path
from db.models import MAX_ID, Result
from db.repository import CharOutcome, ImageOutcome, fail_pending, record_outcomes, stored_paths

MAX_MESSAGE_IMAGES = 10_000  # a message carries Settings.paths_per_message images (default 64, at most this)

log = logging.getLogger(__name__)

WRITE_ATTEMPTS = 4


class MessageError(ValueError):
    """A message whose ``images`` field is not a list of ``[image_id, path]`` pairs."""


@dataclass(frozen=True)
class DecodeSummary:
    done: int
    failed: int
    load_ms: float  # total over the message
    infer_ms: float
    write_ms: float


@dataclass
class _Loaded:
    image_id: int
    path: str
    image: Image.Image | None
    error: str | None
    load_ms: float


def parse_images(raw: object) -> list[tuple[int, str]]:
    """Validate a message's ``images`` field (JSON: ``[[image_id, path], ...]``, at most ``MAX_MESSAGE_IMAGES``);
    an image listed twice is decoded once."""
    if not isinstance(raw, list):
        raise MessageError(f"'images' must be a list, got {type(raw).__name__}")
    if len(raw) > MAX_MESSAGE_IMAGES:
        raise MessageError(f"{len(raw)} images in one message, more than {MAX_MESSAGE_IMAGES}")
    parsed: dict[tuple[int, str], None] = {}
    for entry in raw:
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 2
            or not isinstance(entry[0], int)
            or isinstance(entry[0], bool)
            or not isinstance(entry[1], str)
        ):
            raise MessageError(f"malformed entry {reprlib.repr(entry)}: expected [image_id, path]")
        if not 1 <= entry[0] <= MAX_ID:
            raise MessageError(f"image id {entry[0]} out of range (1 to {MAX_ID})")
        parsed[(entry[0], entry[1])] = None
    return list(parsed)


def _resolve(path: str) -> str | None:
    """The file-system path (links followed) of a path in the queue's text form; None for one with a NUL byte."""
    try:
        return os.path.realpath(text_to_path(path))
    except ValueError:
        return None


def probe_aspect(path: str, allowed_roots: Sequence[Path] = ()) -> float:
    """Width / height from the file header (``core.images.read_aspect``); 0.0 when it cannot be read or lies outside
    the allowed roots (``load_batch`` then gives the reason). ``path`` is in the queue's text form."""
    fs_path = _resolve(path)
    if fs_path is None or not is_allowed(fs_path, allowed_roots):
        return 0.0
    return read_aspect(fs_path)


def plan_batches(
    items: Sequence[tuple[int, str]], batch_size: int, allowed_roots: Sequence[Path] = ()
) -> list[list[int]]:
    """Indices into ``items`` in batches of at most ``batch_size``, ordered by aspect ratio (from the file headers).

    The detector pads a batch to its widest image, so neighbours in width share a batch; unreadable files (aspect
    0) come first and fail when loaded.
    """
    aspects = [probe_aspect(path, allowed_roots) for _, path in items]
    order = sorted(range(len(items)), key=aspects.__getitem__)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def load_batch(
    items: Sequence[tuple[int, str]],
    max_pixels: int,
    max_width: int,
    allowed_roots: Sequence[Path] = (),
) -> list[_Loaded]:
    """Read every image of a batch; failures carry their reason instead of an image.

    Paths are in the queue's text form. Each is resolved (symbolic links followed) once; the resolved path is both
    checked against ``allowed_roots`` and opened, so a link cannot lead outside the roots.
    """
    loaded = []
    for image_id, path in items:
        start = time.perf_counter()
        image, error = None, None
        fs_path = _resolve(path)
        if fs_path is None:
            error = "invalid path (contains a NUL byte)"
        elif not is_allowed(fs_path, allowed_roots):
            error = "path outside the allowed roots (CAPTCHA_ALLOWED_ROOTS)"
        else:
            try:
                image = load_image(fs_path, max_pixels=max_pixels, max_width=max_width)
            except ImageError as exc:
                error = safe_text(str(exc))
            except Exception as exc:  # a decoder bug on a hostile file fails this image, not the batch
                error = safe_text(f"cannot decode image: {type(exc).__name__}: {exc}")
        loaded.append(_Loaded(image_id, path, image, error, (time.perf_counter() - start) * 1000))
    return loaded


def _predict(detector, images: list[Image.Image]) -> list[object | Exception]:
    """Predictions for ``images`` in one call; if it fails, each image alone (its exception in place of a result)."""
    try:
        return list(detector.predict(images, batch_size=len(images)))
    except Exception:  # one bad input must not fail the others
        log.exception("inference failed for a batch of %d images; retrying image by image", len(images))
    results: list[object | Exception] = []
    for image in images:
        try:
            results.append(detector.predict([image], batch_size=1)[0])
        except Exception as exc:
            results.append(exc)
    return results


MAX_TEXT = Result.__table__.c.text.type.length  # a longer string could not be stored: the image fails instead


def infer_batch(detector, loaded: Sequence[_Loaded]) -> list[ImageOutcome]:
    """Run the detector once on the readable images of ``loaded``; one outcome per input, in order."""
    ok = [item for item in loaded if item.image is not None]
    start = time.perf_counter()
    predictions = _predict(detector, [item.image for item in ok]) if ok else []
    infer_ms = (time.perf_counter() - start) * 1000 / max(1, len(ok))
    by_id = {id(item): pred for item, pred in zip(ok, predictions)}

    outcomes = []
    for item in loaded:
        if item.image is None:
            outcomes.append(ImageOutcome(image_id=item.image_id, status="failed", error=item.error, load_ms=item.load_ms))
            continue
        pred = by_id[id(item)]
        width, height = item.image.size
        if not isinstance(pred, Exception) and len(pred.text) > MAX_TEXT:
            pred = ValueError(f"{len(pred.text)} characters decoded, more than the {MAX_TEXT} a result holds")
        if isinstance(pred, Exception):
            outcomes.append(
                ImageOutcome(
                    image_id=item.image_id,
                    status="failed",
                    error=f"inference failed: {type(pred).__name__}: {pred}",
                    width=width,
                    height=height,
                    load_ms=item.load_ms,
                )
            )
            continue
        outcomes.append(
            ImageOutcome(
                image_id=item.image_id,
                status="done",
                model_version=detector.version,
                text=pred.text,
                score=float(pred.score),
                chars=[CharOutcome(c.index, c.char, tuple(float(v) for v in c.box), float(c.score)) for c in pred.chars],
                width=width,
                height=height,
                load_ms=item.load_ms,
                infer_ms=infer_ms,
            )
        )
    return outcomes


def write_outcomes(sessions: sessionmaker, outcomes: Sequence[ImageOutcome], attempts: int = WRITE_ATTEMPTS) -> None:
    """Write one batch in one transaction, retrying transient database errors (locked SQLite, dropped connection)."""
    for attempt in range(1, attempts + 1):
        try:
            with sessions() as session, session.begin():
                record_outcomes(session, outcomes)
            return
        except OperationalError as exc:
            if attempt == attempts:
                raise
            delay = 0.5 * 2 ** (attempt - 1)
            log.warning("database write failed (%s); retrying in %.1f s", exc.orig or exc, delay)
            time.sleep(delay)


def registered_items(
    sessions: sessionmaker, items: Sequence[tuple[int, str]]
) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """Split a message's ``items`` into those whose id names the same path in this database and the others.

    An id is only a row number: a message from a producer that registered its images in another database (another
    ``CAPTCHA_DATABASE_URL``, such as a relative SQLite path opened from another folder) would otherwise write its
    results, or its failures, over unrelated images of this one."""
    with sessions() as session:
        paths = stored_paths(session, [image_id for image_id, _ in items])
    ours = [(i, p) for i, p in items if paths.get(i) == p]
    return ours, [(i, p) for i, p in items if paths.get(i) != p]


def fail_unfinished(sessions: sessionmaker, items: Sequence[tuple[int, str]], reason: str) -> int:
    """Mark the images of ``items`` that no batch recorded yet as failed with ``reason``; returns how many."""
    with sessions() as session, session.begin():
        return fail_pending(session, [i for i, _ in items], safe_text(reason))


def fail_all(items: Sequence[tuple[int, str]], reason: str, database_url: str | None = None) -> None:
    """Record every image of ``items`` as failed with ``reason`` (the worker cannot decode anything)."""
    from db.session import session_factory

    outcomes = [ImageOutcome(image_id=i, status="failed", error=reason) for i, _ in items]
    write_outcomes(session_factory(database_url), outcomes)


def decode_images(
    items: Sequence[tuple[int, str]],
    detector,
    sessions: sessionmaker,
    batch_size: int,
    *,
    max_pixels: int,
    max_width: int,
    allowed_roots: Sequence[Path] = (),
    refresh: Callable[[], Any] | None = None,
) -> DecodeSummary:
    """Decode ``items`` ((image_id, path) pairs) with ``detector`` and record every outcome.

    ``refresh``, when given, is called before each batch and returns the detector for it (a worker switches to a
    newly promoted model between batches, never inside one).

    The message is planned by ``plan_batches`` and runs as a three-stage pipeline: while batch ``k`` is inferred,
    batch ``k + 1`` is read (two loader threads, each half of it; PNG decoding releases the GIL) and batch ``k - 1``
    is written (one writer thread, so commits keep batch order: one ``record_outcomes`` call, one transaction per
    batch). At most one write is in flight; a write that fails for good raises here, and every write has committed
    before this function returns, so a message is never acknowledged ahead of its rows.
    """
    if not items:
        return DecodeSummary(0, 0, 0.0, 0.0, 0.0)
    batches = plan_batches(items, batch_size, allowed_roots)

    def load(part: list[int]) -> list[_Loaded]:
        return load_batch([items[i] for i in part], max_pixels, max_width, allowed_roots)

    def write(outcomes: list[ImageOutcome]) -> float:
        start = time.perf_counter()
        write_outcomes(sessions, outcomes)
        return (time.perf_counter() - start) * 1000

    done = failed = 0
    load_ms = infer_ms = write_ms = 0.0
    with (
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="image-loader") as loader,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-writer") as writer,
    ):

        def submit_load(batch: list[int]) -> list[Future[list[_Loaded]]]:
            half = (len(batch) + 1) // 2
            return [loader.submit(load, part) for part in (batch[:half], batch[half:]) if part]

        pending_load = submit_load(batches[0])
        pending_write: Future[float] | None = None
        for index, batch in enumerate(batches):
            loaded = [item for part in pending_load for item in part.result()]
            if index + 1 < len(batches):
                pending_load = submit_load(batches[index + 1])
            if refresh is not None:
                detector = refresh()
            start = time.perf_counter()
            outcomes = infer_batch(detector, loaded)
            infer_ms += (time.perf_counter() - start) * 1000
            for item in loaded:
                if item.image is not None:
                    item.image.close()
            if pending_write is not None:
                write_ms += pending_write.result()  # the previous batch: committed, or its error raised here
            pending_write = writer.submit(write, outcomes)
            load_ms += sum(item.load_ms for item in loaded)
            done += sum(o.status == "done" for o in outcomes)
            failed += sum(o.status == "failed" for o in outcomes)
        if pending_write is not None:
            write_ms += pending_write.result()
    return DecodeSummary(done, failed, load_ms, infer_ms, write_ms)
