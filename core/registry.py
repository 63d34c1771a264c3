"""The checkpoint store: versioned checkpoints on disk, one ``ModelVersion`` row each, and which one is champion.

A version is published by writing its files into ``Settings.checkpoint_dir`` (``v<N>-<token>.safetensors`` and
its ``.json``, each atomically: temporary file, fsync, ``os.replace``) and only then adding its row, so a reader
that finds a row also finds complete files; a publisher killed before the row is committed leaves no row (and at
most a complete, unreferenced file). The version string stored in the checkpoint and in every result it produces is
``v<N>``.

At most one row has status ``champion``: the version workers decode with (none: the configured checkpoint).
Promotion moves the previous champion back to ``ready``; rollback retires the champion and restores the version
that was champion before it; a partial unique index holds the rule when two promotions race (the later flush fails
with ``IntegrityError``). Loading always checks the sha256 of the weights and of their metadata file against the row
before reading them (safetensors and JSON, never unpickled).

Functions take a ``Session`` first and never commit; the caller owns the transaction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.checkpoint import CheckpointError, metadata_path, read_metadata, read_metadata_bytes, sha256_file
from db.models import ModelVersion, utcnow

if TYPE_CHECKING:
    from torch import nn

    from core.detector import Detector


class RegistryError(ValueError):
    """A request the store cannot satisfy (unknown version, nothing to roll back to, ...)."""


class ChampionRace(RegistryError):
    """Another process changed the champion between this one reading it and changing it; nothing was changed."""

    def __init__(self) -> None:
        super().__init__(
            "another promotion or rollback changed the champion at the same moment; nothing was changed: "
            "see `captcha-queue models` and try again"
        )


ANY_CHAMPION: Any = object()  # promote(expected=...): whatever version is champion


def version_string(number: int) -> str:
    """The version string of version ``number`` (``v<number>``)."""
    return f"v{number}"


def get_version(session: Session, number: int) -> ModelVersion:
    """The row of version ``number``; raises ``RegistryError`` when there is none."""
    row = session.scalar(select(ModelVersion).where(ModelVersion.number == number))
    if row is None:
        raise RegistryError(f"no model version {number}")
    return row


def list_versions(session: Session) -> list[ModelVersion]:
    """Every version, newest first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.number.desc())))


def champion(session: Session) -> ModelVersion | None:
    """The champion row, or None when workers serve the configured checkpoint."""
    return session.scalar(select(ModelVersion).where(ModelVersion.status == "champion"))


def publish(
    session: Session,
    model: nn.Module,
    store: Path,
    *,
    token: str,
    parent: int | None,
    metrics: dict[str, Any],
    data_summary: dict[str, Any],
    train_config: dict[str, Any] | None = None,
    task_id: str | None = None,
) -> ModelVersion:
    """Write ``model`` into ``store`` as the next version and add its row (status ``ready``, flushed, uncommitted).

    ``token`` makes the file name unique to this publisher (two publishers racing for the same number never write
    the same file); the loser of the race on the number gets the next one.
    """
    from core.checkpoint import save_checkpoint

    store = Path(store)
    number = (session.scalar(select(func.max(ModelVersion.number))) or 0) + 1
    path = (store / f"v{number}-{token}.safetensors").resolve()
    save_checkpoint(
        model,
        path,
        {"version": version_string(number), "metrics": metrics, "data_summary": data_summary,
         "train_config": train_config or {}, "parent": parent},
    )  # fmt: skip
    meta_bytes = read_metadata_bytes(path)
    meta = read_metadata(path, meta_bytes)
    row = ModelVersion(
        number=number, arch=meta["arch"], parent=parent, path=str(path), sha256=meta["sha256"],
        metadata_sha256=hashlib.sha256(meta_bytes).hexdigest(), metrics=metrics, data_summary=data_summary,
        status="ready", created_at=utcnow(), task_id=task_id,
    )  # fmt: skip
    session.add(row)
    try:
        session.flush()
    except IntegrityError:  # another publisher took this number: its files are not ours to keep
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
        raise
    return row


def promote(session: Session, number: int, expected: int | None = ANY_CHAMPION) -> ModelVersion:
    """Make version ``number`` the champion (after checking its file); the previous champion becomes ``ready``.

    ``expected``: the version that must still be champion (None: no champion), else ``ChampionRace``. The previous
    champion is demoted only while it still is one, so a promotion or rollback that another process commits after
    this one read the champion is never silently undone: it raises ``ChampionRace`` (or, where neither saw a
    champion, the one-champion index refuses the second with an ``IntegrityError``).
    """
    row = get_version(session, number)
    verify(row)
    current = champion(session)
    if expected is not ANY_CHAMPION and (current.number if current is not None else None) != expected:
        raise ChampionRace()
    if current is not None and current.id != row.id:
        _demote(session, current, "ready")
    row.status = "champion"
    row.promoted_at = utcnow()
    session.flush()
    return row


def rollback(session: Session) -> tuple[ModelVersion, ModelVersion | None]:
    """Retire the champion and restore the version that was champion before it (None: none was, and workers go
    back to the configured checkpoint). Returns ``(retired, restored)``."""
    current = champion(session)
    if current is None:
        raise RegistryError("there is no champion to roll back")
    previous = session.scalar(
        select(ModelVersion)
        .where(ModelVersion.status == "ready", ModelVersion.promoted_at.is_not(None), ModelVersion.id != current.id)
        .order_by(ModelVersion.promoted_at.desc(), ModelVersion.number.desc())
        .limit(1)
    )
    if previous is not None:
        verify(previous)
    _demote(session, current, "retired")
    if previous is not None:
        previous.status = "champion"
        previous.promoted_at = utcnow()
    session.flush()
    return current, previous


def _demote(session: Session, row: ModelVersion, status: str) -> None:
    """Set the champion ``row`` to ``status`` in one conditional UPDATE: ``ChampionRace`` when it is no longer the
    champion (another process promoted or rolled back since it was read; PostgreSQL re-checks the condition after
    waiting for that process's row lock)."""
    changed = session.execute(
        update(ModelVersion).where(ModelVersion.id == row.id, ModelVersion.status == "champion").values(status=status),
        execution_options={"synchronize_session": False},
    ).rowcount
    if changed != 1:
        raise ChampionRace()
    session.expire(row, ["status"])


def verify(row: ModelVersion) -> Path:
    """Check that version ``row``'s weights exist and hash to the sha256 recorded in its row, and so does their
    metadata file where the row records one; return the path of the weights.

    Raises ``CheckpointError`` naming the version and the problem (missing file, changed bytes).
    """
    version, path = version_string(row.number), Path(row.path)
    if not path.is_file():
        raise CheckpointError(f"{version}: checkpoint file missing: {path}")
    _check_sha256(version, path, sha256_file(path), row.sha256)
    if row.metadata_sha256 is not None:
        meta = read_metadata_bytes(path)
        _check_sha256(version, metadata_path(path), hashlib.sha256(meta).hexdigest(), row.metadata_sha256)
    return path


def _check_sha256(version: str, path: Path, actual: str, recorded: str) -> None:
    if actual != recorded:
        raise CheckpointError(
            f"{version}: {path} does not match its recorded sha256 "
            f"(file {actual[:12]}..., recorded {recorded[:12]}...); refusing to load it"
        )


@dataclass(frozen=True)
class VersionRef:
    """What a worker needs to load a version outside a session: its number, path and recorded sha256s (of the
    weights, and of their metadata file: None for rows older than that check)."""

    number: int
    path: str
    sha256: str
    metadata_sha256: str | None = None

    @property
    def version(self) -> str:
        return version_string(self.number)

    @classmethod
    def of(cls, row: ModelVersion) -> VersionRef:
        return cls(row.number, row.path, row.sha256, row.metadata_sha256)


def load_version(ref: VersionRef | ModelVersion, device: str = "cpu") -> Detector:
    """A ``Detector`` for a version, after checking the sha256 of its weights and of its metadata against the row
    (``CheckpointError`` if either differs, or if anything else stops the load).

    Both files are read once into memory, hashed and loaded from those same bytes, so a file replaced between the
    check and the load cannot slip through.
    """
    from safetensors.torch import load as load_bytes

    from core.charset import CHARS
    from core.detector import Detector, resolve_device
    from core.models import build_model

    ref = ref if isinstance(ref, VersionRef) else VersionRef.of(ref)
    path = Path(ref.path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{ref.version}: cannot read checkpoint {path}: {exc.strerror or exc}") from None
    _check_sha256(ref.version, path, hashlib.sha256(data).hexdigest(), ref.sha256)
    meta_bytes = read_metadata_bytes(path)
    if ref.metadata_sha256 is not None:
        _check_sha256(ref.version, metadata_path(path), hashlib.sha256(meta_bytes).hexdigest(), ref.metadata_sha256)
    meta = read_metadata(path, meta_bytes)
    if meta["sha256"] != ref.sha256 or meta["charset"] != CHARS:
        raise CheckpointError(f"{ref.version}: metadata {path.with_suffix('.json')} does not describe these weights")
    from core.config import get_settings

    try:
        state = load_bytes(data)
        model = build_model(**meta["model_config"])
        model.load_state_dict(state, strict=True)
        dev = resolve_device(device)
        return Detector(model.to(dev).eval(), path, meta, dev, get_settings().precision)
    except Exception as exc:  # corrupt tensors, weights that do not fit the architecture, no room on the device
        raise CheckpointError(f"{ref.version}: cannot load {path}: {type(exc).__name__}: {exc}") from None
