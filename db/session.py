"""Engines, sessions and schema upgrades.

Engines are created lazily, one per (process, URL): a forked child (a Celery prefork worker) never reuses the
parent's pooled connections. SQLite connections get WAL, a 30 s busy timeout and foreign keys on every connect.
The schema is managed only by Alembic: ``upgrade(url)`` runs the migrations shipped in ``db/migrations``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# the PostgreSQL advisory lock an upgrade holds (any 64-bit number; this one spells "captchaq" in ASCII)
UPGRADE_LOCK_KEY = 0x6361707463686171

_engines: dict[tuple[int, str], Engine] = {}
_lock = threading.Lock()


def database_url(url: str | None = None) -> str:
    """``url``, or ``Settings.database_url`` when None."""
    if url is not None:
        return url
    from core.config import get_settings

    return get_settings().database_url


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """Put the file in WAL mode (a no-op once it is: the mode is stored in the file).

    Processes opening a new file at the same moment all try to switch it; SQLite answers all but one "database is
    locked" at once, without waiting out the busy timeout (the waiting could deadlock), so the switch is retried
    here until it succeeds or the busy timeout has passed.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.002
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _create(url: str) -> Engine:
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(parsed, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def make_engine(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: ``Settings.database_url``) in this process, created on first use."""
    url = database_url(url)
    key = (os.getpid(), url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = _create(url)
        return engine


def dispose_engines() -> None:
    """Close this process's pooled connections and forget every engine (the next use creates a fresh one)."""
    pid = os.getpid()
    with _lock:
        for (owner, _), engine in list(_engines.items()):
            # close=False for engines inherited through fork: their sockets belong to the parent
            engine.dispose(close=owner == pid)
        _engines.clear()


def _forget_engines_after_fork() -> None:
    global _lock
    _lock = threading.Lock()
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


os.register_at_fork(after_in_child=_forget_engines_after_fork)


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    """A ``sessionmaker`` bound to this process's engine for ``url``; the caller owns each session and commits."""
    return sessionmaker(bind=make_engine(url), expire_on_commit=False)


def alembic_config() -> Any:
    """An Alembic ``Config`` pointing at the migrations shipped with this package (works from any cwd)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate the database at ``url`` (default: ``Settings.database_url``) to ``revision``, in one transaction.

    On SQLite the driver runs DDL outside the transaction SQLAlchemy begins, so an interrupted upgrade left some
    tables and no revision (and every later upgrade failing on "table already exists"), and two processes upgrading
    a new file at once collided. An explicit ``BEGIN IMMEDIATE`` makes the whole upgrade one transaction that a
    second upgrader waits for (the busy timeout), then finds done. On PostgreSQL the DDL is transactional but takes
    no lock that makes a second upgrader wait (two `enqueue` runs on a new database both created the tables, and all
    but one failed on a duplicate type), so the upgrade holds a transaction-level advisory lock.
    """
    from alembic import command

    if revision == "head":
        current, head, _ = schema_revisions(url)
        if current == head:
            return  # nothing to do: no write lock taken
    config = alembic_config()
    engine = make_engine(url)
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        elif engine.dialect.name == "postgresql":
            connection.execute(select(func.pg_advisory_xact_lock(UPGRADE_LOCK_KEY)))
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def refresh_statistics(session: Session) -> None:
    """On SQLite, refresh the query planner's statistics (``ANALYZE``, approximate: at most a few hundred rows per
    index, so milliseconds even on millions of rows). Without any, SQLite takes every index for selective and looks
    up one path's result through the index on ``status`` (a scan of every done image) instead of the one on
    ``path``. PostgreSQL keeps its own statistics (autovacuum). Commits nothing the session holds."""
    if session.get_bind().dialect.name != "sqlite":
        return
    from sqlalchemy.exc import OperationalError

    connection = session.connection()
    try:
        connection.exec_driver_sql("PRAGMA analysis_limit=400")
        connection.exec_driver_sql("ANALYZE")
    except OperationalError as exc:  # locked for longer than the busy timeout: a later enqueue refreshes them
        log.warning("planner statistics not refreshed: %s", exc.orig or exc)
        session.rollback()


def prepare_schema(url: str | None = None) -> None:
    """Create the schema of a database that has none (a new SQLite file works without ``db upgrade``); leave any
    other alone. A schema older than this code raises ``SchemaError`` (migrating a shared database is an operator's
    decision: ``captcha-queue db upgrade``); a newer one, migrated by a later release, is used as it is."""
    current, head, known = schema_revisions(url)
    if current is None:
        upgrade(url)
    elif current != head and current in known:
        raise SchemaError(
            f"the database schema is at revision {current}, this version needs {head}: run `captcha-queue db upgrade`"
        )


class SchemaError(RuntimeError):
    """The database's schema is older than this code."""


def schema_revisions(url: str | None = None) -> tuple[str | None, str, set[str]]:
    """(the database's Alembic revision, None before any migration; the revision this code's migrations end at;
    every revision this code knows: a database at another one was migrated by a newer version)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    with make_engine(url).connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    return current, script.get_current_head(), {rev.revision for rev in script.walk_revisions()}
