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

from test_worker import reference_texts, rows, small_checkpoint
from worker.process import WorkerProcess

pytestmark = pytest.mark.redis

BATCH_SIZE = 16
PER_MESSAGE = 64  # Settings.paths_per_message default


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return small_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def detector(checkpoint):
    from core.detector import Detector

    return Detector.load(checkpoint, device="cpu")


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


def start_worker(tmp_path: Path, broker: str, db: str, checkpoint: Path, queue: str, **env: str) -> WorkerProcess:
    environment = {"CAPTCHA_BROKER_URL": broker, "CAPTCHA_DATABASE_URL": db, "CAPTCHA_CHECKPOINT": str(checkpoint),
                   **env}  # fmt: skip
    return WorkerProcess(tmp_path / f"worker-{time.monotonic_ns()}.log", queues=queue, batch_size=BATCH_SIZE,
                         env=environment)  # fmt: skip


def cli(*args: str, broker: str, db: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAPTCHA_BROKER_URL": broker, "CAPTCHA_DATABASE_URL": db}
    return subprocess.run([sys.executable, "-m", "core.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def flat(text: str) -> str:
    """Console output with line wrapping undone."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def expected(detector, folder) -> dict[str, str]:
    """In-process predictions for the folder, message by message as the producer groups its scan."""
    from producer.scan import scan

    items = [(i, f.path) for i, f in enumerate(scan([folder]))]
    texts: dict[str, str] = {}
    for start in range(0, len(items), PER_MESSAGE):
        texts.update(reference_texts(detector, items[start : start + PER_MESSAGE], BATCH_SIZE))
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


def run_pipeline(tmp_path, broker, db, checkpoint, expected, folder, queue, reenqueue: bool) -> None:
    with start_worker(tmp_path, broker, db, checkpoint, queue) as worker:
        first = cli("enqueue", str(folder), "--queue", queue, "--wait", broker=broker, db=db)
        assert first.returncode == 0, first.stderr + worker.log()[-3000:]
        job_id = int(first.stdout.strip())
        assert "50 done, 1 failed of 51" in flat(first.stderr)
        check_decoded(expected, db, job_id, folder)
        if not reenqueue:
            return

        # without --force only the failed file is tried again: the 50 decoded ones add no work
        again = cli("enqueue", str(folder), "--queue", queue, "--wait", broker=broker, db=db)
        assert again.returncode == 0, again.stderr
        assert "1 images enqueued in 1 messages (50 unchanged skipped, 51 found)" in flat(again.stderr)
        retried = job_rows(db, int(again.stdout.strip()))
        assert list(retried) == [str(folder / "zzbroken-0.png")] and retried[str(folder / "zzbroken-0.png")]["status"] == "failed"

        forced = cli("enqueue", str(folder), "--queue", queue, "--force", "--wait", broker=broker, db=db)
        assert forced.returncode == 0, forced.stderr
        assert "51 images enqueued" in flat(forced.stderr) and "50 done, 1 failed of 51" in flat(forced.stderr)
        check_decoded(expected, db, int(forced.stdout.strip()), folder)
    assert "Traceback" not in worker.log()


def test_pipeline_sqlite(tmp_path, redis_url, sqlite_url, checkpoint, expected, folder, queue):
    from db.session import upgrade

    upgrade(sqlite_url)
    run_pipeline(tmp_path, redis_url, sqlite_url, checkpoint, expected, folder, queue, reenqueue=True)


@pytest.mark.postgres
def test_pipeline_postgres(tmp_path, redis_url, postgres_url, checkpoint, expected, folder, queue):
    from db.session import upgrade

    upgrade(postgres_url)
    run_pipeline(tmp_path, redis_url, postgres_url, checkpoint, expected, folder, queue, reenqueue=False)
