"""Database layer on real SQLite files and a real PostgreSQL: migrations, registration, outcome writes."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from db.models import Base, Character, Image, Job, Result
from db.repository import (
    CharOutcome,
    ImageOutcome,
    create_job,
    job_counts,
    record_outcomes,
    register_images,
)
from db.session import alembic_config, dispose_engines, make_engine, session_factory, upgrade


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    """A migrated, empty database: a SQLite file, then a fresh PostgreSQL schema."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    upgrade(url)
    yield url
    dispose_engines()


def files(n: int, start: int = 0, mtime: int = 1_000) -> list[tuple[str, int, int]]:
    return [(f"/data/set/{i:05d}-x.png", 100 + i, mtime + i) for i in range(start, start + n)]


def done(image_id: int, text: str, version: str = "v1", score: float = 0.9) -> ImageOutcome:
    chars = [CharOutcome(k, ch, (10.0 * k, 2.0, 10.0 * k + 8, 30.0), score) for k, ch in enumerate(text)]
    return ImageOutcome(image_id=image_id, status="done", model_version=version, text=text, score=score,
                        chars=chars, width=120, height=40, load_ms=1.5, infer_ms=4.0)  # fmt: skip


# ---------------------------------------------------------------------------------------------- schema


def test_migrated_schema_matches_models(db_url):
    engine = make_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        tables = set(sa.inspect(conn).get_table_names())
    assert diff == []
    assert {"jobs", "images", "results", "characters", "model_versions", "training_runs", "worker_events",
            "alembic_version"} <= tables


def test_upgrade_is_idempotent_and_runs_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'sub' / 'q.db'}"
    upgrade(url)
    upgrade(url)
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with make_engine(url).connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == head == "0004"
    dispose_engines()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_upgrade_keeps_one_champion(request, backend):
    """A database that already holds several champions keeps the one promoted last, on either backend (a champion
    without a promotion time counts as the earliest); then a second one is refused."""
    url = request.getfixturevalue(f"{backend}_url")
    upgrade(url, "0002")
    rows = [(1, "champion", "2026-01-01 00:00:00"), (2, "champion", "2026-01-02 00:00:00"), (3, "ready", None),
            (4, "champion", None)]  # fmt: skip
    with make_engine(url).begin() as conn:
        for number, status, promoted in rows:
            conn.execute(sa.text(
                "INSERT INTO model_versions (number, arch, path, sha256, metrics, data_summary, status, created_at, "
                "promoted_at) VALUES (:n, 'fast', '/x', 'ab', '{}', '{}', :s, '2026-01-01 00:00:00', :p)"
            ), {"n": number, "s": status, "p": promoted})  # fmt: skip
    upgrade(url)
    with make_engine(url).connect() as conn:
        statuses = conn.execute(sa.text("SELECT number, status FROM model_versions ORDER BY number")).all()
        assert statuses == [(1, "ready"), (2, "champion"), (3, "ready"), (4, "ready")]
        with pytest.raises(sa.exc.IntegrityError):
            conn.execute(sa.text("UPDATE model_versions SET status = 'champion' WHERE number = 3"))
    dispose_engines()


def test_an_interrupted_sqlite_upgrade_leaves_nothing_and_runs_again(tmp_path, monkeypatch):
    """SQLite ran each DDL statement outside the upgrade's transaction: a Ctrl-C in the middle left tables without
    a revision, and every later upgrade then failed on "table jobs already exists"."""
    from alembic import op

    url = f"sqlite:///{tmp_path / 'half.db'}"
    real, made = op.create_table, []

    def interrupted(name, *columns, **kw):
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(name)
        return real(name, *columns, **kw)

    monkeypatch.setattr(op, "create_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        upgrade(url)
    assert len(made) == 2
    assert sa.inspect(make_engine(url)).get_table_names() == []
    monkeypatch.setattr(op, "create_table", real)
    upgrade(url)
    assert {"jobs", "images", "results", "alembic_version"} <= set(sa.inspect(make_engine(url)).get_table_names())
    dispose_engines()


def _upgrade_in_a_process(url: str, ready, go) -> None:
    import alembic.command

    assert alembic.command.upgrade  # imported before the start, so that all begin at once
    ready.release()
    go.wait(60)
    upgrade(url)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_processes_upgrading_a_new_database_at_once_all_succeed(backend, request):
    """Two ``enqueue`` runs on a new database both create its schema: the second waits for the first, then finds
    it (on PostgreSQL, without the advisory lock, all but one failed on a duplicate type)."""
    url = request.getfixturevalue(f"{backend}_url")
    context = multiprocessing.get_context("spawn")
    ready, go = context.Semaphore(0), context.Event()
    workers = [context.Process(target=_upgrade_in_a_process, args=(url, ready, go)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for _ in workers:
        assert ready.acquire(timeout=60)
    go.set()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]


def _open_in_a_process(url: str, go) -> None:
    go.wait(60)
    with make_engine(url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_processes_opening_a_new_sqlite_file_at_once_all_switch_it_to_wal(tmp_path):
    """SQLite refuses all but one of several simultaneous switches of a new file to WAL at once ("database is
    locked", busy timeout or not); each connection retries until the file is in WAL mode. Without the retry, about
    one round in seven of these failed."""
    with make_engine(f"sqlite:///{tmp_path / 'warm.db'}").connect():
        pass  # the SQLite dialect imported here, once, not in each forked child
    context = multiprocessing.get_context("fork")
    for round_ in range(40):
        url = f"sqlite:///{tmp_path / f'new{round_}.db'}"
        go = context.Event()
        workers = [context.Process(target=_open_in_a_process, args=(url, go)) for _ in range(12)]
        for worker in workers:
            worker.start()
        go.set()
        for worker in workers:
            worker.join(60)
            if worker.is_alive():
                worker.kill()  # hung: fails below, and outlives nothing
                worker.join()
        assert [worker.exitcode for worker in workers] == [0] * 12, f"round {round_}"
    dispose_engines()


def _register_in_a_process(url: str, name: str, files, go, counts) -> None:
    go.wait(60)
    with session_factory(url)() as session:
        job = create_job(session, name)
        session.commit()
        counts.put(len(register_images(session, job, files)))
        session.commit()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_enqueues_of_one_folder_at_once_register_each_file_once(backend, request):
    """Each looked the paths up before the other had inserted them, so both registered every file (and the workers
    decoded it twice): registrations now take a lock, and the second finds the first's files pending."""
    url = request.getfixturevalue(f"{backend}_url")
    upgrade(url)
    context = multiprocessing.get_context("fork")
    for round_ in range(5):
        files = [(f"/data/race{round_}/{k}.png", 100 + k, 1_000 + k) for k in range(300)]
        go, counts = context.Event(), context.Queue()
        names = [f"r{round_}-{k}" for k in range(2)]
        workers = [context.Process(target=_register_in_a_process, args=(url, n, files, go, counts)) for n in names]
        for worker in workers:
            worker.start()
        go.set()
        for worker in workers:
            worker.join(60)
        assert [worker.exitcode for worker in workers] == [0, 0]
        registered = sorted(counts.get(timeout=5) for _ in workers)
        assert registered == [0, 300], f"round {round_}: {registered}"
    dispose_engines()


def test_an_upgrade_with_nothing_to_do_takes_no_lock(tmp_path):
    """A current schema is left alone without the write lock a migration takes: a process holding a write
    transaction on the same file (a session with pending rows) does not make it wait."""
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    upgrade(url)
    with session_factory(url)() as session:
        session.add(Job(name="pending"))
        session.flush()  # a write transaction held open
        upgrade(url)  # returns at once instead of waiting out the busy timeout
        session.commit()
    with session_factory(url)() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Job)) == 1
    dispose_engines()


def test_prepare_schema_creates_a_new_one_and_leaves_others_to_db_upgrade(tmp_path):
    from db.session import SchemaError, prepare_schema, schema_revisions

    url = f"sqlite:///{tmp_path / 'p.db'}"
    prepare_schema(url)
    current, head, _ = schema_revisions(url)
    assert current == head
    older = f"sqlite:///{tmp_path / 'older.db'}"
    upgrade(older, revision="0002")
    with pytest.raises(SchemaError, match="at revision 0002, this version needs .*: run `captcha-queue db upgrade`"):
        prepare_schema(older)
    with make_engine(url).begin() as connection:  # migrated by a later release: used as it is, not "upgraded"
        connection.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    prepare_schema(url)
    dispose_engines()


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(sqlite_url):
    upgrade(sqlite_url)
    with make_engine(sqlite_url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        with pytest.raises(sa.exc.IntegrityError):
            conn.execute(sa.insert(Result.__table__).values(
                image_id=999, model_version="v", text="x", score=1.0, width=1, height=1, load_ms=0, infer_ms=0,
                created_at=sa.func.now()))  # fmt: skip
    dispose_engines()


def _child_engine_is_fresh(url: str, parent_engine_id: int, queue) -> None:
    engine = make_engine(url)
    with engine.connect() as conn:
        ok = conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 1
    queue.put((id(engine) != parent_engine_id, ok))


def test_forked_child_gets_its_own_engine(sqlite_url):
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    assert make_engine(sqlite_url) is engine
    with session_factory(sqlite_url)() as session:
        create_job(session, "parent")
        session.commit()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_engine_is_fresh, args=(sqlite_url, id(engine), queue))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == (True, True)
    dispose_engines()


# ---------------------------------------------------------------------------------------------- registration


def test_register_reregister_changed_and_force(db_url):
    Session = session_factory(db_url)
    batch = files(1000)
    with Session() as session:
        job = create_job(session, "first")
        first = register_images(session, job, batch)
        session.commit()
        assert len(first) == 1000 and len({i for i, _ in first}) == 1000
        assert [p for _, p in first] == [p for p, _, _ in batch]
        assert job.total == 1000

        again = create_job(session, "again")
        assert register_images(session, again, batch) == []

        changed = [(p, s, m + 1 if k % 100 == 0 else m) for k, (p, s, m) in enumerate(batch)]
        redo = register_images(session, again, changed)
        assert [p for _, p in redo] == [batch[k][0] for k in range(0, 1000, 100)]

        forced = create_job(session, "forced")
        assert len(register_images(session, forced, batch, force=True)) == 1000
        session.commit()

        counts = {j.name: j.total for j in session.scalars(sa.select(Job))}
        assert counts == {"first": 1000, "again": 10, "forced": 1000}
        assert session.scalar(sa.select(sa.func.count()).select_from(Image)) == 2010


def test_failed_file_is_registered_again_and_own_path_is_reset(db_url):
    Session = session_factory(db_url)
    with Session() as session:
        job = create_job(session, "j")
        [(a, _), (b, _)] = register_images(session, job, files(2))
        record_outcomes(session, [ImageOutcome(image_id=a, status="failed", error="truncated PNG"), done(b, "ab")])
        session.commit()

        retry = create_job(session, "retry")
        assert [p for _, p in register_images(session, retry, files(2))] == [files(1)[0][0]]
        assert len(register_images(session, create_job(session, "x"), files(2))) == 0  # now pending in retry

        # same job, forced: the existing rows are reset to pending, not duplicated
        again = register_images(session, job, files(2), force=True)
        session.commit()
        assert sorted(i for i, _ in again) == sorted([a, b])
        rows = session.execute(sa.select(Image.status, Image.error).where(Image.job_id == job.id)).all()
        assert sorted(rows) == [("pending", None), ("pending", None)]
        assert session.get(Job, job.id).total == 2


def test_register_makes_paths_absolute_and_dedupes(db_url, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with session_factory(db_url)() as session:
        job = create_job(session, None)
        out = register_images(session, job, [("a.png", 1, 1), ("./a.png", 1, 1), ("b.png", 2, 2)])
        session.commit()
    assert [p for _, p in out] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


# ---------------------------------------------------------------------------------------------- outcomes


def test_redelivered_batch_overwrites_never_duplicates(db_url):
    Session = session_factory(db_url)
    with Session() as session:
        job = create_job(session, "j")
        ids = [i for i, _ in register_images(session, job, files(40))]
        session.commit()

    batch = [done(i, "abc") for i in ids[:32]]
    for _ in range(2):
        with Session() as session:
            record_outcomes(session, batch)
            session.commit()
    with Session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Result)) == 32
        assert session.scalar(sa.select(sa.func.count()).select_from(Character)) == 32 * 3

        # a redelivery with a different answer overwrites text and characters
        record_outcomes(session, [done(ids[0], "zq", score=0.5)])
        session.commit()
        result = session.scalars(sa.select(Result).where(Result.image_id == ids[0])).one()
        assert (result.text, result.score) == ("zq", 0.5)
        assert [c.char for c in result.characters] == ["z", "q"]
        assert result.characters[1].x1 == 10.0 and result.characters[1].y2 == 30.0

        # a second model version adds a second row
        record_outcomes(session, [done(ids[0], "zg", version="v2")])
        session.commit()
        versions = session.scalars(sa.select(Result.model_version).where(Result.image_id == ids[0])).all()
        assert sorted(versions) == ["v1", "v2"]
        image = session.get(Image, ids[0])
        assert (image.status, image.model_version, image.error) == ("done", "v2", None)
        assert image.finished_at is not None and image.finished_at.tzinfo is not None

        counts = job_counts(session, job.id)
        assert (counts["total"], counts["done"], counts["failed"], counts["pending"]) == (40, 32, 0, 8)
        assert counts["first_enqueued_at"] <= counts["last_finished_at"]


def test_failed_outcome_has_reason_and_no_result(db_url):
    Session = session_factory(db_url)
    with Session() as session:
        job = create_job(session, "j")
        [(a, _), (b, _)] = register_images(session, job, files(2))
        record_outcomes(session, [
            ImageOutcome(image_id=a, status="failed", error="cannot identify image file", model_version="v1"),
            done(b, "7k"),
            ImageOutcome(image_id=10_000_000, status="failed", error="image row deleted"),
        ])  # fmt: skip
        session.commit()
        failed = session.get(Image, a)
        assert (failed.status, failed.error, failed.model_version) == ("failed", "cannot identify image file", "v1")
        assert session.scalars(sa.select(Result).where(Result.image_id == a)).all() == []
        assert session.scalars(sa.select(Result.text).where(Result.image_id == b)).all() == ["7k"]
        counts = job_counts(session)
        assert (counts["done"], counts["failed"], counts["pending"]) == (1, 1, 0)

        # a redelivered message that fails (the file went away after it was decoded) never undoes a result;
        # a failed image decoded later becomes done
        record_outcomes(session, [ImageOutcome(image_id=b, status="failed", error="file not found"), done(a, "q4")])
        session.commit()
        session.expire_all()
        assert (session.get(Image, b).status, session.get(Image, b).error) == ("done", None)
        assert (session.get(Image, a).status, session.get(Image, a).error) == ("done", None)
        assert session.scalars(sa.select(Result.text).where(Result.image_id == b)).all() == ["7k"]


def test_malformed_outcomes_are_refused_before_writing(db_url):
    with session_factory(db_url)() as session:
        job = create_job(session, "j")
        [(a, _)] = register_images(session, job, files(1))
        session.commit()
        for bad in (
            ImageOutcome(image_id=a, status="done", text="ab"),  # no model version
            ImageOutcome(image_id=a, status="failed"),  # no reason
            ImageOutcome(image_id=a, status="lost", error="x"),  # type: ignore[arg-type]
            ImageOutcome(image_id=a, status="done", model_version="v", text="ab",
                         chars=[CharOutcome(0, "a", (0, 0, 1, 1), 1.0), CharOutcome(0, "b", (0, 0, 1, 1), 1.0)]),
        ):  # fmt: skip
            with pytest.raises(ValueError):
                record_outcomes(session, [done(a, "ok"), bad])
        session.rollback()
        assert session.get(Image, a).status == "pending"
        assert session.scalar(sa.select(sa.func.count()).select_from(Result)) == 0


def _write_outcomes(url: str, ids: list[int], version: str) -> None:
    Session = session_factory(url)
    for k in range(0, len(ids), 4):
        with Session() as session:
            record_outcomes(session, [done(i, "ab", version=version) for i in ids[k : k + 4]])
            session.commit()


def test_concurrent_writers_on_sqlite_lose_nothing(sqlite_url):
    upgrade(sqlite_url)
    with session_factory(sqlite_url)() as session:
        ids = [i for i, _ in register_images(session, create_job(session, "j"), files(200))]
        session.commit()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_outcomes, args=(sqlite_url, ids[k::2], f"v{k}")) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    db = sqlite3.connect(Path(sqlite_url.removeprefix("sqlite:///")))
    assert db.execute("SELECT count(*) FROM results").fetchone()[0] == 200
    assert db.execute("SELECT count(*) FROM characters").fetchone()[0] == 400
    assert db.execute("SELECT count(*) FROM images WHERE status = 'done'").fetchone()[0] == 200
    db.close()
    dispose_engines()
