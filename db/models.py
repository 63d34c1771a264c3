"""SQLAlchemy 2.0 typed models: jobs, the images they register, decoding results and their characters, model
versions, retraining runs and worker model events.

One ``Image`` row per (job, path). A decoded image has one ``Result`` per model version that decoded it (a
redelivered batch overwrites its row), and each result owns its ``Character`` rows (boxes are x1, y1, x2, y2 in
original image pixels). ``Image.model_version`` names the version of the latest attempt; the result shown for an
image is the one for that version.

Every schema change is an Alembic migration under ``db/migrations/versions``; constraint names come from the
naming convention below so autogenerate stays stable across SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MAX_ID = 2**31 - 1  # the largest id an INTEGER column holds (PostgreSQL's int4): ids beyond it name no row
# The longest stored path (bytes of its UTF-8 text form): PostgreSQL's btree index entries (the job's unique
# (job_id, path) pair, the index on path) hold at most 2,704 bytes, and a path of up to 4,095 bytes whose every
# undecodable byte takes 4 characters in the text form can exceed that.
MAX_PATH_BYTES = 2600
IMAGE_STATUSES = ("pending", "done", "failed")
MODEL_STATUSES = ("ready", "champion", "retired")
RUN_STATUSES = ("queued", "running", "succeeded", "failed")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always returns aware UTC datetimes (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Job(Base):
    """One enqueue run: a folder (or list) of images registered together."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    total: Mapped[int] = mapped_column(Integer, default=0)

    images: Mapped[list[Image]] = relationship(back_populates="job", passive_deletes=True)


class Image(Base):
    """An image path registered by a job; ``status`` is pending until a worker records an outcome."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("job_id", "path"),
        Index("ix_images_job_id_status", "job_id", "status"),
        Index("ix_images_job_id_id", "job_id", "id"),  # a job's images in id order, a page at a time
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))  # indexed by (job_id, status)
    path: Mapped[str] = mapped_column(Text, index=True)
    size: Mapped[int | None] = mapped_column(BigInteger)
    mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    error: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(String(64), index=True)
    enqueued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    job: Mapped[Job] = relationship(back_populates="images")
    results: Mapped[list[Result]] = relationship(back_populates="image", passive_deletes=True)


class Result(Base):
    """The string one model version decoded from one image, with timings (milliseconds)."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("image_id", "model_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    text: Mapped[str] = mapped_column(String(64), index=True)
    score: Mapped[float] = mapped_column(Float)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    load_ms: Mapped[float] = mapped_column(Float, default=0.0)
    infer_ms: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    image: Mapped[Image] = relationship(back_populates="results")
    characters: Mapped[list[Character]] = relationship(
        back_populates="result", order_by="Character.index", passive_deletes=True
    )


class Character(Base):
    """One detected character of a result: its position in the string, box (x1, y1, x2, y2 px) and score."""

    __tablename__ = "characters"
    __table_args__ = (UniqueConstraint("result_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    char: Mapped[str] = mapped_column(String(1))
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    x2: Mapped[float] = mapped_column(Float)
    y2: Mapped[float] = mapped_column(Float)
    score: Mapped[float] = mapped_column(Float)

    result: Mapped[Result] = relationship(back_populates="characters")


class ModelVersion(Base):
    """A trained checkpoint known to the service (``number`` is the user-facing version number)."""

    __tablename__ = "model_versions"
    __table_args__ = (
        # at most one champion, whatever two promoters do at the same time: the second one's flush fails
        Index(
            "uq_model_versions_one_champion", "status", unique=True,
            sqlite_where=text("status = 'champion'"), postgresql_where=text("status = 'champion'"),
        ),
    )  # fmt: skip

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    number: Mapped[int] = mapped_column(Integer, unique=True)
    arch: Mapped[str] = mapped_column(String(32))
    parent: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))  # of the weights (.safetensors)
    metadata_sha256: Mapped[str | None] = mapped_column(String(64))  # of the .json beside them (None: older rows)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    data_summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="ready", index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # when it last became champion
    task_id: Mapped[str | None] = mapped_column(String(64))  # the training task that produced it

    @property
    def version(self) -> str:
        """The version string workers record in ``Result.model_version`` (``v<number>``)."""
        return f"v{self.number}"


class TrainingRun(Base):
    """One retraining task, from the moment it is sent: its progress while it runs and what it produced.

    ``task_id`` is unique: a redelivered message for a run already claimed is skipped. ``version`` is the number
    of the ``ModelVersion`` it published (None until it succeeds).
    """

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    epochs: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the last epoch's losses and accuracy
    version: Mapped[int | None] = mapped_column(Integer)
    promoted: Mapped[bool | None] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))  # hostname:pid that ran it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WorkerEvent(Base):
    """What a worker process did with its detector: ``load`` (first model), ``switch`` (hot reload to a new
    champion) or ``refused`` (a champion whose file is missing or does not match its sha256)."""

    __tablename__ = "worker_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    event: Mapped[str] = mapped_column(String(16))
    old_version: Mapped[str | None] = mapped_column(String(64))
    new_version: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
