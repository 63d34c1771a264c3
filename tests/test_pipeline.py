"""End to end: ``captcha-queue enqueue`` → Redis → a real ``captcha-queue worker`` process → the database.

Each test starts its own worker subprocess on a queue of its own and always stops it. The decoded strings are
compared with what ``Detector.predict`` gives in this process for the same images.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from test_worker import reference_texts, rows
from worker.process import WorkerProcess

pytestmark = pytest.mark.redis

BATCH_SIZE = 16
PER_MESSAGE = 64  # Settings.paths_per_message default


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """50 synthetic CAPTCHAs and one truncated PNG."""
    from core.synth import generate

    out = tmp_path_factory.mktemp("pipeline")
    generate(out, 50, seed=11, workers=1, progress=False)
    images = out / "images"
    good = sorted(images.glob("*.png"))
    (images / "zzbroken-0.png").write_bytes(good[0].read_bytes()[:150])
    return images


@pytest.fixture()
def queue(redis_url):
    import redis

    name = f"pipeline-{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    client.delete(name, *client.keys(f"_kombu.binding*.{name}"))
    client.close()


def start_worker(
    tmp_path: Path, broker: str, db: str, checkpoint: Path, queue: str, concurrency: int = 1, **env: str
) -> WorkerProcess:
    environment = {"CAPTCHA_BROKER_URL": broker, "CAPTCHA_DATABASE_URL": db, "CAPTCHA_CHECKPOINT": str(checkpoint),
                   **env}  # fmt: skip
    return WorkerProcess(tmp_path / f"worker-{time.monotonic_ns()}.log", queues=queue, concurrency=concurrency,
                         batch_size=BATCH_SIZE, env=environment)  # fmt: skip


def cli(*args: str, broker: str, db: str, per_message: int = PER_MESSAGE, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAPTCHA_BROKER_URL": broker, "CAPTCHA_DATABASE_URL": db,
           "CAPTCHA_PATHS_PER_MESSAGE": str(per_message)}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "core.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def flat(text: str) -> str:
    """Console output with line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def expected(detector, folder):
    """``expected(per_message, pattern)``: in-process predictions for the folder's images (those matching
    ``pattern``), message by message as the producer groups them (computed once per argument pair)."""
    from producer.aspect import by_aspect
    from producer.scan import scan

    cache: dict[tuple[int, str | None], dict[str, str]] = {}

    def texts(per_message: int = PER_MESSAGE, pattern: str | None = None) -> dict[str, str]:
        key = (per_message, pattern)
        if key not in cache:
            items = by_aspect([(i, f.path) for i, f in enumerate(scan([folder], pattern=pattern))])
            cache[key] = {}
            for start in range(0, len(items), per_message):
                cache[key].update(reference_texts(detector, items[start : start + per_message], BATCH_SIZE))
        return cache[key]

    return texts


def job_rows(db: str, job_id: int) -> dict[str, dict]:
    from db.models import Image
    from db.session import session_factory

    with session_factory(db)() as session:
        paths = set(session.scalars(sa.select(Image.path).where(Image.job_id == job_id)))
    return {path: row for path, row in rows(db).items() if path in paths}


def check_decoded(expected: dict[str, str], db: str, job_id: int, folder: Path) -> None:
    got = job_rows(db, job_id)
    broken = str(folder / "zzbroken-0.png")
    assert len(got) == 51
    assert got[broken]["status"] == "failed" and "truncated" in got[broken]["error"]
    done = {path: row["text"] for path, row in got.items() if path != broken}
    assert {got[p]["status"] for p in done} == {"done"}
    assert done == expected
    assert any(done.values())


def run_pipeline(
    tmp_path, broker, db, checkpoint, expected, folder, queue, reenqueue: bool, concurrency: int = 1,
    per_message: int = PER_MESSAGE,
) -> None:
    with start_worker(tmp_path, broker, db, checkpoint, queue, concurrency) as worker:
        first = cli("enqueue", str(folder), "--queue", queue, "--wait", broker=broker, db=db, per_message=per_message)
        assert first.returncode == 0, first.stderr + worker.log()[-3000:]
        job_id = int(first.stdout.strip())
        assert "50 done, 1 failed of 51" in flat(first.stderr)
        check_decoded(expected(per_message), db, job_id, folder)
        if not reenqueue:
            assert "Traceback" not in worker.log()
            return

        # without --force only the failed file is tried again: the 50 decoded ones add no work
        again = cli("enqueue", str(folder), "--queue", queue, "--wait", broker=broker, db=db)
        assert again.returncode == 0, again.stderr
        assert "1 images enqueued in 1 messages (50 unchanged skipped, 51 found)" in flat(again.stderr)
        broken = str(folder / "zzbroken-0.png")
        retried = job_rows(db, int(again.stdout.strip()))
        assert list(retried) == [broken] and retried[broken]["status"] == "failed"

        # --force decodes unchanged files again (here the ten named *-1?.png)
        forced = cli("enqueue", str(folder), "--queue", queue, "--force", "--pattern", "*-1?.png", "--wait",
                     broker=broker, db=db)  # fmt: skip
        assert forced.returncode == 0, forced.stderr
        assert "10 images enqueued in 1 messages (0 unchanged skipped, 10 found)" in flat(forced.stderr)
        assert "10 done, 0 failed of 10" in flat(forced.stderr)
        redone = job_rows(db, int(forced.stdout.strip()))
        assert {path: row["text"] for path, row in redone.items()} == expected(pattern="*-1?.png")
    assert "Traceback" not in worker.log()


def test_pipeline_sqlite(tmp_path, redis_url, sqlite_url, checkpoint, expected, folder, queue):
    from db.session import upgrade

    upgrade(sqlite_url)
    run_pipeline(tmp_path, redis_url, sqlite_url, checkpoint, expected, folder, queue, reenqueue=True)


@pytest.mark.postgres
def test_pipeline_postgres_two_worker_processes(tmp_path, redis_url, postgres_url, checkpoint, expected, folder, queue):
    """PostgreSQL, a prefork worker with two processes (each loads its own detector), 16 paths per message."""
    from db.session import upgrade

    upgrade(postgres_url)
    run_pipeline(tmp_path, redis_url, postgres_url, checkpoint, expected, folder, queue, reenqueue=False,
                 concurrency=2, per_message=16)  # fmt: skip


@pytest.mark.fault
def test_message_of_a_killed_worker_is_redelivered_and_written_once(
    tmp_path, redis_url, sqlite_url, checkpoint, expected, folder, queue
):
    """SIGKILL a worker mid-job: its unacknowledged message comes back after the visibility timeout and a second
    worker finishes the job; every image ends with exactly one result."""
    from db.models import Result
    from db.session import session_factory, upgrade
    from producer.enqueue import wait_for_job

    upgrade(sqlite_url)
    fast_redelivery = {"CAPTCHA_VISIBILITY_TIMEOUT": "5"}
    first = start_worker(tmp_path, redis_url, sqlite_url, checkpoint, queue, **fast_redelivery).start()
    try:
        sent = cli("enqueue", str(folder), "--queue", queue, broker=redis_url, db=sqlite_url, per_message=8)
        job_id = int(sent.stdout.strip())
        deadline = time.monotonic() + 60
        while wait_for_job(job_id, database_url=sqlite_url, timeout_s=0).done < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        first.process.kill()
        first.process.wait()
    finally:
        first.stop()
    interrupted = wait_for_job(job_id, database_url=sqlite_url, timeout_s=0)
    assert 0 < interrupted.done + interrupted.failed < 51

    with start_worker(tmp_path, redis_url, sqlite_url, checkpoint, queue, **fast_redelivery):
        final = wait_for_job(job_id, database_url=sqlite_url, timeout_s=120)
    assert (final.done, final.failed) == (50, 1)
    check_decoded(expected(8), sqlite_url, job_id, folder)
    with session_factory(sqlite_url)() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Result)) == 50
