"""Result queries, job progress, queue depth and the ``status`` / ``results`` / ``db upgrade`` commands."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

import db.queries
from core.cli import app
from core.config import get_settings
from db.models import Image
from db.queries import job_status, latest_result, list_jobs, query_results, queue_depth, resolve_job
from db.repository import CharOutcome, ImageOutcome, create_job, record_outcomes, register_images
from db.session import dispose_engines, session_factory, upgrade

REQUIRED = {"job", "path", "status", "text", "score", "error", "model_version", "chars"}

# job "first": five images; job "second": two images, one a path of "first" decoded again later
FIRST = [("ab12", 0.95), ("abz9", 0.60), ("k7m", 0.80), (None, "truncated image file"), (None, None)]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request) -> str:
    """A migrated, empty database: a SQLite file, then a fresh PostgreSQL schema."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
    upgrade(url)
    yield url
    dispose_engines()


def outcome(image_id: int, text: str, score: float, version: str = "v1") -> ImageOutcome:
    chars = [CharOutcome(k, ch, (10.0 * k, 5.0, 10.0 * k + 9, 35.0), score) for k, ch in enumerate(text)]
    return ImageOutcome(image_id=image_id, status="done", model_version=version, text=text, score=score,
                        chars=chars, width=200, height=50)  # fmt: skip


@pytest.fixture()
def filled(db_url) -> dict:
    """Two jobs with done, failed and pending images; returns their ids and paths."""
    Session = session_factory(db_url)
    with Session() as session:
        first = create_job(session, "first")
        images = register_images(session, first, [(f"/data/q/{k}.png", 10 + k, 100 + k) for k in range(5)])
        outcomes = []
        for (image_id, _), (text, extra) in zip(images, FIRST):
            if text is not None:
                outcomes.append(outcome(image_id, text, extra))
            elif extra is not None:
                outcomes.append(ImageOutcome(image_id=image_id, status="failed", error=extra, model_version="v1"))
        record_outcomes(session, outcomes)
        session.commit()

        second = create_job(session, "second")
        again = register_images(session, second, [("/data/q/0.png", 10, 100), ("/data/q/9.png", 1, 1)], force=True)
        record_outcomes(session, [outcome(again[0][0], "ab13", 0.99, version="v2"), outcome(again[1][0], "zz", 0.5)])
        session.commit()
        # make the second decoding of /data/q/0.png clearly the later one
        session.execute(sa.update(Image).where(Image.id == again[0][0]).values(
            finished_at=datetime.now(timezone.utc) + timedelta(seconds=5)))  # fmt: skip
        session.commit()
    return {"url": db_url, "first": first.id, "second": second.id, "images": images, "again": again}


def paths(rows: list[dict]) -> list[str]:
    return [r["path"] for r in rows]


def test_rows_carry_results_characters_and_errors(filled):
    with session_factory(filled["url"])() as session:
        rows = query_results(session, job=filled["first"])
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed", "pending"]
    assert [r["text"] for r in rows] == ["ab12", "abz9", "k7m", None, None]
    first = rows[0]
    assert REQUIRED <= set(first)
    assert (first["job"], first["model_version"], first["width"], first["height"]) == (filled["first"], "v1", 200, 50)
    assert [c["char"] for c in first["chars"]] == list("ab12")
    assert first["chars"][1] == {"index": 1, "char": "b", "box": [10.0, 5.0, 19.0, 35.0], "score": 0.95}
    failed = rows[3]
    assert (failed["error"], failed["score"], failed["chars"]) == ("truncated image file", None, [])
    json.dumps(rows)  # every value is JSON-native


def test_filters(filled):
    with session_factory(filled["url"])() as session:
        q = lambda **kw: paths(query_results(session, **kw))  # noqa: E731
        assert q(status="done", job=filled["first"]) == ["/data/q/0.png", "/data/q/1.png", "/data/q/2.png"]
        assert q(status="failed") == ["/data/q/3.png"]
        assert q(status="pending") == ["/data/q/4.png"]
        assert q(text="ab*") == ["/data/q/0.png", "/data/q/1.png", "/data/q/0.png"]
        assert q(text="AB1?") == ["/data/q/0.png", "/data/q/0.png"]
        assert q(text="%z%") == ["/data/q/1.png", "/data/q/9.png"]
        assert q(text="k7m") == ["/data/q/2.png"]
        assert q(text="k7") == []
        assert q(min_score=0.8) == ["/data/q/0.png", "/data/q/2.png", "/data/q/0.png"]
        assert q(job="second") == ["/data/q/0.png", "/data/q/9.png"]
        assert q(job=str(filled["second"]), min_score=0.9) == ["/data/q/0.png"]
        assert q(job="no such job") == []
        assert q(limit=2) == ["/data/q/0.png", "/data/q/1.png"]
        rows = query_results(session, job="second", text="ab*")
        assert [(r["text"], r["model_version"]) for r in rows] == [("ab13", "v2")]


def test_a_job_named_with_digits(filled):
    """``--job 2024`` is the job with id 2024 when there is one, else the jobs named "2024"."""
    with session_factory(filled["url"])() as session:
        named = create_job(session, "2024")
        register_images(session, named, [("/data/r/a.png", 1, 1)])
        taken = create_job(session, str(filled["first"]))  # a name that is also another job's id
        register_images(session, taken, [("/data/r/b.png", 1, 1)])
        session.commit()
        assert paths(query_results(session, job="2024")) == ["/data/r/a.png"]
        assert paths(query_results(session, job=str(named.id))) == ["/data/r/a.png"]
        assert len(query_results(session, job=str(filled["first"]))) == 5  # the id wins over the name
        assert query_results(session, job="\u00b2") == []  # a digit to str.isdigit, not to int()
        stamp = create_job(session, "20240101123456")  # digits beyond any id the column holds: a name
        register_images(session, stamp, [("/data/r/c.png", 1, 1)])
        session.commit()
        assert paths(query_results(session, job="20240101123456")) == ["/data/r/c.png"]
        assert resolve_job(session, "20240101123456") == stamp.id
        assert resolve_job(session, "99999999999999999999") is None
        assert query_results(session, job=2**40) == [] and resolve_job(session, 2**40) is None


def test_pages_and_limit_across_pages(filled, monkeypatch):
    monkeypatch.setattr(db.queries, "PAGE", 2)
    with session_factory(filled["url"])() as session:
        everything = query_results(session)
        assert len(everything) == 7 and len({r["image_id"] for r in everything}) == 7
        assert [r["image_id"] for r in query_results(session, limit=5)] == [r["image_id"] for r in everything[:5]]
        assert len(query_results(session, status="done", limit=3)) == 3


def test_latest_result_for_a_path(filled):
    with session_factory(filled["url"])() as session:
        latest = latest_result(session, "/data/q/0.png")
        assert (latest["text"], latest["model_version"], latest["job"]) == ("ab13", "v2", filled["second"])
        assert latest_result(session, "/data/q/3.png") is None  # failed: no result
        assert latest_result(session, "/nowhere.png") is None


def test_job_status_throughput_and_eta(filled):
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    with session_factory(filled["url"])() as session:
        ids = [i for i, _ in filled["images"]]
        session.execute(sa.update(Image).where(Image.job_id == filled["first"]).values(enqueued_at=t0))
        for k, image_id in enumerate(ids[:4]):  # 4 finished over 8 s: 0.5 images/s; 1 pending: ETA 2 s
            session.execute(sa.update(Image).where(Image.id == image_id).values(finished_at=t0 + timedelta(seconds=2 * (k + 1))))
        session.commit()
        status = job_status(session, filled["first"])
        assert (status["total"], status["done"], status["failed"], status["pending"]) == (5, 3, 1, 1)
        assert status["images_per_s"] == pytest.approx(0.5)
        assert status["eta_s"] == pytest.approx(2.0)
        assert job_status(session)["total"] == 7
        jobs = list_jobs(session)
        assert [(j["name"], j["total"], j["done"], j["failed"], j["pending"]) for j in jobs] == [
            ("second", 2, 2, 0, 0), ("first", 5, 3, 1, 1)]  # fmt: skip


def test_queue_depth_reads_llen_and_survives_a_dead_broker(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.delete("decode")
    client.rpush("decode", "a", "b", "c")
    try:
        assert queue_depth(redis_url) == 3
    finally:
        client.delete("decode")
        client.close()
    assert queue_depth("redis://127.0.0.1:1/0") is None


# ---------------------------------------------------------------------------------------------- commands


@pytest.fixture()
def settings_env(monkeypatch):
    """Point Settings at an unreachable broker (status must show "unavailable"), restore the cache afterwards."""
    monkeypatch.setenv("CAPTCHA_BROKER_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


def test_results_command_formats_parse(filled):
    url = filled["url"]
    out = run("results", "--database-url", url, "--format", "json")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert len(rows) == 7 and all(REQUIRED <= set(r) for r in rows)
    assert rows[0]["chars"][0]["box"] == [0.0, 5.0, 9.0, 35.0]

    out = run("results", "--database-url", url, "--format", "jsonl", "--status", "done", "--min-score", "0.9")
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["text"], r["job"]) for r in lines] == [("ab12", filled["first"]), ("ab13", filled["second"])]

    out = run("results", "--database-url", url, "--format", "csv", "--job", "first", "--text", "ab*")
    table = list(csv.DictReader(io.StringIO(out.stdout)))
    assert REQUIRED <= set(table[0])
    assert [(r["text"], r["status"]) for r in table] == [("ab12", "done"), ("abz9", "done")]
    assert [c["char"] for c in json.loads(table[1]["chars"])] == list("abz9")

    out = run("results", "--database-url", url, "--format", "json", "--status", "failed")
    [failed] = json.loads(out.stdout)
    assert (failed["error"], failed["text"]) == ("truncated image file", None)
    assert json.loads(run("results", "--database-url", url, "--format", "json", "--text", "nomatch").stdout) == []

    out = run("results", "--database-url", url, "--limit", "3")
    assert out.exit_code == 0 and "ab12" in out.stdout and "k7m" in out.stdout and "zz" not in out.stdout

    for command in (["results", "--job", "nosuch"], ["results", "--job", "77"], ["render", "--job", "nosuch"]):
        out = run(*command, "--database-url", url)
        assert out.exit_code == 1 and f"no job {command[-1]}" in out.stderr, (command, out.output)


def test_status_command(filled, settings_env):
    out = run("status", "--database-url", filled["url"])
    assert out.exit_code == 0, out.output
    text = " ".join(out.stdout.split())
    assert "total 7" in text and "done 5" in text and "failed 1" in text and "pending 1" in text
    assert "queue 'decode' unavailable" in text and "second" in text
    out = run("status", str(filled["first"]), "--database-url", filled["url"])
    assert "total 5" in " ".join(out.stdout.split())
    out = run("status", "999", "--database-url", filled["url"])
    assert out.exit_code == 1 and "no job 999" in out.stderr
    out = run("status", "second", "--database-url", filled["url"])  # by name, as results --job
    assert out.exit_code == 0 and f"job {filled['second']}" in out.stdout and "total 2" in " ".join(out.stdout.split())
    out = run("status", "no such job", "--database-url", filled["url"])
    assert out.exit_code == 1 and "no job no such job" in out.stderr


def test_status_shows_queue_depth(sqlite_url, redis_url, monkeypatch):
    import redis

    upgrade(sqlite_url)
    monkeypatch.setenv("CAPTCHA_BROKER_URL", redis_url)
    get_settings.cache_clear()
    client = redis.Redis.from_url(redis_url)
    client.rpush("decode", *["m"] * 4)
    try:
        out = run("status", "--database-url", sqlite_url)
    finally:
        client.delete("decode")
        client.close()
        get_settings.cache_clear()
        dispose_engines()
    assert "queue 'decode' 4 messages" in " ".join(out.stdout.split())


def test_db_upgrade_command_and_missing_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    out = run("results", "--database-url", url)
    assert out.exit_code == 1 and "db upgrade" in out.stderr
    assert not (tmp_path / "new.db").exists()

    out = run("db", "upgrade", "--database-url", url)
    assert out.exit_code == 0 and "schema created (revision " in out.stdout
    again = run("db", "upgrade", "--database-url", url)
    assert again.exit_code == 0 and "schema up to date (revision " in again.stdout
    older = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(older, revision="0002")
    out = run("db", "upgrade", "--database-url", older)
    assert out.exit_code == 0 and "schema migrated from revision 0002 to " in out.stdout
    assert json.loads(run("results", "--database-url", url, "--format", "json").stdout) == []
    dispose_engines()


def test_printed_urls_hide_passwords():
    out = run("db", "upgrade", "--database-url", "postgresql+psycopg://user:s3cret@127.0.0.1:1/x")
    assert out.exit_code == 1
    assert "s3cret" not in out.output and "user:***@127.0.0.1:1" in out.output


def test_empty_sqlite_file_without_schema_is_reported(tmp_path):
    (tmp_path / "empty.db").touch()
    out = run("status", "--database-url", f"sqlite:///{tmp_path / 'empty.db'}")
    assert out.exit_code == 1 and "no captcha-queue schema" in out.stderr
    dispose_engines()



def test_tables_print_paths_and_names_as_they_are(db_url, settings_env):
    """Square brackets in a path or a job name are text, not rich markup: ``a[/b].png`` used to crash ``results``
    (MarkupError) and ``[bold]x.png`` to print as ``x.png``; control characters cannot reach the terminal."""
    with session_factory(db_url)() as session:
        job = create_job(session, "[/odd]")
        register_images(session, job, [("/d/a[/b].png", 1, 1), ("/d/[bold]x\x1b[31m.png", 1, 1)])
        session.commit()
    out = run("results", "--database-url", db_url)
    assert out.exit_code == 0, out.output
    assert "/d/a[/b].png" in out.stdout and "/d/[bold]x" in out.stdout and "\x1b" not in out.stdout
    out = run("status", "--database-url", db_url)
    assert out.exit_code == 0, out.output
    assert "[/odd]" in out.stdout


def query_plan(session, marker: str, call):
    """Run ``call()`` and return SQLite's plan (``EXPLAIN QUERY PLAN``, one line) of the first statement it sent that
    contains ``marker``, with the parameters it was sent with; and what ``call`` returned."""
    from sqlalchemy import event

    engine, statements = session.get_bind(), []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if marker in statement:
            statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        returned = call()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    statement, parameters = statements[0]
    rows = session.connection().exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
    return " ".join(row[-1] for row in rows), returned


def test_a_jobs_pages_are_read_through_the_job_and_id_index(sqlite_url):
    """``results --job`` reads a job a page at a time in id order: on SQLite without a (job_id, id) index every page
    sorted the whole job again (a temporary B-tree), work growing with the square of the job's size."""
    upgrade(sqlite_url)
    with session_factory(sqlite_url)() as session:
        job = create_job(session, "big")
        register_images(session, job, [(f"/d/{k}.png", 1, 1) for k in range(50)])
        session.commit()
        plan, rows = query_plan(session, "ORDER BY images.id", lambda: query_results(session, job=job.id))
        assert len(rows) == 50
    assert "ix_images_job_id_id" in plan and "TEMP B-TREE" not in plan, plan
    dispose_engines()


def test_after_an_enqueue_one_paths_result_is_looked_up_by_path(sqlite_url):
    """Without statistics SQLite took the index on status (a scan of every done image) to find one path's result;
    ``enqueue`` refreshes them (``refresh_statistics``), and the lookup goes through the index on path."""
    from db.session import refresh_statistics

    upgrade(sqlite_url)
    with session_factory(sqlite_url)() as session:
        job = create_job(session, "many")
        register_images(session, job, [(f"/d/{k}.png", 1, 1) for k in range(500)])
        session.execute(sa.update(Image).where(Image.id % 10 != 0).values(status="done"))
        session.commit()
        refresh_statistics(session)
        session.commit()
        plan, _ = query_plan(session, "images.path =", lambda: latest_result(session, "/d/5.png"))
        assert "USING INDEX ix_images_path" in plan
    dispose_engines()


def test_a_wait_poll_counts_through_the_index_alone(sqlite_url):
    """``enqueue --wait`` asks for a job's counts every half second: they come from the (job_id, status) index
    without reading the table (the times, which would read every row, are asked once at the end)."""
    from db.repository import job_counts

    upgrade(sqlite_url)
    with session_factory(sqlite_url)() as session:
        job = create_job(session, "polled")
        register_images(session, job, [(f"/d/{k}.png", 1, 1) for k in range(20)])
        session.commit()
        plan, counts = query_plan(session, "GROUP BY images.status", lambda: job_counts(session, job.id, times=False))
        assert (counts["total"], counts["pending"], counts["first_enqueued_at"]) == (20, 20, None)
        assert "COVERING INDEX ix_images_job_id_status" in plan, plan
        assert job_counts(session, job.id)["first_enqueued_at"] is not None
    dispose_engines()


def test_statistics_that_cannot_be_refreshed_do_not_fail_the_enqueue(sqlite_url, caplog):
    """``enqueue`` refreshes them after sending everything: a database locked longer than the busy timeout must not
    turn a job that is fully queued into an error."""
    import logging

    from db.session import make_engine, refresh_statistics

    upgrade(sqlite_url)
    blocker = make_engine(sqlite_url).raw_connection()
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with session_factory(sqlite_url)() as session, caplog.at_level(logging.WARNING, logger="db.session"):
            session.connection().exec_driver_sql("PRAGMA busy_timeout=100")
            refresh_statistics(session)
        assert "planner statistics not refreshed" in caplog.text
    finally:
        blocker.rollback()
        blocker.close()
    dispose_engines()


def test_table_cells_show_backslashes_and_line_breaks_as_text(db_url, settings_env):
    with session_factory(db_url)() as session:
        job = create_job(session, "win")
        [(image_id, _)] = register_images(session, job, [("/d/C:\\data\\", 1, 1)])
        record_outcomes(session, [ImageOutcome(image_id=image_id, status="failed", error="line one\nline two",
                                               model_version="v1")])  # fmt: skip
        session.commit()
    out = run("results", "--database-url", db_url)
    assert out.exit_code == 0, out.output
    assert "/d/C:\\data\\ " in out.stdout and "\\\\" not in out.stdout, out.stdout  # no backslash added
    assert "line one line two" in out.stdout  # the line break inside the error is a space, not a broken table
