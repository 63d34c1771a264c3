"""Retraining as a service task: train with ``core.train.train_model``, publish a version, promote it if it is no
worse than the champion on the same validation images.

``run_retrain`` is the plain function behind the ``worker.train`` Celery task:

1. It claims the run (``training_runs.task_id`` is unique; a run already claimed, finished or failed is skipped, so
   a message delivered twice trains once).
2. It trains into a staging folder of the store (``<store>/.staging/<task id>/``), starting from ``--from``'s
   weights, the champion's, the configured checkpoint's, or from scratch; each epoch's losses and validation
   accuracy go to the run row (``captcha-queue models``) and to ``on_progress`` (Flower events).
3. It evaluates the current champion (none: the configured checkpoint) on the validation images the run used, and
   publishes the best epoch's weights as the next version (``core.registry.publish``). The version becomes champion
   when its validation sequence accuracy is at least the baseline's, or when the request says ``force``. The
   version row, the promotion and the run's outcome are committed in one transaction. When another version became
   champion while the run was evaluating or publishing, the comparison no longer holds: the new version stays
   ``ready`` (unless forced) and the run's promotion note says so.

A run killed at any point leaves no version row and no partial file in the store (only its staging folder).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from core.checkpoint import CheckpointError, default_checkpoint_path
from core.config import get_settings, is_device_name
from core.paths import is_allowed, resolve_roots
from core.registry import (
    ANY_CHAMPION,
    ChampionRace,
    VersionRef,
    champion,
    get_version,
    load_version,
    promote,
    publish,
    verify,
)
from db.models import TrainingRun, utcnow

log = logging.getLogger(__name__)

PUBLISH_ATTEMPTS = 3


class RetrainError(ValueError):
    """A request that cannot run (bad field, unknown --from version, no training data)."""


@dataclass
class RetrainRequest:
    """What ``captcha-queue retrain`` asks for; travels as the task's JSON kwargs."""

    images: str
    labels: str
    val_images: str | None = None  # None: hold out part of the training set (the same images for the baseline)
    val_labels: str | None = None
    from_version: int | None = None  # None: the champion (else the configured checkpoint)
    scratch: bool = False
    epochs: int = 10
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    arch: str = "fast"  # for --scratch
    model_config: dict[str, Any] = field(default_factory=dict)  # for --scratch
    val_batch_size: int = 32
    device: str | None = None  # None: the training worker's CAPTCHA_DEVICE
    force: bool = False  # promote whatever the validation accuracy
    augment: bool = False  # core.augment.Augment on training samples
    ema_decay: float | None = None  # validate and publish a moving average of the weights
    train_parts: str = "all"  # all | reader: only the glyph reader and context head learn (core.train.TrainConfig)

    @classmethod
    def from_json(cls, data: Any) -> RetrainRequest:
        """Validate a decoded JSON object; raises ``RetrainError`` naming the offending field."""
        if not isinstance(data, dict):
            raise RetrainError("a retrain request must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise RetrainError(f"unknown retrain request fields: {', '.join(sorted(unknown))}")
        for name in ("images", "labels"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise RetrainError(f"'{name}' must be a folder path")
        request = cls(**data)
        if request.from_version is not None and (
            not isinstance(request.from_version, int) or isinstance(request.from_version, bool)
        ):
            raise RetrainError("'from_version' must be a version number")
        if request.scratch and request.from_version is not None:
            raise RetrainError("give either from_version or scratch, not both")
        for name in ("epochs", "batch_size", "val_batch_size"):
            value = getattr(request, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RetrainError(f"'{name}' must be a positive integer")
        if isinstance(request.seed, bool) or not isinstance(request.seed, int):
            raise RetrainError("'seed' must be an integer")
        if isinstance(request.lr, bool) or not isinstance(request.lr, (int, float)) or not 0 < request.lr < 1:
            raise RetrainError("'lr' must be a number between 0 and 1")
        for name in ("scratch", "force"):  # "no" would be true
            if not isinstance(getattr(request, name), bool):
                raise RetrainError(f"'{name}' must be true or false")
        for name in ("val_images", "val_labels"):
            folder = getattr(request, name)
            if folder is not None and (not isinstance(folder, str) or not folder):
                raise RetrainError(f"'{name}' must be a folder path")
        if request.device is not None and not is_device_name(request.device):
            raise RetrainError("'device' must be auto, cpu, cuda or cuda:N")
        if (request.val_images is None) != (request.val_labels is None):
            raise RetrainError("give both val_images and val_labels, or neither")
        if not isinstance(request.model_config, dict):
            raise RetrainError("'model_config' must be a JSON object")
        if not isinstance(request.augment, bool):
            raise RetrainError("'augment' must be true or false")
        if request.ema_decay is not None and (
            isinstance(request.ema_decay, bool)
            or not isinstance(request.ema_decay, (int, float))
            or not 0 < request.ema_decay < 1
        ):
            raise RetrainError("'ema_decay' must be a number between 0 and 1")
        if request.train_parts not in ("all", "reader"):  # core.train.TRAIN_PARTS, without importing torch here
            raise RetrainError("'train_parts' must be 'all' or 'reader'")
        if request.arch not in ("fast", "seed"):  # core.models.ARCHS, without importing torch here
            raise RetrainError("'arch' must be 'fast' or 'seed'")
        return request

    def as_json(self) -> dict[str, Any]:
        """The request as JSON; without ``device`` when it is None (left to the worker), which workers that predate
        that default would pass on to PyTorch."""
        data = asdict(self)
        if data["device"] is None:
            del data["device"]
        return data


@dataclass
class RetrainOutcome:
    """What a run did: ``skipped`` (already claimed) or ``succeeded`` with the version it published."""

    status: str
    version: int | None = None
    promoted: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)


def training_device(request: RetrainRequest) -> str:
    """The device a run trains and validates on: the request's, else the training worker's ``CAPTCHA_DEVICE``."""
    return request.device or get_settings().device


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def create_run(session: Session, task_id: str, request: RetrainRequest) -> TrainingRun:
    """Record a run as ``queued`` before its message is sent (flushed, uncommitted)."""
    run = TrainingRun(task_id=task_id, status="queued", request=request.as_json(), epochs=request.epochs,
                      epoch=0, progress={}, created_at=utcnow())  # fmt: skip
    session.add(run)
    session.flush()
    return run


def claim_run(sessions: sessionmaker, task_id: str, request: RetrainRequest, worker: str) -> bool:
    """Atomically move the run from ``queued`` to ``running`` (inserting it when it was sent without a row).

    False when the run is already running, finished or failed: the message is a redelivery and must not train.
    """
    now = utcnow()
    with sessions() as session, session.begin():
        claimed = session.execute(
            update(TrainingRun)
            .where(TrainingRun.task_id == task_id, TrainingRun.status == "queued")
            .values(status="running", worker=worker, started_at=now, updated_at=now)
        ).rowcount
        if claimed == 1:
            return True
        if session.scalar(select(TrainingRun.id).where(TrainingRun.task_id == task_id)) is not None:
            return False
    try:
        with sessions() as session, session.begin():
            run = create_run(session, task_id, request)
            run.status, run.worker, run.started_at, run.updated_at = "running", worker, now, now
        return True
    except IntegrityError:  # another delivery inserted it first
        return False


def fail_queued_run(sessions: sessionmaker, task_id: str, reason: str) -> bool:
    """Mark a run that no worker will ever train (its request was refused) ``failed`` with ``reason``, if it is still
    ``queued``; True when a row changed. ``retrain --wait`` then stops with the reason instead of waiting."""
    now = utcnow()
    with sessions() as session, session.begin():
        return session.execute(
            update(TrainingRun)
            .where(TrainingRun.task_id == task_id, TrainingRun.status == "queued")
            .values(status="failed", error=f"request refused: {reason}", finished_at=now, updated_at=now)
        ).rowcount == 1


def cancel_run(session: Session, task: str) -> TrainingRun:
    """Mark the ``queued`` run whose task id is or starts with ``task`` (as ``models`` prints it) ``failed``
    ("cancelled"), so a worker that receives it later does not train it (flushed, uncommitted). ``RetrainError``
    when no run, several runs or a run no longer queued matches: a running run cannot be stopped from here."""
    if not TASK_ID.fullmatch(task):
        raise RetrainError(f"{task!r} is not a task id")
    runs = session.scalars(select(TrainingRun).where(TrainingRun.task_id.startswith(task, autoescape=True))).all()
    if not runs:
        raise RetrainError(f"no training run {task}")
    if len(runs) > 1:
        raise RetrainError(f"{task} names {len(runs)} training runs; give more of the task id")
    run = runs[0]
    now = utcnow()
    cancelled = session.execute(  # conditional: a worker claiming the run meanwhile keeps it
        update(TrainingRun)
        .where(TrainingRun.id == run.id, TrainingRun.status == "queued")
        .values(status="failed", error="cancelled before a worker took it", finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    session.refresh(run)
    if cancelled != 1:
        raise RetrainError(f"run {run.task_id[:8]} is {run.status}: only a queued run can be cancelled")
    return run


def _update_run(sessions: sessionmaker, task_id: str, **values: Any) -> None:
    with sessions() as session, session.begin():
        session.execute(update(TrainingRun).where(TrainingRun.task_id == task_id).values(updated_at=utcnow(), **values))


def configured_checkpoint() -> Path | None:
    """The checkpoint workers serve when there is no champion (``Settings.checkpoint`` or the shipped one)."""
    path = get_settings().checkpoint or default_checkpoint_path()
    return Path(path) if Path(path).is_file() else None


def _starting_point(session: Session, request: RetrainRequest) -> tuple[Path | None, int | None]:
    """The checkpoint to start from (None: scratch) and the parent version number."""
    if request.scratch:
        return None, None
    if request.from_version is not None:
        row = get_version(session, request.from_version)
        return verify(row), row.number
    row = champion(session)
    if row is not None:
        return verify(row), row.number
    return configured_checkpoint(), None


def _baseline(session: Session, val_set: Any, request: RetrainRequest) -> dict[str, Any]:
    """The current champion (or the configured checkpoint) scored on ``val_set``; ``champion`` is its version number
    (None: the configured checkpoint), which ``_publish`` checks again before promoting."""
    from core.detector import Detector
    from core.train import validate

    row = champion(session)
    number = {"champion": row.number if row is not None else None}
    try:
        if row is not None:
            detector = load_version(VersionRef.of(row), device=training_device(request))
        else:
            path = configured_checkpoint()
            if path is None:
                return {"version": None, **number, "val_sequence_accuracy": None,
                        "note": "no champion and no checkpoint"}
            detector = Detector.load(path, device=training_device(request))
    except CheckpointError as exc:
        return {"version": row.version if row else None, **number, "val_sequence_accuracy": None, "error": str(exc)}
    scores = validate(detector.model, val_set, request.val_batch_size, detector.device, precision=detector.precision)
    return {"version": detector.version, **number, **scores}


def _validation_set(cfg: Any) -> Any:
    """The validation images ``train_model`` used for ``cfg`` (the same seeded hold-out when none were given)."""
    from core.formats import LabelledFolder
    from core.train import hold_out

    roots = resolve_roots(cfg.allowed_roots)
    if cfg.val_images is not None:
        return LabelledFolder(cfg.val_images, cfg.val_labels, roots)
    return hold_out(LabelledFolder(cfg.images, cfg.labels, roots), cfg)[1]


TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # Celery's task ids are UUIDs


def check_request(task_id: str, request: RetrainRequest, roots: Sequence[Path] | None = None) -> None:
    """Refuse (``RetrainError``) a task id that is not a plain name (it names the run's staging folder and its
    checkpoint file: ``../..`` or ``/x`` would point elsewhere) and folders outside ``roots`` (default: the allowed
    roots of the settings, ``CAPTCHA_ALLOWED_ROOTS``; none set allows any)."""
    if not isinstance(task_id, str) or not TASK_ID.fullmatch(task_id):
        raise RetrainError(f"refusing task id {task_id!r}: letters, digits, '-' and '_' only (at most 64)")
    roots = resolve_roots(get_settings().allowed_roots) if roots is None else roots
    for name in ("images", "labels", "val_images", "val_labels"):
        folder = getattr(request, name)
        if folder is not None and not is_allowed(folder, roots):
            raise RetrainError(f"'{name}' {folder} is outside the allowed roots (CAPTCHA_ALLOWED_ROOTS)")


def should_promote(new_accuracy: float, baseline: dict[str, Any], force: bool) -> tuple[bool, str]:
    """The promotion rule and a sentence explaining it."""
    if force:
        return True, "forced"
    base = baseline.get("val_sequence_accuracy")
    if base is not None and not baseline.get("val_images"):
        return False, f"not promoted: the champion {baseline['version']} scored no validation image"
    if base is None:
        if baseline.get("error"):
            return False, f"not promoted: the champion could not be evaluated ({baseline['error']})"
        return True, "promoted: no champion to compare with"
    if new_accuracy >= base:
        return True, f"promoted: validation sequence accuracy {new_accuracy:.4f} >= {base:.4f} of {baseline['version']}"
    return False, f"not promoted: validation sequence accuracy {new_accuracy:.4f} < {base:.4f} of {baseline['version']}"


def run_retrain(
    task_id: str,
    request: RetrainRequest,
    sessions: sessionmaker,
    store: Path | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> RetrainOutcome:
    """Run one retraining request end to end (see the module docstring); the run row records every step."""
    from core.checkpoint import load_checkpoint
    from core.train import TrainConfig, train_model

    if not isinstance(task_id, str) or not TASK_ID.fullmatch(task_id):
        check_request(task_id, request)  # raises: such an id is neither stored nor used as a name
    if not claim_run(sessions, task_id, request, worker_name()):
        log.warning("training task %s was already claimed or cancelled: skipping this delivery", task_id)
        return RetrainOutcome(status="skipped")
    store = Path(store or get_settings().checkpoint_dir).resolve()
    staging: Path | None = None
    emit = on_progress or (lambda event: None)
    try:
        check_request(task_id, request)  # before the id names a folder or a folder is opened
        staging = store / ".staging" / task_id
        with sessions() as session:
            init_from, parent = _starting_point(session, request)
        cfg = TrainConfig(
            images=Path(request.images), labels=Path(request.labels), out=staging / "model.safetensors",
            val_images=Path(request.val_images) if request.val_images else None,
            val_labels=Path(request.val_labels) if request.val_labels else None,
            arch=request.arch, model_config=request.model_config, epochs=request.epochs,
            batch_size=request.batch_size, lr=request.lr, seed=request.seed, device=training_device(request),
            num_workers=0, init_from=init_from, val_batch_size=request.val_batch_size, augment=request.augment,
            ema_decay=request.ema_decay, precision=get_settings().precision, train_parts=request.train_parts,
            allowed_roots=[str(root) for root in get_settings().allowed_roots],
        )  # fmt: skip

        def progress(event: dict[str, Any]) -> None:
            if event["event"] == "epoch":
                record = {k: v for k, v in event.items() if k != "event"}
                _update_run(sessions, task_id, epoch=event["epoch"], progress=record)
                log.info(
                    "training %s: epoch %d/%d loss %.4f, val sequence accuracy %.4f", task_id, event["epoch"],
                    request.epochs, event.get("loss", float("nan")), event["val_sequence_accuracy"],
                )  # fmt: skip
            if event["event"] in ("start", "epoch"):
                emit(event)

        result = train_model(cfg, progress)
        model, meta = load_checkpoint(result.checkpoint)
        with sessions() as session:
            baseline = _baseline(session, _validation_set(cfg), request)
        accuracy = result.metrics["val_sequence_accuracy"]
        promoted, reason = should_promote(accuracy, baseline, request.force)
        metrics = {**result.metrics, "best_epoch": result.best_epoch, "baseline": baseline, "promotion": reason}
        row_number, promoted = _publish(
            sessions, task_id, model, store, parent, metrics, meta, promoted,
            baseline_champion=baseline.get("champion"), check=not request.force,
        )  # fmt: skip
        log.info("training %s: published v%d (%s)", task_id, row_number, metrics["promotion"])
        return RetrainOutcome(status="succeeded", version=row_number, promoted=promoted, metrics=metrics)
    except BaseException as exc:
        try:
            _update_run(sessions, task_id, status="failed", error=f"{type(exc).__name__}: {exc}", finished_at=utcnow())
        except Exception:
            log.exception("training %s: could not record the failure", task_id)
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _publish(
    sessions: sessionmaker,
    task_id: str,
    model: Any,
    store: Path,
    parent: int | None,
    metrics: dict[str, Any],
    meta: dict[str, Any],
    promoted: bool,
    *,
    baseline_champion: int | None = None,
    check: bool = True,
) -> tuple[int, bool]:
    """Publish the version, promote it if asked and finish the run, in one transaction; returns the version number
    and whether it became champion.

    With ``check``, a promotion goes ahead only while the champion is still ``baseline_champion`` (the version the
    run was compared with; None: no champion); otherwise the version stays ``ready`` and ``metrics["promotion"]``
    says why. The transaction is retried when another publisher took the same number, or promoted at the same
    moment (the one-champion index refused this one's promotion).
    """
    attempt = 1
    while True:
        # a token of its own per attempt: two runs whose ids share their first characters, or a retried attempt,
        # never write (or, failing, delete) the same file
        token = f"{task_id[:8]}-{uuid.uuid4().hex[:8]}"
        written: list[Path] = []
        try:
            with sessions() as session, session.begin():
                if promoted and check:
                    current = champion(session)
                    number = current.number if current is not None else None
                    if number != baseline_champion:
                        promoted = False
                        metrics["promotion"] = (
                            f"not promoted: {_name(number)} became champion while this run was being compared with "
                            f"{_name(baseline_champion)}; compare them and promote by hand"
                        )
                row = publish(
                    session, model, store, token=token, parent=parent, metrics=metrics,
                    data_summary=meta.get("data_summary", {}), train_config=meta.get("train_config", {}),
                    task_id=task_id,
                )  # fmt: skip
                written.append(Path(row.path))
                if promoted:  # the champion checked again in the same statement that demotes it
                    promote(session, row.number, expected=baseline_champion if check else ANY_CHAMPION)
                session.execute(
                    update(TrainingRun)
                    .where(TrainingRun.task_id == task_id)
                    .values(status="succeeded", version=row.number, promoted=promoted, progress={**metrics},
                            finished_at=utcnow(), updated_at=utcnow())
                )  # fmt: skip
                return row.number, promoted
        except (IntegrityError, ChampionRace):
            for path in written:  # published, then the promotion lost a race: the row is gone, so are its files
                path.unlink(missing_ok=True)
                path.with_suffix(".json").unlink(missing_ok=True)
            if attempt == PUBLISH_ATTEMPTS:
                raise
            attempt += 1


def _name(number: int | None) -> str:
    return f"v{number}" if number is not None else "the configured checkpoint"
