"""Fault injection, run by hand: real workers, a private Redis and PostgreSQL, faults injected mid-job.

    python bench/faults.py                      # 2,000 images, every fault
    python bench/faults.py --images 500 --faults kill,sigterm

Each fault runs one job of the same synthetic images (enqueued with --force semantics, so every image is decoded
again) through a ``captcha-queue worker`` subprocess, injects the fault while the job runs, then waits for the job
and checks the database:

* kill      ``kill -9`` of the whole worker (solo pool) ``--kills`` times, restarted each time; its unacknowledged
            message comes back after the visibility timeout (set to 15 s here).
* redis     the private Redis (AOF on, fsync always) killed and restarted while the producer is still publishing
            and the worker decoding; both reconnect by themselves.
* redis-lost  every message queued, then Redis killed and restarted empty (its data deleted): the queued
            messages are gone and ``requeue_pending`` (``captcha-queue requeue``) sends the pending images again.
* db        PostgreSQL connections of the worker terminated (``pg_terminate_backend``) while they are inside a
            transaction, ``--drops`` times: the batch is rolled back and written again.
* sigterm   SIGTERM (warm shutdown) ``--kills`` times: the message in hand finishes before the worker exits.

The table counts images: done, failed, lost (still pending when the job should have finished), duplicated (result
rows beyond one per image and model version) and torn (a done image whose result or characters are missing or
inconsistent, i.e. a half-written batch). Every count but done should be 0. Redis runs on its own port (default
6390), never the shared one; everything is stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VISIBILITY_TIMEOUT_S = 15
PER_MESSAGE = 64
FAULTS = ("kill", "redis", "redis-lost", "db", "sigterm")


@dataclass
class Outcome:
    fault: str
    injected: int
    images: int
    done: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    torn: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# services


class PrivateRedis:
    """A ``redis-server`` on its own port with an append-only file in ``directory``; can be killed and restarted."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory, self.port = directory, port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        deadline = time.monotonic() + 15
        while True:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.5).ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def kill(self, wipe: bool = False) -> None:
        """SIGKILL the server (no shutdown save); with ``wipe`` also delete its data, as a lost machine would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if wipe:
            for path in self.directory.iterdir():
                if path.name != "redis.log":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def fresh_postgres(admin_url: str) -> tuple[str, str]:
    """Create an empty database next to ``admin_url``; returns (its URL, its name)."""
    import sqlalchemy as sa

    name = f"captcha_faults_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return str(sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)), name


def drop_postgres(admin_url: str, name: str) -> None:
    import sqlalchemy as sa

    from db.session import dispose_engines

    dispose_engines()
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


# ---------------------------------------------------------------------------------------------------------------
# the job and its checks


def make_checkpoint(directory: Path) -> Path:
    """The shipped checkpoint, else a seeded random ``fast`` model that emits characters (speed is what matters)."""
    from core.checkpoint import default_checkpoint_path, save_checkpoint

    if default_checkpoint_path().exists():
        return default_checkpoint_path()
    import torch

    from core.models import build_model

    torch.manual_seed(0)
    model = build_model("fast")
    with torch.no_grad():
        model.box_head.cls.weight.normal_(0.0, 50.0)
        model.box_head.cls.bias[-1] = -20.0
    return save_checkpoint(model, directory / "random.safetensors", {"version": "faults-random"})


def register(db: str, folder: Path, name: str) -> tuple[int, list[tuple[int, str]]]:
    """A new job holding every image of ``folder`` (forced); returns its id and (image_id, path) pairs."""
    from core.paths import path_to_text
    from db.repository import create_job, register_images
    from db.session import session_factory
    from producer.scan import scan

    files = [(path_to_text(f.path), f.size, f.mtime_ns) for f in scan([folder])]
    with session_factory(db)() as session:
        job = create_job(session, name)
        todo = register_images(session, job, files, force=True)
        session.commit()
        return job.id, todo


def publish_all(broker: str, queue: str, job_id: int, todo, pause_s: float = 0.0, on_message=None) -> int:
    """Publish the job's messages over one producer connection (``pause_s`` between messages)."""
    from core.celery_app import app
    from producer.enqueue import publish

    sent = 0
    with app.connection_for_write(broker) as conn, app.amqp.Producer(conn) as producer:
        for start in range(0, len(todo), PER_MESSAGE):
            publish(producer, job_id, todo[start : start + PER_MESSAGE], queue, PER_MESSAGE)
            sent += 1
            if on_message is not None:
                on_message(sent)
            time.sleep(pause_s)
    return sent


def counts(db: str, job_id: int) -> dict:
    from db.repository import job_counts
    from db.session import session_factory
    from sqlalchemy.exc import OperationalError

    for _ in range(20):  # the db fault may cut this connection too
        try:
            with session_factory(db)() as session:
                return job_counts(session, job_id)
        except OperationalError:
            time.sleep(0.2)
    raise RuntimeError("database unreachable")


def wait_until(db: str, job_id: int, finished: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        c = counts(db, job_id)
        if c["done"] + c["failed"] >= finished or time.monotonic() > deadline:
            return c
        time.sleep(0.2)


def audit(db: str, job_id: int, outcome: Outcome) -> None:
    """Fill done/failed/lost/duplicated/torn from the database."""
    import sqlalchemy as sa

    from db.models import Character, Image, Result
    from db.session import session_factory

    with session_factory(db)() as session:
        images = session.execute(sa.select(Image.id, Image.status, Image.model_version).where(Image.job_id == job_id)).all()
        ids = [i.id for i in images]
        results = session.execute(
            sa.select(Result.id, Result.image_id, Result.model_version, Result.text).where(Result.image_id.in_(ids))
        ).all()
        chars: dict[int, list[tuple[int, str]]] = {}
        for result_id, index, char in session.execute(
            sa.select(Character.result_id, Character.index, Character.char).where(
                Character.result_id.in_([r.id for r in results])
            )
        ):
            chars.setdefault(result_id, []).append((index, char))
    per_key: dict[tuple[int, str], list] = {}
    for r in results:
        per_key.setdefault((r.image_id, r.model_version), []).append(r)
    outcome.images = len(images)
    outcome.done = sum(i.status == "done" for i in images)
    outcome.failed = sum(i.status == "failed" for i in images)
    outcome.lost = sum(i.status == "pending" for i in images)
    outcome.duplicated = sum(len(rows) - 1 for rows in per_key.values()) + sum(
        len({v for (image, v) in per_key if image == i.id}) > 1 for i in images
    )
    torn = 0
    for image in images:
        if image.status != "done":
            continue
        rows = per_key.get((image.id, image.model_version), [])
        if len(rows) != 1:
            torn += 1
            continue
        got = sorted(chars.get(rows[0].id, []))
        if [i for i, _ in got] != list(range(len(rows[0].text))) or "".join(c for _, c in got) != rows[0].text:
            torn += 1
    outcome.torn = torn
    with session_factory(db)() as session:
        errors = session.execute(
            sa.select(Image.error, sa.func.count()).where(Image.job_id == job_id, Image.status == "failed")
            .group_by(Image.error).limit(3)
        ).all()  # fmt: skip
    outcome.notes += [f"{count} failed: {error[:200]}" for error, count in errors]


# ---------------------------------------------------------------------------------------------------------------
# faults


class Run:
    """Shared state of one fault run: services, folder, checkpoint, worker factory."""

    def __init__(self, args: argparse.Namespace, work: Path, redis: PrivateRedis, db: str, checkpoint: Path,
                 folder: Path) -> None:  # fmt: skip
        self.args, self.work, self.redis, self.db = args, work, redis, db
        self.checkpoint, self.folder = checkpoint, folder
        self.logs: list[Path] = []

    def worker(self, queue: str, db: str | None = None):
        from worker.process import WorkerProcess

        env = {"CAPTCHA_BROKER_URL": self.redis.url, "CAPTCHA_DATABASE_URL": db or self.db,
               "CAPTCHA_CHECKPOINT": str(self.checkpoint), "CAPTCHA_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT_S),
               "CAPTCHA_TORCH_THREADS": str(self.args.threads)}  # fmt: skip
        log = self.work / "logs" / f"{queue}-{len(self.logs)}.log"
        self.logs.append(log)
        return WorkerProcess(log, queues=queue, batch_size=self.args.batch_size, env=env)

    def timeout(self) -> float:
        return max(120.0, self.args.images / 5.0)


def thresholds(total: int, n: int) -> list[int]:
    """``n`` finished-image counts spread over the job (10% to 80%)."""
    return [int(total * (0.1 + 0.7 * k / max(1, n - 1))) for k in range(n)] if n > 1 else [total // 3]


def fault_kill(run: Run, job_id: int, todo, queue: str, out: Outcome, sig: int) -> None:
    worker = run.worker(queue).start()
    publish_all(run.redis.url, queue, job_id, todo)
    total = len(todo)
    try:
        for target in thresholds(total, run.args.kills):
            c = wait_until(run.db, job_id, target, run.timeout())
            if c["done"] + c["failed"] >= total:
                out.notes.append(f"job finished before injection {out.injected + 1}")
                break
            if sig == signal.SIGKILL:
                worker.process.kill()
                worker.process.wait()
            else:
                sent_at = datetime.now()  # Celery logs local time
                worker.process.send_signal(signal.SIGTERM)
                code = worker.process.wait(timeout=120)
                stamps = re.findall(r"^\[([\d-]+ [\d:]+,\d+): INFO/MainProcess\] job \d+: \d+ images", worker.log(), re.M)
                finished = sum(datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") >= sent_at for t in stamps)
                out.notes.append(f"exit status {code}; messages finished between SIGTERM and exit: {finished}")
            out.injected += 1
            worker = run.worker(queue).start()
        wait_until(run.db, job_id, total, run.timeout() + VISIBILITY_TIMEOUT_S * (run.args.kills + 2))
    finally:
        worker.stop()


def fault_redis(run: Run, job_id: int, todo, queue: str, out: Outcome) -> None:
    """Redis killed and restarted from its append-only file while the producer publishes and the worker decodes."""
    worker = run.worker(queue).start()
    restart_at = max(2, len(todo) // PER_MESSAGE // 3)

    def restart_redis(sent: int) -> None:
        if sent == restart_at:
            wait_until(run.db, job_id, PER_MESSAGE, run.timeout())  # the worker is busy on the first message

            def bounce() -> None:
                run.redis.kill()
                time.sleep(3)
                run.redis.start()

            threading.Thread(target=bounce).start()
            out.injected += 1

    try:
        started = time.monotonic()
        publish_all(run.redis.url, queue, job_id, todo, pause_s=0.2, on_message=restart_redis)
        out.notes.append(f"producer published {len(todo)} images over one connection in {time.monotonic() - started:.1f} s")
        wait_until(run.db, job_id, len(todo), run.timeout())
        out.notes.append(f"worker connected {worker.log().count('Connected to redis://')} times")
    finally:
        worker.stop()


def fault_redis_lost(run: Run, job_id: int, todo, queue: str, out: Outcome) -> None:
    """Every message queued, then Redis restarted empty: the pending images are sent again with ``requeue``."""
    from producer.requeue import requeue_pending

    worker = run.worker(queue).start()
    try:
        publish_all(run.redis.url, queue, job_id, todo)
        wait_until(run.db, job_id, 1, run.timeout())  # the worker is on its first message
        run.redis.kill(wipe=True)
        time.sleep(3)
        run.redis.start()
        out.injected += 1
        c = wait_until(run.db, job_id, len(todo), 45)  # the message in hand finishes; the rest is gone
        sent = requeue_pending(job_id, queue=queue, paths_per_message=PER_MESSAGE, database_url=run.db,
                               broker_url=run.redis.url)  # fmt: skip
        out.notes.append(f"{c['pending']} images pending 45 s after the queue was lost; requeued {sent}")
        wait_until(run.db, job_id, len(todo), run.timeout())
        out.notes.append(f"worker connected {worker.log().count('Connected to redis://')} times")
    finally:
        worker.stop()


def fault_db(run: Run, job_id: int, todo, queue: str, out: Outcome) -> None:
    import sqlalchemy as sa

    app_name = f"faults-worker-{uuid.uuid4().hex[:6]}"
    worker_db = run.db + ("&" if "?" in run.db else "?") + f"application_name={app_name}"
    worker = run.worker(queue, db=worker_db).start()
    publish_all(run.redis.url, queue, job_id, todo)
    killer = sa.create_engine(run.db, isolation_level="AUTOCOMMIT")
    in_transaction = sa.text(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :app "
        "AND xact_start IS NOT NULL AND state IN ('active', 'idle in transaction') AND pid <> pg_backend_pid()"
    )
    try:
        for target in thresholds(len(todo), run.args.drops):
            wait_until(run.db, job_id, target, run.timeout())
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # catch the worker inside a batch's transaction
                with killer.connect() as conn:
                    if any(conn.execute(in_transaction, {"app": app_name}).scalars()):
                        out.injected += 1
                        break
                time.sleep(0.005)
        wait_until(run.db, job_id, len(todo), run.timeout())
        retries = worker.log().count("database write failed")
        out.notes.append(f"worker retried {retries} batch writes after a dropped connection")
    finally:
        killer.dispose()
        worker.stop()


# ---------------------------------------------------------------------------------------------------------------


def print_table(outcomes: list[Outcome]) -> None:
    header = ("fault", "times injected", "images", "done", "failed", "lost", "duplicated", "torn", "seconds")
    rows = [(o.fault, o.injected, o.images, o.done, o.failed, o.lost, o.duplicated, o.torn, f"{o.seconds:.0f}")
            for o in outcomes]  # fmt: skip
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda values: "| " + " | ".join(str(v).rjust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
    for o in outcomes:
        for note in o.notes:
            print(f"  {o.fault}: {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--kills", type=int, default=5, help="kill -9 and SIGTERM injections")
    parser.add_argument("--drops", type=int, default=5, help="database connections terminated")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the worker")
    parser.add_argument("--redis-port", type=int, default=6390)
    parser.add_argument("--postgres-url", default=os.environ.get("CAPTCHA_TEST_POSTGRES_URL",
                                                                 "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))  # fmt: skip
    args = parser.parse_args()
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults: {', '.join(sorted(unknown))}")

    from core.synth import generate
    from db.session import upgrade

    work = Path(tempfile.mkdtemp(prefix="captcha-faults-"))
    redis = PrivateRedis(work / "redis", args.redis_port)
    db, db_name = fresh_postgres(args.postgres_url)
    outcomes: list[Outcome] = []
    try:
        redis.start()
        upgrade(db)
        print(f"generating {args.images} images in {work} ...", flush=True)
        generate(work / "data", args.images, seed=7, progress=False)
        run = Run(args, work, redis, db, make_checkpoint(work), work / "data" / "images")
        for fault in faults:
            queue = f"faults-{fault}-{uuid.uuid4().hex[:6]}"
            job_id, todo = register(db, run.folder, f"faults-{fault}")
            out = Outcome(fault, 0, len(todo))
            print(f"{fault}: job {job_id}, {len(todo)} images ...", flush=True)
            started = time.monotonic()
            if fault == "kill":
                fault_kill(run, job_id, todo, queue, out, signal.SIGKILL)
            elif fault == "sigterm":
                fault_kill(run, job_id, todo, queue, out, signal.SIGTERM)
            elif fault == "redis":
                fault_redis(run, job_id, todo, queue, out)
            elif fault == "redis-lost":
                fault_redis_lost(run, job_id, todo, queue, out)
            else:
                fault_db(run, job_id, todo, queue, out)
            out.seconds = time.monotonic() - started
            audit(db, job_id, out)
            outcomes.append(out)
            print_table([out])
        print()
        print_table(outcomes)
    finally:
        redis.stop()
        drop_postgres(args.postgres_url, db_name)
        shutil.rmtree(work, ignore_errors=True)
    bad = sum(o.lost + o.duplicated + o.torn + o.failed for o in outcomes)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
