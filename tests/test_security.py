"""Security: JSON-only messages, checkpoints never unpickled, passwords masked, no open service ports, bound SQL."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from core.celery_app import DECODE_TASK, app
from core.config import mask_url

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "db", "worker", "producer")
SECRET = "s3cr3t-Pa55"


class WritesMarker:
    """Unpickling this object creates a file: proof that a payload was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def project_sources(dirs: tuple[str, ...] = PACKAGES + ("bench",)) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


# ---------------------------------------------------------------------------------------------------------------
# broker messages


def test_a_pickled_message_is_refused_by_a_real_worker(tmp_path, redis_url, sqlite_url):
    import redis

    from worker.process import WorkerProcess

    marker = tmp_path / "unpickled"
    queue = f"sec-{uuid.uuid4().hex[:8]}"
    env = {"CAPTCHA_BROKER_URL": redis_url, "CAPTCHA_DATABASE_URL": sqlite_url}
    try:
        with WorkerProcess(tmp_path / "worker.log", queues=queue, env=env) as worker:
            with app.connection_for_write(redis_url) as conn:
                app.send_task(DECODE_TASK, kwargs={"job_id": 1, "images": [WritesMarker(marker)]}, queue=queue,
                              serializer="pickle", connection=conn)  # fmt: skip
            deadline = time.monotonic() + 30
            while "Refusing to deserialize" not in worker.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "Refusing to deserialize untrusted content of type pickle" in worker.log()
            assert worker.process.poll() is None
        assert not marker.exists()
        client = redis.Redis.from_url(redis_url)
        assert client.llen(queue) == 0  # dropped, not left to be retried
        client.close()
    finally:
        redis.Redis.from_url(redis_url).delete(queue)


def test_malformed_and_compressed_messages_are_dropped_and_the_worker_goes_on(tmp_path, redis_url, sqlite_url):
    """A body that is not Celery's ``[args, kwargs, embed]``, a list as the task name, a non-numeric time limit: any
    of them used to end the worker (exit status 0), and the message, back on the queue, the next worker too. A
    compressed message (kombu would inflate a 1 KB bzip2 bomb to gigabytes first) is refused as well."""
    import redis
    from kombu import Producer

    from db.session import upgrade
    from worker.process import WorkerProcess

    upgrade(sqlite_url)
    queue = f"sec-{uuid.uuid4().hex[:8]}"
    env = {"CAPTCHA_BROKER_URL": redis_url, "CAPTCHA_DATABASE_URL": sqlite_url, "CAPTCHA_DEVICE": "cpu"}
    good = [[], {"job_id": 1, "images": []}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]

    def headers(**changes):
        return {"lang": "py", "task": DECODE_TASK, "id": str(uuid.uuid4()), "retries": 0, "timelimit": [None, None],
                "root_id": None, "parent_id": None, "argsrepr": "", "kwargsrepr": "", **changes}  # fmt: skip

    try:
        with WorkerProcess(tmp_path / "worker.log", queues=queue, env=env) as worker:
            with app.connection_for_write(redis_url) as conn:
                producer = Producer(conn.default_channel)
                for body, head, options in (
                    ([1], headers(), {}),
                    ({"a": 1}, headers(), {}),
                    (good, headers(task=["not", "a", "name"]), {}),
                    (good, headers(timelimit="x"), {}),
                    (good, headers(), {"compression": "bzip2"}),
                    (good, headers(id="the-good-one"), {}),
                ):
                    producer.publish(body, routing_key=queue, headers=head, serializer="json", **options)
            deadline = time.monotonic() + 60
            while "the-good-one" not in worker.log() and time.monotonic() < deadline:
                time.sleep(0.2)
            while "succeeded" not in worker.log().split("the-good-one")[-1] and time.monotonic() < deadline:
                time.sleep(0.2)
            log = worker.log()
            assert worker.process.poll() is None, log[-3000:]
            assert log.count("rejecting a malformed message") >= 4, log[-3000:]
            assert "Task worker.decode[the-good-one] succeeded" in log, log[-3000:]
        client = redis.Redis.from_url(redis_url)
        assert client.llen(queue) == 0  # dropped, not back on the queue for the next worker
        client.close()
    finally:
        redis.Redis.from_url(redis_url).delete(queue)


def test_celery_accepts_json_only():
    from kombu.exceptions import ContentDisallowed
    from kombu.serialization import dumps, loads

    assert list(app.conf.accept_content) == ["json"] and list(app.conf.result_accept_content) == ["json"]
    assert app.conf.task_serializer == app.conf.result_serializer == app.conf.event_serializer == "json"
    content_type, encoding, body = dumps({"x": 1}, serializer="pickle")
    with pytest.raises(ContentDisallowed):
        loads(body, content_type, encoding, accept=app.conf.accept_content)


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def test_a_pickle_disguised_as_a_checkpoint_is_refused_without_being_unpickled(tmp_path):
    import torch

    from core.checkpoint import CheckpointError, load_checkpoint, metadata_path, save_checkpoint, sha256_file
    from core.models import build_model

    path = save_checkpoint(build_model("fast"), tmp_path / "model.safetensors")
    marker = tmp_path / "unpickled"
    torch.save({"weights": WritesMarker(marker)}, path)  # a torch pickle in place of the weights
    meta = json.loads(metadata_path(path).read_text())
    meta["sha256"] = sha256_file(path)  # even with matching metadata
    metadata_path(path).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_no_code_unpickles():
    """No ``pickle.load(s)``, and ``torch.load`` only with ``weights_only=True``, anywhere in the project."""
    offenders = []
    for path in project_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            if owner in ("pickle", "cPickle", "dill", "joblib") and node.func.attr in ("load", "loads"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if owner == "torch" and node.func.attr == "load":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


# ---------------------------------------------------------------------------------------------------------------
# passwords


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@redis.internal:6379/0",
        f"redis://default:{SECRET}@redis.internal/0",
        f"postgresql+psycopg://captcha:{SECRET}@db.internal:5432/captcha",
        f"postgresql+psycopg://captcha:{SECRET}%40x@db.internal/captcha?sslmode=require",
        f"postgresql+psycopg://captcha:{SECRET}#/?x@db.internal:5432/captcha",  # what a URL parser takes for more
        f"redis://:{SECRET}@redis.internal:99999/0",  # a port no parser accepts
        f"postgresql://u:{SECRET}@[::1]:5432/db",
        f"redis+socket://:{SECRET}@/run/redis.sock",
    ],
)
def test_mask_url_hides_the_password_and_keeps_the_rest(url):
    masked = mask_url(url)
    assert SECRET not in masked and "***" in masked
    assert masked.split("@")[-1] == url.split("@")[-1]
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert mask_url("sqlite:////data/a@b.db") == "sqlite:////data/a@b.db"
    assert mask_url(f"postgresql+psycopg://u@h/db?password={SECRET}&x=1") == "postgresql+psycopg://u@h/db?password=***&x=1"
    assert mask_url(f"postgresql://u@h/db?sslpassword={SECRET}") == "postgresql://u@h/db?sslpassword=***"
    assert mask_url(f"redis://:{SECRET}@h1/0;redis://:{SECRET}@h2/0") == "redis://:***@h1/0;redis://:***@h2/0"
    for kept in ("postgresql://postgres@127.0.0.1:5432/q?options=-c%20x@y", "postgresql://[::1]:5432/db?name=a@b",
                 "postgresql://u@host/db#frag@x"):  # an @ after the host is not a password's end
        assert mask_url(kept) == kept
    from core.config import mask_urls_in

    assert mask_urls_in(f"host=h password={SECRET} dbname=x") == "host=h password=*** dbname=x"


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})  # fmt: skip


def test_cli_output_never_shows_a_password(tmp_path):
    bad_db = f"postgresql+psycopg://captcha:{SECRET}@127.0.0.1:1/captcha"
    bad_broker = f"redis://:{SECRET}@127.0.0.1:1/0"
    db = f"sqlite:///{tmp_path / 'q.db'}"
    (tmp_path / "in").mkdir()
    outputs = [
        run_cli("status", CAPTCHA_DATABASE_URL=bad_db, CAPTCHA_BROKER_URL=bad_broker),
        run_cli("results", CAPTCHA_DATABASE_URL=bad_db),
        run_cli("db", "upgrade", CAPTCHA_DATABASE_URL=bad_db),
        run_cli("enqueue", str(tmp_path / "in"), CAPTCHA_DATABASE_URL=db, CAPTCHA_BROKER_URL=bad_broker),
        run_cli("status", CAPTCHA_DATABASE_URL=db, CAPTCHA_BROKER_URL=bad_broker),
        run_cli("results", CAPTCHA_DATABASE_URL=f"postgresql+psycopg://captcha:{SECRET}#x@127.0.0.1:1/captcha"),
        run_cli("results", CAPTCHA_DATABASE_URL=f"postgresql+psycopg//captcha:{SECRET}@127.0.0.1/captcha"),  # typo
    ]
    for out in outputs:
        text = out.stdout + out.stderr
        assert SECRET not in text, text
    assert all("***" in out.stdout + out.stderr for out in outputs)


# ---------------------------------------------------------------------------------------------------------------
# deployment


def test_compose_publishes_redis_and_postgres_on_localhost_only_with_passwords():
    compose = ROOT / "docker-compose.yml"
    if not compose.exists():
        pytest.skip("no docker-compose.yml")
    services = yaml.safe_load(compose.read_text())["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            spec = str(port if not isinstance(port, dict) else port.get("host_ip", "") + ":" + str(port["published"]))
            assert spec.startswith("127.0.0.1:"), f"{name} publishes {spec} beyond localhost"
    stores = {name: s for name, s in services.items() if str(s.get("image", "")).split(":")[0] in ("redis", "postgres")}
    assert len(stores) == 2
    for name, service in stores.items():
        if service["image"].startswith("redis"):
            assert "--requirepass" in service["command"]
        else:
            password = service["environment"]["POSTGRES_PASSWORD"]
            assert password.startswith("${"), f"{name}: a literal password in the compose file"


# ---------------------------------------------------------------------------------------------------------------
# SQL


def _interpolations_are_constants(node: ast.AST) -> bool:
    """Whether every value formatted into a string is an UPPER_CASE module constant."""
    values = [v.value for v in ast.walk(node) if isinstance(v, ast.FormattedValue)]
    return all(isinstance(v, ast.Name) and v.id.isupper() for v in values)


def built_sql_lines(source: str) -> list[int]:
    """Lines where a statement passed to ``text``/``execute``/``exec_driver_sql`` is built from values."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in ("text", "execute", "exec_driver_sql", "executemany"):
            continue
        arg = node.args[0]
        built = isinstance(arg, ast.BinOp) and isinstance(arg.op, (ast.Add, ast.Mod)) and any(
            isinstance(side, (ast.Constant, ast.JoinedStr)) for side in (arg.left, arg.right)
        )
        built |= isinstance(arg, ast.Call) and getattr(arg.func, "attr", "") == "format"
        built |= isinstance(arg, ast.JoinedStr) and not _interpolations_are_constants(arg)
        if built:
            lines.append(node.lineno)
    return sorted(lines)


def test_sql_is_never_built_from_values():
    """Statements are literals or SQLAlchemy constructs (or format in UPPER_CASE constants only)."""
    examples = 'execute(text(f"SELECT * FROM images WHERE path = \'{path}\'"))\nexecute("DELETE FROM x WHERE id=%s" % i)\n'
    assert built_sql_lines(examples) == [1, 2]
    assert built_sql_lines('cursor.execute(f"PRAGMA busy_timeout={TIMEOUT_MS}")\nexecute(text("SELECT 1"))') == []
    offenders = {
        str(path.relative_to(ROOT)): lines
        for path in project_sources(PACKAGES)
        if (lines := built_sql_lines(path.read_text()))
    }
    assert offenders == {}


def test_hostile_strings_are_data_not_sql(sqlite_url):
    import sqlalchemy as sa

    from db.models import Image, Result
    from db.queries import query_results
    from db.repository import CharOutcome, ImageOutcome, create_job, record_outcomes, register_images
    from db.session import session_factory, upgrade

    upgrade(sqlite_url)
    hostile = "/data/x'; DROP TABLE results; --.png"
    with session_factory(sqlite_url)() as session, session.begin():
        job = create_job(session, "j'; DELETE FROM jobs; --")
        todo = register_images(session, job, [(hostile, 1, 1), ("/data/ab-0.png", 1, 1)])
        record_outcomes(session, [
            ImageOutcome(image_id=i, status="done", model_version="v1", text="ab", score=0.9, width=10, height=10,
                         chars=[CharOutcome(0, "a", (0, 0, 1, 1), 0.9), CharOutcome(1, "b", (1, 0, 2, 1), 0.9)])
            for i, _ in todo
        ])  # fmt: skip
    with session_factory(sqlite_url)() as session:
        assert query_results(session, text="ab' OR '1'='1") == []
        assert query_results(session, job="x' OR '1'='1") == []
        assert len(query_results(session, text="ab")) == 2
        assert {r["path"] for r in query_results(session, job="j'; DELETE FROM jobs; --")} == {hostile, "/data/ab-0.png"}
        assert session.scalar(sa.select(sa.func.count()).select_from(Result)) == 2
        assert session.scalar(sa.select(Image.path).where(Image.path == hostile)) == hostile
