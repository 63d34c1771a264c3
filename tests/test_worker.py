"""The worker side in-process: message validation, batch planning, decoding into a real database, the Celery task.

Decoding runs a real (small) detector on synthetic CAPTCHAs and writes to a real SQLite database.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from core.celery_app import DECODE_QUEUE, DECODE_TASK, app
from worker.decode import MessageError, decode_images, parse_images, plan_batches
from worker.main import WorkerConfigError, worker_argv


@pytest.fixture(scope="module")
def captchas(tmp_path_factory) -> list[Path]:
    from core.synth import generate

    out = tmp_path_factory.mktemp("captchas")
    generate(out, 16, seed=3, workers=1, progress=False)
    return sorted((out / "images").glob("*.png"))


def make_db(url: str, paths: list[str]) -> list[tuple[int, str]]:
    from db.repository import create_job, register_images
    from db.session import session_factory, upgrade

    upgrade(url)
    with session_factory(url)() as session:
        job = create_job(session, "test")
        todo = register_images(session, job, [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths])
        session.commit()
    return todo


def rows(url: str) -> dict[str, dict]:
    """Per path: status, error, model_version, and the result's text and characters."""
    from db.models import Character, Image, Result
    from db.session import session_factory

    out = {}
    with session_factory(url)() as session:
        for image in session.scalars(sa.select(Image)):
            result = session.scalar(
                sa.select(Result).where(Result.image_id == image.id, Result.model_version == image.model_version)
            )
            chars = []
            if result is not None:
                chars = session.scalars(
                    sa.select(Character).where(Character.result_id == result.id).order_by(Character.index)
                ).all()
            out[image.path] = {
                "status": image.status,
                "error": image.error,
                "version": image.model_version,
                "text": result.text if result else None,
                "width": result.width if result else None,
                "chars": [(c.index, c.char, (c.x1, c.y1, c.x2, c.y2)) for c in chars],
            }
    return out


def reference_texts(detector, items: list[tuple[int, str]], batch_size: int) -> dict[str, str]:
    """What ``Detector.predict`` decodes in-process for the same batches the worker forms.

    Predictions depend on which images share a padded batch, so the reference predicts the same batches.
    """
    from core.images import ImageError, load_image

    texts = {}
    for batch in plan_batches(items, batch_size):
        readable = []
        for i in batch:
            try:
                readable.append((items[i][1], load_image(items[i][1])))
            except ImageError:
                pass
        if readable:
            for (path, _), pred in zip(readable, detector.predict([im for _, im in readable], batch_size=len(readable))):
                texts[path] = pred.text
    return texts


# ---------------------------------------------------------------------------------------------------------------
# messages and planning


def test_parse_images_accepts_pairs_and_rejects_anything_else():
    assert parse_images([[1, "/a.png"], [2, "/b.png"]]) == [(1, "/a.png"), (2, "/b.png")]
    assert parse_images([]) == []
    for bad in ("/a.png", [[1]], [["1", "/a.png"]], [[True, "/a.png"]], [[1, b"/a.png"]], [[1, "/a", 3]], None,
                [[0, "/a.png"]], [[-1, "/a.png"]], [[2**31, "/a.png"]], [[2**40, "/a.png"]]):  # ids no INTEGER id can be
        with pytest.raises(MessageError):
            parse_images(bad)
    # an image listed again is decoded once; a message is at most MAX_MESSAGE_IMAGES long, and says so briefly
    assert parse_images([[1, "/a.png"], [2, "/b.png"], [1, "/a.png"]]) == [(1, "/a.png"), (2, "/b.png")]
    from worker.decode import MAX_MESSAGE_IMAGES

    with pytest.raises(MessageError, match=f"more than {MAX_MESSAGE_IMAGES}"):
        parse_images([[1, "/a.png"]] * (MAX_MESSAGE_IMAGES + 1))
    with pytest.raises(MessageError) as exc:
        parse_images([["x" * 5_000_000, "/a.png"]])
    assert len(str(exc.value)) < 200


def test_plan_batches_orders_by_aspect_and_covers_every_image_once(captchas, tmp_path):
    from PIL import Image

    broken = tmp_path / "broken-0.png"
    broken.write_bytes(b"not a png")
    items = [(i, str(p)) for i, p in enumerate(captchas)] + [(99, str(broken))]
    batches = plan_batches(items, 5)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(items)))
    assert [len(b) for b in batches] == [5, 5, 5, 2]
    assert flat[0] == len(items) - 1  # unreadable header: aspect 0, planned first (and failed on load)
    widths = [Image.open(items[i][1]).width for i in flat[1:]]  # synthetic CAPTCHAs are all 80 px high
    assert widths == sorted(widths)


# ---------------------------------------------------------------------------------------------------------------
# decoding into a database


def test_decode_writes_every_image_one_transaction_per_batch(detector, captchas, tmp_path, sqlite_url):
    from db.session import make_engine, session_factory

    broken = tmp_path / "truncated-0.png"
    broken.write_bytes(captchas[0].read_bytes()[:200])
    empty = tmp_path / "empty-0.png"
    empty.write_bytes(b"")
    paths = [str(p) for p in captchas] + [str(broken), str(empty)]
    items = make_db(sqlite_url, paths)
    expected = reference_texts(detector, items, batch_size=8)

    commits = []
    sa.event.listen(make_engine(sqlite_url), "commit", lambda conn: commits.append(1))
    summary = decode_images(
        items, detector, session_factory(sqlite_url), 8, max_pixels=4_000_000, max_width=4096
    )

    assert (summary.done, summary.failed) == (len(captchas), 2)
    assert len(commits) == len(plan_batches(items, 8)) == 3
    got = rows(sqlite_url)
    assert {p: r["text"] for p, r in got.items() if r["status"] == "done"} == expected
    assert any(expected.values())  # the model does emit characters
    assert got[str(broken)]["status"] == "failed" and "truncated" in got[str(broken)]["error"]
    assert got[str(empty)]["status"] == "failed" and "empty file" in got[str(empty)]["error"]
    for path in map(str, captchas):
        row = got[path]
        assert row["version"] == detector.version
        assert "".join(c for _, c, _ in row["chars"]) == row["text"]
        assert [i for i, _, _ in row["chars"]] == list(range(len(row["text"])))
        assert all(0 <= x1 <= x2 <= row["width"] for _, _, (x1, _, x2, _) in row["chars"])


def test_redelivered_message_rewrites_rows_without_duplicates(detector, captchas, sqlite_url):
    from db.models import Character, Result
    from db.session import session_factory

    items = make_db(sqlite_url, [str(p) for p in captchas[:6]])
    sessions = session_factory(sqlite_url)
    for _ in range(2):
        decode_images(items, detector, sessions, 4, max_pixels=4_000_000, max_width=4096)
    first = rows(sqlite_url)
    with sessions() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Result)) == 6
        n_chars = session.scalar(sa.select(sa.func.count()).select_from(Character))
    assert n_chars == sum(len(r["chars"]) for r in first.values())



def test_writes_overlap_the_next_batch_and_all_commit_before_returning(detector, captchas, sqlite_url, monkeypatch):
    import threading
    import time

    from db.session import session_factory
    from worker import decode as decode_module

    items = make_db(sqlite_url, [str(p) for p in captchas[:12]])
    events: list[tuple[str, int, float, str]] = []
    real_write = decode_module.write_outcomes

    class SlowDetector:  # the real detector, made slow enough that a write can only overlap it if it runs alongside
        version = detector.version

        def __init__(self) -> None:
            self.calls = 0

        def predict(self, images, batch_size):
            k, self.calls = self.calls, self.calls + 1
            events.append(("infer-start", k, time.perf_counter(), threading.current_thread().name))
            result = detector.predict(images, batch_size=batch_size)
            time.sleep(0.3)
            events.append(("infer-end", k, time.perf_counter(), threading.current_thread().name))
            return result

    writes = 0

    def recording_write(sessions, outcomes, attempts=decode_module.WRITE_ATTEMPTS):
        nonlocal writes
        k, writes = writes, writes + 1
        events.append(("write-start", k, time.perf_counter(), threading.current_thread().name))
        real_write(sessions, outcomes, attempts)
        events.append(("write-end", k, time.perf_counter(), threading.current_thread().name))

    monkeypatch.setattr(decode_module, "write_outcomes", recording_write)
    summary = decode_module.decode_images(items, SlowDetector(), session_factory(sqlite_url), 4, max_pixels=4_000_000,
                                          max_width=4096)  # fmt: skip
    assert summary.done == 12 and writes == 3
    at = {(name, k): t for name, k, t, _ in events}
    assert all(thread.startswith("db-writer") for name, _, _, thread in events if name.startswith("write"))
    # batch k is written while batch k + 1 is inferred, and the writes commit in batch order
    assert at[("write-start", 0)] < at[("infer-end", 1)] and at[("write-start", 1)] < at[("infer-end", 2)]
    assert at[("write-end", 0)] <= at[("write-start", 1)] <= at[("write-end", 1)] <= at[("write-start", 2)]
    # the last write has committed when decode_images returns
    assert {r["status"] for r in rows(sqlite_url).values()} == {"done"}


def test_a_write_that_fails_for_good_raises_after_earlier_batches_committed(detector, captchas, sqlite_url, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from db.session import session_factory
    from worker import decode as decode_module

    items = make_db(sqlite_url, [str(p) for p in captchas[:12]])
    real_write = decode_module.write_outcomes
    writes = 0

    def failing_second(sessions, outcomes, attempts=decode_module.WRITE_ATTEMPTS):
        nonlocal writes
        writes += 1
        if writes == 2:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        real_write(sessions, outcomes, attempts)

    monkeypatch.setattr(decode_module, "write_outcomes", failing_second)
    with pytest.raises(OperationalError):
        decode_module.decode_images(items, detector, session_factory(sqlite_url), 4, max_pixels=4_000_000,
                                    max_width=4096)  # fmt: skip
    statuses = sorted(r["status"] for r in rows(sqlite_url).values())
    assert statuses.count("done") == 4 and statuses.count("pending") == 8  # batch 1 kept, batches 2-3 left for a retry

def test_paths_outside_allowed_roots_fail_with_reason(detector, captchas, tmp_path, sqlite_url):
    from db.session import session_factory

    items = make_db(sqlite_url, [str(captchas[0])])
    decode_images(
        items, detector, session_factory(sqlite_url), 4, max_pixels=4_000_000, max_width=4096,
        allowed_roots=(tmp_path.resolve(),),
    )  # fmt: skip
    row = rows(sqlite_url)[str(captchas[0])]
    assert row["status"] == "failed" and "allowed roots" in row["error"]


# ---------------------------------------------------------------------------------------------------------------
# the Celery task, run in this process


@pytest.fixture()
def task_env(monkeypatch, checkpoint, sqlite_url):
    from core.config import get_settings
    from worker.tasks import decode

    monkeypatch.setenv("CAPTCHA_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("CAPTCHA_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("CAPTCHA_DEVICE", "cpu")
    monkeypatch.setenv("CAPTCHA_BATCH_SIZE", "4")
    get_settings.cache_clear()
    decode._runtime = None
    yield decode
    decode._runtime = None
    get_settings.cache_clear()


def test_task_loads_the_detector_once_per_process_and_records_outcomes(task_env, captchas, sqlite_url):
    items = make_db(sqlite_url, [str(p) for p in captchas[:5]])
    decode = task_env
    assert decode.name == DECODE_TASK
    assert decode._runtime is None  # nothing loaded at import or registration
    result = decode.apply(kwargs={"job_id": 1, "images": [list(x) for x in items[:3]]})
    assert result.get() == {"done": 3, "failed": 0}
    runtime = decode._runtime
    assert runtime is not None and runtime.batch_size == 4
    decode.apply(kwargs={"job_id": 1, "images": [list(x) for x in items[3:]]}).get()
    assert decode._runtime is runtime
    assert {r["status"] for r in rows(sqlite_url).values()} == {"done"}


def test_task_leaves_alone_images_of_another_database(task_env, captchas, sqlite_url, tmp_path, caplog):
    """A message enqueued into another database names ids that mean other images here (or nothing): they are
    neither decoded nor written over; the images that match by id and path are."""
    items = make_db(sqlite_url, [str(p) for p in captchas[:3]])
    elsewhere = make_db(f"sqlite:///{tmp_path / 'other.db'}", [str(p) for p in captchas[3:6]])
    message = [list(items[0]), list(elsewhere[1]), [999, str(captchas[0])]]  # id 2 is another path here
    with caplog.at_level(logging.ERROR, logger="worker.tasks"):
        result = task_env.apply(kwargs={"job_id": 1, "images": message})
    assert result.get() == {"done": 1, "failed": 0}
    got = rows(sqlite_url)
    assert [got[path]["status"] for _, path in items] == ["done", "pending", "pending"]
    assert "2 of 3 images are not registered" in caplog.text and "CAPTCHA_DATABASE_URL" in caplog.text


def test_task_rejects_a_malformed_message(task_env):
    from celery.exceptions import Reject

    result = task_env.apply(kwargs={"job_id": 1, "images": "/etc/passwd"})
    assert isinstance(result.result, Reject)
    result = task_env.apply(kwargs={"job_id": "x" * 100_000, "images": []})  # copied into every log line otherwise
    assert isinstance(result.result, Reject) and "job_id must be a whole number" in str(result.result)


def test_task_marks_images_failed_when_the_detector_cannot_load(task_env, monkeypatch, tmp_path, captchas, sqlite_url):
    from core.config import get_settings

    items = make_db(sqlite_url, [str(p) for p in captchas[:2]])
    monkeypatch.setenv("CAPTCHA_CHECKPOINT", str(tmp_path / "missing.safetensors"))
    get_settings.cache_clear()
    result = task_env.apply(kwargs={"job_id": 1, "images": [list(x) for x in items]})
    assert result.failed()
    got = rows(sqlite_url)
    assert {r["status"] for r in got.values()} == {"failed"}
    assert all("could not load the detector" in r["error"] for r in got.values())
    assert all("missing.safetensors" in r["error"] for r in got.values())  # the reason itself, not "see the log"


# ---------------------------------------------------------------------------------------------------------------
# configuration


def test_celery_configuration_is_json_only_with_late_acks():
    conf = app.conf
    assert conf.task_serializer == conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] >= 600
    assert conf.broker_connection_retry_on_startup
    assert conf.task_ignore_result
    assert app.amqp.router.route({}, DECODE_TASK)["queue"].name == DECODE_QUEUE
    assert app.amqp.router.route({}, "worker.train")["queue"].name == "train"
    # a database outage is waited out, never given up on with the images left pending
    from sqlalchemy.exc import OperationalError

    from worker.tasks import decode

    assert OperationalError in decode.autoretry_for and decode.max_retries is None
    assert decode.retry_backoff_max <= 300


def test_an_interrupted_start_leaves_no_worker_behind(tmp_path, redis_url, monkeypatch):
    """Ctrl-C while waiting for the worker to be ready (``__exit__`` does not run then) still stops the child."""
    from worker import process as process_module

    worker = process_module.WorkerProcess(tmp_path / "worker.log", queues="never-sent-to",
                                          env={"CAPTCHA_BROKER_URL": redis_url})  # fmt: skip

    def interrupted(self) -> str:  # the first look at the log, while the child starts
        raise KeyboardInterrupt

    monkeypatch.setattr(process_module.WorkerProcess, "log", interrupted)
    with pytest.raises(KeyboardInterrupt):
        worker.start()
    assert worker.process is not None and worker.process.poll() is not None


def test_visibility_timeout_is_a_setting_read_from_dotenv_too(tmp_path):
    """Like every CAPTCHA_ setting, the visibility timeout may come from a ``.env`` file in the working directory."""

    (tmp_path / ".env").write_text("CAPTCHA_VISIBILITY_TIMEOUT=77\n")
    env = {k: v for k, v in os.environ.items() if k != "CAPTCHA_VISIBILITY_TIMEOUT"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    probe = "from core.celery_app import app; print(app.conf.broker_transport_options['visibility_timeout'])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    assert out.stdout.strip() == "77"


def test_worker_argv_picks_the_pool_and_refuses_several_processes_per_gpu():
    assert "--pool=solo" in worker_argv(concurrency=1, device="cpu")
    assert "--pool=prefork" in worker_argv(concurrency=2, device="cpu")
    argv = worker_argv(queues="decode,extra", concurrency=1, device="cuda:1")
    assert "--pool=solo" in argv and "--queues=decode,extra" in argv
    with pytest.raises(WorkerConfigError, match="one worker per GPU"):
        worker_argv(concurrency=2, device="cuda:0")
    with pytest.raises(WorkerConfigError):
        worker_argv(concurrency=2, pool="solo")
    for bad in ("gpu", "cuda:x", "CPU", "cuda:0,1"):
        with pytest.raises(WorkerConfigError, match="expected auto, cpu, cuda or cuda:N"):
            worker_argv(device=bad)
    with pytest.raises(WorkerConfigError, match="--loglevel 'loud': expected debug, info"):
        worker_argv(device="cpu", loglevel="loud")
    assert "--loglevel=WARNING" in worker_argv(device="cpu", loglevel="warning")
    for nothing in ("", ",", " , "):
        with pytest.raises(WorkerConfigError, match="--queues names no queue"):
            worker_argv(queues=nothing, device="cpu")
    assert "--queues=decode,train" in worker_argv(queues=" decode, train,", device="cpu")


def test_a_worker_that_could_only_fail_refuses_to_start(tmp_path):
    """A missing checkpoint file with no champion to serve instead, or a CUDA device that is not there: an error at
    start, not a worker that says "ready" and then fails every image it takes."""
    from worker.main import check_before_start

    def never():
        raise AssertionError("need not be asked")

    def no() -> bool:
        return False

    with pytest.raises(WorkerConfigError, match="missing.safetensors: no such file, and the database names no champion"):
        check_before_start("cpu", tmp_path / "missing.safetensors", never, no)
    check_before_start("cpu", tmp_path / "missing.safetensors", never, lambda: True)  # the champion is served
    with pytest.raises(WorkerConfigError, match="cuda:0: PyTorch sees 0 CUDA device"):
        check_before_start("cuda:0", None, lambda: 0, never)
    with pytest.raises(WorkerConfigError, match="cuda:3: PyTorch sees 2 CUDA device"):
        check_before_start("cuda:3", None, lambda: 2, never)
    check_before_start("cuda", None, lambda: 1, never)
    check_before_start("cuda:1", None, lambda: 2, never)
    check_before_start("cpu", None, never, never)
    (tmp_path / "model.safetensors").write_bytes(b"")
    check_before_start("auto", tmp_path / "model.safetensors", never, never)
    out = subprocess.run([sys.executable, "-m", "core.cli", "worker", "--device", "gpu"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "expected auto, cpu, cuda or cuda:N" in out.stderr


def test_a_missing_checkpoint_is_refused_only_without_a_champion(sqlite_url):
    from db.models import ModelVersion
    from db.session import session_factory, upgrade
    from worker.main import champion_in_database

    upgrade(sqlite_url)
    assert not champion_in_database(sqlite_url)
    with session_factory(sqlite_url)() as session, session.begin():
        session.add(ModelVersion(number=1, arch="fast", path="/x.safetensors", sha256="ab", status="ready"))
    assert not champion_in_database(sqlite_url)
    with session_factory(sqlite_url)() as session, session.begin():
        session.execute(sa.update(ModelVersion).values(status="champion"))
    assert champion_in_database(sqlite_url)
    assert not champion_in_database("postgresql+psycopg://nobody@127.0.0.1:9/x")  # cannot tell: no champion
    typo = sqlite_url.replace("captcha-queue.db", "typo/cq.db")
    assert not champion_in_database(typo) and not Path(typo.removeprefix("sqlite:///")).parent.exists()  # nothing made


def test_device_auto_on_a_gpu_machine_is_held_to_one_process():
    from worker.main import cuda_devices_in_child, resolve_worker_device

    gpu, no_gpu = (lambda: 1), (lambda: 0)
    assert resolve_worker_device("auto", 4, "auto", gpu) == "cuda"
    with pytest.raises(WorkerConfigError, match="one worker per GPU"):
        worker_argv(concurrency=4, device=resolve_worker_device("auto", 4, "auto", gpu))
    assert resolve_worker_device("auto", 1, "threads", gpu) == "cuda"
    assert resolve_worker_device("auto", 4, "auto", no_gpu) == "auto"
    assert "--pool=prefork" in worker_argv(concurrency=4, device=resolve_worker_device("auto", 4, "auto", no_gpu))

    def never() -> int:
        raise AssertionError("a single solo process need not ask")

    assert resolve_worker_device("auto", 1, "auto", never) == "auto"
    assert resolve_worker_device("cpu", 4, "auto", never) == "cpu"
    import torch

    assert cuda_devices_in_child() == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    with pytest.raises(WorkerConfigError, match="could not ask PyTorch how many GPUs.*--device cpu"):
        cuda_devices_in_child(python="/nonexistent/python")  # a child that cannot answer is not taken for "no GPU"


def test_torch_threads_split_the_cores_between_processes(monkeypatch):
    from core.config import Settings
    from worker.runtime import torch_threads

    monkeypatch.delenv("CAPTCHA_TORCH_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert torch_threads(Settings(), 1) == 16
    assert torch_threads(Settings(), 4) == 4
    assert torch_threads(Settings(), 32) == 1
    assert torch_threads(Settings(torch_threads=3), 4) == 3
