"""End to end: real workers decode a stream of images while a retraining task trains, publishes and promotes a new
version; every decode process switches to it between batches, once, soon after the promotion (a worker looks for a
new champion every second; the test allows ``SWITCH_WITHIN_S`` for a loaded machine), and no image is lost.

Also: a training worker killed mid-run publishes nothing, and the retrain command with ``--wait`` and ``models``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from sample_models import sharpened_random_model
from worker.process import WorkerProcess

TINY = '{"widths": [8, 16, 16], "depths": [0, 0], "feature_width": 16, "head_width": 32}'
PER_MESSAGE = 4
SWITCH_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Training (12), validation (4) and stream (24) synthetic CAPTCHAs."""
    from core.synth import generate

    root = tmp_path_factory.mktemp("hot-reload")
    generate(root / "train", 12, seed=0, workers=1, progress=False)
    generate(root / "val", 4, seed=1, workers=1, progress=False)
    generate(root / "stream", 24, seed=2, workers=1, progress=False)
    return root


@pytest.fixture()
def queues(redis_url):
    import redis

    names = (f"decode-{uuid.uuid4().hex[:8]}", f"train-{uuid.uuid4().hex[:8]}")
    yield names
    client = redis.Redis.from_url(redis_url)
    for name in names:
        client.delete(name, *client.keys(f"_kombu.binding*.{name}"))
    client.close()


def starting_checkpoint(directory: Path) -> Path:
    """A seeded random model as the configured checkpoint: any retrain on the tiny set reads at least as well, so the
    promotion these tests wait for does not depend on how good the shipped checkpoint is."""
    from core.checkpoint import save_checkpoint

    return save_checkpoint(sharpened_random_model(), directory / "random.safetensors", {"version": "test-random"})


def environment(tmp_path: Path, broker: str, db: str) -> dict[str, str]:
    return {
        "CAPTCHA_BROKER_URL": broker, "CAPTCHA_DATABASE_URL": db, "CAPTCHA_TORCH_THREADS": "1",
        "CAPTCHA_CHECKPOINT": str(starting_checkpoint(tmp_path)), "CAPTCHA_CHECKPOINT_DIR": str(tmp_path / "store"),
    }  # fmt: skip


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout)  # fmt: skip


def retrain_args(data: Path, queue: str, *extra: str, scratch: bool = True) -> list[str]:
    start = ["--scratch", "--model-config", TINY] if scratch else []
    return [
        "retrain", "--images", str(data / "train" / "images"), "--labels", str(data / "train" / "labels"),
        "--val-images", str(data / "val" / "images"), "--val-labels", str(data / "val" / "labels"),
        *start, "--batch-size", "6", "--device", "cpu", "--queue", queue, *extra,
    ]  # fmt: skip


def send_stream(broker: str, sessions, paths: list[str], queue: str) -> None:
    """Register ``paths`` as a new job (decoded again even if already done) and send them, 4 per message."""
    from core.celery_app import app
    from db.repository import create_job, register_images
    from producer.enqueue import publish

    with sessions() as session, session.begin():
        job = create_job(session, "stream")
        files = [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
        todo = register_images(session, job, files, force=True)
    with app.connection_for_write(broker) as conn, app.amqp.Producer(conn) as producer:
        publish(producer, job.id, todo, queue, PER_MESSAGE)


def queue_depth(broker: str, queue: str) -> int:
    import redis

    client = redis.Redis.from_url(broker)
    try:
        return int(client.llen(queue))
    finally:
        client.close()


@contextlib.contextmanager
def started_in_background(worker: WorkerProcess) -> Iterator[Future]:
    """Start ``worker`` in a thread (the future says when it is ready); always stop it on leaving."""
    with ThreadPoolExecutor(1) as pool:
        ready = pool.submit(worker.start)
        try:
            yield ready
        finally:
            ready.exception()
            worker.stop()


def test_workers_switch_to_a_promoted_retrain_while_decoding(tmp_path, data, redis_url, sqlite_url, queues):
    from db.models import Image, ModelVersion, Result, TrainingRun, WorkerEvent
    from db.session import session_factory, upgrade

    decode_queue, train_queue = queues
    upgrade(sqlite_url)
    sessions = session_factory(sqlite_url)
    env = environment(tmp_path, redis_url, sqlite_url)
    paths = [str(p) for p in sorted((data / "stream" / "images").glob("*.png"))]
    decoder = WorkerProcess(tmp_path / "decode.log", queues=decode_queue, concurrency=2, batch_size=4, env=env)
    trainer = WorkerProcess(tmp_path / "train.log", queues=train_queue, env=env)
    def top_up() -> None:
        if queue_depth(redis_url, decode_queue) < 4:
            send_stream(redis_url, sessions, paths, decode_queue)

    with decoder, started_in_background(trainer) as trainer_ready:
        # both decode processes are decoding with the configured model before the retrain is sent
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            top_up()
            with sessions() as session:
                loaded = session.scalar(sa.select(sa.func.count()).where(WorkerEvent.event == "load"))
            if loaded == 2:
                break
            time.sleep(0.2)
        assert loaded == 2, decoder.log()[-3000:]
        sent = cli(*retrain_args(data, train_queue, "--epochs", "1"), env=env)
        assert sent.returncode == 0, sent.stderr
        task_id = sent.stdout.strip()
        trainer_ready.result()

        promoted_at = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # images keep coming until both decode processes have switched
            top_up()
            with sessions() as session:
                run = session.scalar(sa.select(TrainingRun).where(TrainingRun.task_id == task_id))
                assert run.status != "failed", run.error + trainer.log()[-3000:]
                if run.status == "succeeded" and promoted_at is None:
                    promoted_at = session.scalar(sa.select(ModelVersion.promoted_at).where(ModelVersion.number == 1))
                    deadline = time.monotonic() + 2 * SWITCH_WITHIN_S
                switched = session.scalar(sa.select(sa.func.count()).where(WorkerEvent.event == "switch"))
            if promoted_at is not None and switched == 2:
                break
            time.sleep(0.2)
        assert promoted_at is not None, "the retrain did not finish and get promoted:\n" + trainer.log()[-3000:]

        # drain: every image of every job gets done
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with sessions() as session:
                unfinished = session.scalar(sa.select(sa.func.count()).where(Image.status == "pending"))
            if unfinished == 0:
                break
            time.sleep(0.5)

    with sessions() as session:
        statuses = dict(session.execute(sa.select(Image.status, sa.func.count()).group_by(Image.status)).all())
        by_version = sa.select(Result.model_version, sa.func.count()).group_by(Result.model_version)
        versions = dict(session.execute(by_version).all())
        events = session.scalars(sa.select(WorkerEvent).order_by(WorkerEvent.id)).all()
        last_switch = max(e.at for e in events if e.event == "switch")
        late = set(session.scalars(sa.select(Result.model_version).where(Result.created_at > last_switch)))
        run = session.scalar(sa.select(TrainingRun).where(TrainingRun.task_id == task_id))
        v1 = session.scalar(sa.select(ModelVersion).where(ModelVersion.number == 1))

    assert list(statuses) == ["done"] and statuses["done"] >= 3 * len(paths), statuses  # nothing failed or lost
    assert run.promoted and run.version == 1 and v1.status == "champion"
    old = next(e.new_version for e in events if e.event == "load")
    assert set(versions) == {old, "v1"} and versions[old] > 0 and versions["v1"] > 0, versions
    assert late <= {"v1"}

    decode_pids = {e.pid for e in events if e.event == "load"}
    assert len(decode_pids) == 2, events  # both decode processes served images
    for pid in decode_pids:
        mine = [e for e in events if e.pid == pid]
        assert [(e.event, e.old_version, e.new_version) for e in mine] == [("load", None, old), ("switch", old, "v1")]
        assert 0 <= (mine[1].at - promoted_at).total_seconds() < SWITCH_WITHIN_S, (mine[1].at, promoted_at)
    assert decoder.log().count(f"switched model {old} -> v1") == 2
    assert "Traceback" not in decoder.log() and "Traceback" not in trainer.log()


def test_a_killed_training_worker_publishes_nothing(tmp_path, data, redis_url, sqlite_url, queues):
    from db.models import ModelVersion, TrainingRun
    from db.session import session_factory, upgrade

    _, train_queue = queues
    upgrade(sqlite_url)
    sessions = session_factory(sqlite_url)
    env = environment(tmp_path, redis_url, sqlite_url)
    trainer = WorkerProcess(tmp_path / "train.log", queues=train_queue, env=env).start()
    try:
        sent = cli(*retrain_args(data, train_queue, "--epochs", "50"), env=env)
        assert sent.returncode == 0, sent.stderr
        task_id = sent.stdout.strip()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kill it once it has finished an epoch (a checkpoint was staged)
            with sessions() as session:
                run = session.scalar(sa.select(TrainingRun).where(TrainingRun.task_id == task_id))
            if run.epoch >= 1:
                break
            time.sleep(0.2)
        assert run.status == "running" and run.epoch >= 1, trainer.log()[-3000:]
        trainer.process.send_signal(signal.SIGKILL)
        trainer.process.wait()
    finally:
        trainer.stop()

    store = tmp_path / "store"
    with sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(ModelVersion)) == 0
    assert not list(store.glob("*.safetensors")) and not list(store.glob("*.json"))  # nothing in the store itself
    # no half-written file outside the run's own staging folder (which a killed run leaves, by design)
    assert not [p for p in store.rglob("*") if p.name.endswith(".tmp") and ".staging" not in p.relative_to(store).parts]
    assert queue_depth(redis_url, train_queue) == 0  # acknowledged on start: not redelivered to run twice

    listed = cli("models", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "no model versions yet" in listed.stdout and task_id[:8] in listed.stdout and "running" in listed.stdout


def test_retrain_wait_then_models_commands(tmp_path, data, redis_url, sqlite_url, queues):
    from db.session import upgrade

    _, train_queue = queues
    upgrade(sqlite_url)
    env = environment(tmp_path, redis_url, sqlite_url)
    with WorkerProcess(tmp_path / "train.log", queues=train_queue, env=env) as trainer:
        first = cli(*retrain_args(data, train_queue, "--epochs", "1", "--wait"), env=env)
        assert first.returncode == 0, first.stderr + trainer.log()[-3000:]
        assert "published v1 after 1/1 epochs" in first.stderr and "promoted" in first.stderr
        second = cli(*retrain_args(data, train_queue, "--epochs", "1", "--force", "--wait"), env=env)
        assert second.returncode == 0 and "published v2" in second.stderr and "forced" in second.stderr
        missing = cli(*retrain_args(data, train_queue, "--from", "v7", scratch=False), env=env)
        assert missing.returncode == 1 and "no model version 7" in missing.stderr

    listed = cli("models", env=env)
    assert listed.returncode == 0 and "v2" in listed.stdout and "champion" in listed.stdout
    shown = cli("models", "show", "v1", env=env)  # as the tables print it, or "1"
    assert '"file": "ok"' in shown.stdout and '"status": "ready"' in shown.stdout
    rolled = cli("models", "rollback", env=env)
    assert rolled.returncode == 0 and "v2 retired; champion: v1" in rolled.stdout
    promoted = cli("models", "promote", "2", env=env)
    assert promoted.returncode == 0 and "v2 is the champion (was v1)" in promoted.stdout
    unknown = cli("models", "promote", "9", env=env)
    assert unknown.returncode == 1 and "no model version 9" in unknown.stderr
    bad = cli("models", "promote", "x2", env=env)
    assert bad.returncode == 2 and "'x2' is not a version (v3, or 3)" in bad.stderr
