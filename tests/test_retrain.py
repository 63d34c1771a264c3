"""Retraining in-process: publish and promote, the promotion gate, rollback, sha256 checks, redelivery, hot reload.

Training runs on a handful of synthetic CAPTCHAs with a tiny network for one epoch; the database is a real SQLite
file and the checkpoint store a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from core.checkpoint import CheckpointError, read_metadata, sha256_file
from core.registry import RegistryError, champion, get_version, list_versions, load_version, promote, rollback, verify
from core.retrain import RetrainError, RetrainRequest, run_retrain
from db.models import TrainingRun, WorkerEvent
from processes import interrupt_when
from sample_models import TINY, sharpened_random_model



@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """12 training and 4 validation CAPTCHAs."""
    from core.synth import generate

    root = tmp_path_factory.mktemp("retrain-data")
    generate(root / "train", 12, seed=0, workers=1, progress=False)
    generate(root / "val", 4, seed=1, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def configured(tmp_path_factory) -> Path:
    """A seeded random model: a tiny retrain reads at least as well, whatever the shipped checkpoint reads."""
    from core.checkpoint import save_checkpoint

    directory = tmp_path_factory.mktemp("configured")
    return save_checkpoint(sharpened_random_model(), directory / "random.safetensors", {"version": "test-random"})


@pytest.fixture()
def env(tmp_path, sqlite_url, configured, monkeypatch):
    """A migrated database, an empty store, and ``configured`` as the checkpoint served without a champion."""
    from core.config import get_settings
    from db.session import session_factory, upgrade

    monkeypatch.setenv("CAPTCHA_CHECKPOINT", str(configured))
    monkeypatch.setenv("CAPTCHA_CHECKPOINT_DIR", str(tmp_path / "store"))
    get_settings.cache_clear()
    upgrade(sqlite_url)
    yield session_factory(sqlite_url), tmp_path / "store"
    get_settings.cache_clear()


def request(data: Path, **kw) -> RetrainRequest:
    base = dict(
        images=str(data / "train" / "images"), labels=str(data / "train" / "labels"),
        val_images=str(data / "val" / "images"), val_labels=str(data / "val" / "labels"),
        scratch=True, model_config=TINY, epochs=1, batch_size=6, device="cpu", seed=1,
    )  # fmt: skip
    return RetrainRequest(**{**base, **kw})  # type: ignore[arg-type]


def test_request_validation_names_the_bad_field(data):
    good = request(data).as_json()
    assert RetrainRequest.from_json(good) == request(data)
    for bad, field in (({**good, "epochs": 0}, "epochs"), ({**good, "images": 3}, "images"),
                       ({**good, "from_version": 2}, "from_version or scratch"), ({**good, "colour": 1}, "colour"),
                       ({**good, "val_labels": None}, "val_images and val_labels"),
                       ({**good, "ema_decay": 1.5}, "ema_decay"), ({**good, "augment": "yes"}, "augment"),
                       ({**good, "train_parts": "heads"}, "train_parts"), ({**good, "arch": "foo"}, "arch"),
                       ({**good, "lr": "abc"}, "lr"), ({**good, "seed": "x"}, "seed"), ({**good, "device": 5}, "device"),
                       ({**good, "device": "tpu"}, "device"), ({**good, "force": "no"}, "force"),
                       ({**good, "scratch": "no"}, "scratch"), ({**good, "val_images": 5, "val_labels": 6}, "val_images")):  # fmt: skip
        with pytest.raises(RetrainError, match=field):
            RetrainRequest.from_json(bad)


def test_a_refused_request_fails_its_queued_run(env, data, sqlite_url, monkeypatch):
    """A request the worker refuses (here a field it does not know, as from a newer CLI) fails the run row that
    ``retrain`` created, so ``retrain --wait`` and ``models`` show why instead of a run queued for ever."""
    from celery.exceptions import Reject

    from core.config import get_settings
    from core.retrain import create_run
    from worker.train_task import train

    sessions, _ = env
    monkeypatch.setenv("CAPTCHA_DATABASE_URL", sqlite_url)
    get_settings.cache_clear()
    with sessions() as session, session.begin():
        create_run(session, "task-refused", request(data))
    result = train.apply(args=[{**request(data).as_json(), "new_option": 1}], task_id="task-refused")
    assert isinstance(result.result, Reject)
    with sessions() as session:
        run = session.scalar(sa.select(TrainingRun).where(TrainingRun.task_id == "task-refused"))
        assert run.status == "failed" and run.finished_at is not None
        assert run.error == "request refused: unknown retrain request fields: new_option"


def test_a_cancelled_run_is_never_trained(env, data, sqlite_url):
    """A run sent to a queue nobody reads stays queued; ``models cancel`` fails it, and a worker that receives its
    message later does not train it. Only a queued run can be cancelled, named by its first characters."""
    from typer.testing import CliRunner

    from core.cli import app
    from core.retrain import create_run

    sessions, store = env
    with sessions() as session, session.begin():
        create_run(session, "abcd1234-0000", request(data))
        create_run(session, "abcd5678-0000", request(data))
    runner = CliRunner()
    ambiguous = runner.invoke(app, ["models", "cancel", "abcd", "--database-url", sqlite_url])
    assert ambiguous.exit_code == 1 and "names 2 training runs" in ambiguous.output
    done = runner.invoke(app, ["models", "cancel", "abcd1234", "--database-url", sqlite_url])
    assert done.exit_code == 0 and "run abcd1234 cancelled" in done.output
    again = runner.invoke(app, ["models", "cancel", "abcd1234", "--database-url", sqlite_url])
    assert again.exit_code == 1 and "is failed: only a queued run can be cancelled" in again.output
    outcome = run_retrain("abcd1234-0000", request(data), sessions)
    assert outcome.status == "skipped" and outcome.version is None
    with sessions() as session:
        run = session.scalar(sa.select(TrainingRun).where(TrainingRun.task_id == "abcd1234-0000"))
        assert run.status == "failed" and run.error == "cancelled before a worker took it"
        assert list_versions(session) == []


def test_a_run_claimed_while_being_cancelled_stays_claimed(env, data):
    """A worker that claims the run between ``models cancel`` reading it and writing it keeps it: the cancel is
    refused, instead of marking failed a run that then trains (and ends succeeded)."""
    from sqlalchemy import event

    from core.retrain import RetrainError, cancel_run, claim_run, create_run

    sessions, _ = env
    with sessions() as session, session.begin():
        create_run(session, "race-0001", request(data))
    engine, claimed, started = sessions.kw["bind"], [], []

    def claim_first(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("UPDATE training_runs") and not started:
            started.append(True)  # once: the claim's own UPDATE passes here too
            claimed.append(claim_run(sessions, "race-0001", request(data), "worker-1"))

    event.listen(engine, "before_cursor_execute", claim_first)
    try:
        with sessions() as session, pytest.raises(RetrainError, match="is running: only a queued run can be cancelled"):
            cancel_run(session, "race-0001")
            session.commit()
    finally:
        event.remove(engine, "before_cursor_execute", claim_first)
    assert claimed == [True]
    with sessions() as session:
        run = session.scalar(sa.select(TrainingRun).where(TrainingRun.task_id == "race-0001"))
        assert (run.status, run.worker, run.error) == ("running", "worker-1", None)


def test_retrain_publishes_promotes_and_rolls_back(env, data, configured):
    sessions, store = env
    progress: list[dict] = []
    first = run_retrain("task-one", request(data), sessions, on_progress=progress.append)
    assert first.status == "succeeded" and first.version == 1 and first.promoted
    assert [e["event"] for e in progress] == ["start", "epoch"]
    # the baseline is the configured checkpoint, scored on the same 4 validation images
    baseline = first.metrics["baseline"]
    assert baseline["version"] == read_metadata(configured).get("version", baseline["version"])
    assert baseline["val_images"] == first.metrics["val_images"] == 4

    with sessions() as session:
        v1 = get_version(session, 1)
        assert v1.status == "champion" and v1.parent is None and v1.arch == "fast" and v1.task_id == "task-one"
        assert Path(v1.path).parent == store.resolve() and Path(v1.path).name.startswith("v1-")
        assert v1.sha256 == sha256_file(v1.path) == read_metadata(v1.path)["sha256"]
        assert read_metadata(v1.path)["version"] == "v1"
        assert v1.data_summary["train_images"] == 12 and v1.metrics["epoch"] == 1
        run = session.scalar(sa.select(TrainingRun).where(TrainingRun.task_id == "task-one"))
        assert (run.status, run.version, run.promoted, run.epoch) == ("succeeded", 1, True, 1)
    assert not any((store / ".staging").iterdir())  # staging removed, nothing half-written left
    assert sorted(p.suffix for p in store.iterdir() if p.is_file()) == [".json", ".safetensors"]

    # from the champion by default; forced so the outcome does not depend on two tiny models' accuracies
    second = run_retrain(
        "task-two", request(data, scratch=False, force=True, augment=True, ema_decay=0.9), sessions
    )
    assert second.version == 2 and second.promoted
    with sessions() as session:
        assert get_version(session, 2).parent == 1
        trained_with = read_metadata(get_version(session, 2).path)["train_config"]
        assert (trained_with["augment"], trained_with["ema_decay"]) == (True, 0.9)
        assert champion(session).number == 2 and get_version(session, 1).status == "ready"
        assert [v.number for v in list_versions(session)] == [2, 1]

        retired, restored = rollback(session)
        session.commit()
        assert (retired.number, restored.number) == (2, 1)
        assert champion(session).number == 1 and get_version(session, 2).status == "retired"
        retired, restored = rollback(session)
        session.commit()
        assert retired.number == 1 and restored is None and champion(session) is None
        with pytest.raises(RegistryError, match="no champion"):
            rollback(session)
        promote(session, 2)  # a retired version can be promoted again by hand
        session.commit()
        assert champion(session).number == 2


def champion_labelled_val(detector, source: Path, out: Path) -> Path:
    """Validation images renamed and boxed after what ``detector`` reads, so it scores 100% on them."""
    from PIL import Image

    from core.formats import write_yolo_labels

    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    for n, path in enumerate(sorted((source / "images").glob("*.png"))):
        [pred] = detector.predict([path], batch_size=1)
        assert pred.text, "the reference model must read something"
        name = f"{pred.text}-{n}"
        shutil.copy(path, out / "images" / f"{name}.png")
        width, height = Image.open(path).size
        write_yolo_labels(out / "labels" / f"{name}.txt", [list(c.box) for c in pred.chars], width, height)
    return out


def test_a_worse_model_is_not_promoted_unless_forced(env, data, configured, tmp_path):
    from core.detector import Detector

    sessions, _ = env
    reference = Detector.load(configured, device="cpu")
    val = champion_labelled_val(reference, data / "val", tmp_path / "val")
    req = request(data, val_images=str(val / "images"), val_labels=str(val / "labels"), val_batch_size=1)

    worse = run_retrain("task-worse", req, sessions)
    assert worse.status == "succeeded" and worse.version == 1 and not worse.promoted
    assert worse.metrics["baseline"]["val_sequence_accuracy"] == 1.0
    assert worse.metrics["val_sequence_accuracy"] < 1.0
    assert worse.metrics["promotion"].startswith("not promoted")
    with sessions() as session:
        assert champion(session) is None and get_version(session, 1).status == "ready"

    forced = run_retrain("task-forced", RetrainRequest(**{**req.as_json(), "force": True}), sessions)
    assert forced.promoted and forced.metrics["promotion"] == "forced"
    with sessions() as session:
        assert champion(session).number == 2


def test_a_changed_byte_is_refused_and_the_worker_keeps_its_model(env, data, configured):
    from worker.hot_reload import DetectorHolder

    sessions, _ = env
    holder = DetectorHolder(sessions, "cpu", fallback=configured, poll_interval=0.0, retry_after=0.0)
    served = holder.current().version  # no champion yet: the configured checkpoint
    run_retrain("task-a", request(data), sessions)
    with sessions() as session:
        v1 = get_version(session, 1)
    assert holder.current().version == "v1"

    run_retrain("task-b", request(data, force=True), sessions)
    with sessions() as session:
        v2 = get_version(session, 2)
        assert champion(session).number == 2
    blob = bytearray(Path(v2.path).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    Path(v2.path).write_bytes(bytes(blob))

    with pytest.raises(CheckpointError, match="sha256"):
        verify(v2)
    with pytest.raises(CheckpointError, match="v2: .* does not match its recorded sha256"):
        load_version(v2)
    assert holder.current().version == "v1"  # refused, keeps serving v1
    assert holder.current().version == "v1"

    Path(v1.path).unlink()
    with sessions() as session:
        with pytest.raises(CheckpointError, match="missing"):
            rollback(session)  # v1 would be restored, but its file is gone
    with sessions() as session:
        events = session.execute(sa.select(WorkerEvent.event, WorkerEvent.old_version, WorkerEvent.new_version)
                                 .order_by(WorkerEvent.id)).all()  # fmt: skip
    assert events[:2] == [("load", None, served), ("switch", served, "v1")]
    assert set(events[2:]) == {("refused", "v1", "v2")} and len(events) == 4


def test_a_redelivered_task_trains_once(env, data):
    sessions, _ = env
    assert run_retrain("task-same", request(data), sessions).version == 1
    again = run_retrain("task-same", request(data), sessions)
    assert again.status == "skipped" and again.version is None
    with sessions() as session:
        assert [v.number for v in list_versions(session)] == [1]
        assert session.scalar(sa.select(sa.func.count()).select_from(TrainingRun)) == 1


def test_a_failed_run_publishes_nothing_and_says_why(env, data, tmp_path):
    sessions, store = env
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    with pytest.raises(ValueError, match="no usable training samples"):
        run_retrain("task-empty", request(data, images=str(empty / "images"), labels=str(empty / "labels")), sessions)
    with sessions() as session:
        run = session.scalar(sa.select(TrainingRun).where(TrainingRun.task_id == "task-empty"))
        assert run.status == "failed" and "no usable training samples" in run.error
        assert list_versions(session) == []
    assert not list(store.glob("*.safetensors"))
    # an empty validation folder: every epoch would score 0, as would the champion, and 0 >= 0 would promote
    with pytest.raises(ValueError, match="no usable validation samples"):
        run_retrain("task-noval", request(data, val_images=str(empty / "images"), val_labels=str(empty / "labels")),
                    sessions)  # fmt: skip
    with sessions() as session:
        run = session.scalar(sa.select(TrainingRun).where(TrainingRun.task_id == "task-noval"))
        assert run.status == "failed" and "no usable validation samples" in run.error
        assert list_versions(session) == []


def test_a_champion_that_scored_no_validation_image_is_not_beaten_by_zero():
    from core.retrain import should_promote

    nothing = {"version": "v3", "val_sequence_accuracy": 0.0, "val_images": 0}
    assert should_promote(0.0, nothing, force=False) == (
        False, "not promoted: the champion v3 scored no validation image"
    )  # fmt: skip
    assert should_promote(0.5, {**nothing, "val_images": 4}, force=False)[0]
    assert should_promote(0.0, nothing, force=True)[0]


@pytest.mark.postgres
def test_store_and_hot_reload_on_postgres(postgres_url, tmp_path):
    from core.models import build_model
    from core.registry import publish
    from db.session import session_factory, upgrade
    from worker.hot_reload import DetectorHolder

    upgrade(postgres_url)
    sessions = session_factory(postgres_url)
    model = build_model("fast", **TINY)
    with sessions() as session, session.begin():
        for token in ("a", "b"):
            row = publish(session, model, tmp_path, token=token, parent=None, metrics={"m": 1}, data_summary={})
            promote(session, row.number)
    holder = DetectorHolder(sessions, "cpu", poll_interval=0.0)
    assert holder.current().version == "v2"
    with sessions() as session, session.begin():
        retired, restored = rollback(session)
    assert (retired.number, restored.number) == (2, 1)
    assert holder.current().version == "v1"
    with sessions() as session:
        assert [(v.number, v.status, v.metrics) for v in list_versions(session)] == [(2, "retired", {"m": 1}),
                                                                                    (1, "champion", {"m": 1})]
        events = session.scalars(sa.select(WorkerEvent.event).order_by(WorkerEvent.id)).all()
    assert events == ["load", "switch"]


def publish_tiny(sessions, store: Path, count: int) -> list[int]:
    """``count`` versions of one tiny random network, published directly (no training); returns their numbers."""
    from core.models import build_model
    from core.registry import publish

    model = build_model("fast", **TINY)
    with sessions() as session, session.begin():
        return [publish(session, model, store, token=f"t{k}", parent=None, metrics={}, data_summary={}).number
                for k in range(count)]  # fmt: skip


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_two_promotions_at_once_leave_one_champion(backend, request, tmp_path):
    """A promoter that read the champion before another one committed cannot add a second champion."""
    from sqlalchemy.exc import IntegrityError

    from db.session import dispose_engines, session_factory, upgrade

    url = request.getfixturevalue(f"{backend}_url")
    upgrade(url)
    sessions = session_factory(url)
    v1, v2, v3 = publish_tiny(sessions, tmp_path, 3)
    with sessions() as session, session.begin():
        promote(session, v1)
    with sessions() as late:
        stale = champion(late)  # v1, read before the other promotion commits
        with sessions() as first, first.begin():
            promote(first, v2)
        stale.status = "ready"
        get_version(late, v3).status = "champion"
        with pytest.raises(IntegrityError):
            late.flush()
    with sessions() as session:
        assert [(v.number, v.status) for v in list_versions(session)] == [(v3, "ready"), (v2, "champion"),
                                                                        (v1, "ready")]
    dispose_engines()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_rollback_never_undoes_a_promotion_committed_after_it_read_the_champion(backend, request, tmp_path,
                                                                                 monkeypatch):
    """``rollback`` read v1 as champion; another process then promoted v2. Retiring v1 by its id alone used to
    succeed and print "champion: none" while v2 was champion; the demotion is now conditional."""
    import core.registry
    from core.registry import ChampionRace
    from db.models import ModelVersion
    from db.session import dispose_engines, session_factory, upgrade

    url = request.getfixturevalue(f"{backend}_url")
    upgrade(url)
    sessions = session_factory(url)
    v1, v2 = publish_tiny(sessions, tmp_path, 2)
    with sessions() as session, session.begin():
        promote(session, v1)
    real_champion = core.registry.champion

    def champion_then_another_promotion(session):
        current = real_champion(session)
        with sessions() as other, other.begin():  # `models promote v2` in another process, committed meanwhile
            other.execute(sa.update(ModelVersion).where(ModelVersion.number == v1).values(status="ready"))
            other.execute(sa.update(ModelVersion).where(ModelVersion.number == v2).values(status="champion"))
        return current

    monkeypatch.setattr(core.registry, "champion", champion_then_another_promotion)
    with sessions() as session:
        with pytest.raises(ChampionRace, match="changed the champion at the same moment"):
            rollback(session)
        session.rollback()
    monkeypatch.undo()
    with sessions() as session:
        assert [(v.number, v.status) for v in list_versions(session)] == [(v2, "champion"), (v1, "ready")]
    dispose_engines()


def test_a_promotion_committed_while_a_run_publishes_is_not_undone(env, data, monkeypatch):
    """The run was compared with v1; while it wrote its files, `models promote v2` committed. The run used to demote
    v2 and make itself champion; now its promotion finds v2 and the run publishes without promoting."""
    import core.retrain
    from core.checkpoint import load_checkpoint
    from core.retrain import _publish, claim_run

    sessions, store = env
    run_retrain("task-base", request(data, force=True), sessions)  # v1, champion
    with sessions() as session:
        model, meta = load_checkpoint(get_version(session, 1).path)
    [v2] = publish_tiny(sessions, store, 1)
    real_publish, calls = core.retrain.publish, []

    def publish_while_another_promotes(session, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            with sessions() as other, other.begin():
                promote(other, v2)
        return real_publish(session, *args, **kwargs)

    monkeypatch.setattr(core.retrain, "publish", publish_while_another_promotes)
    metrics = {"promotion": "promoted: validation sequence accuracy 1.0 >= 0.5 of v1"}
    assert claim_run(sessions, "task-late", request(data), "w")
    number, promoted = _publish(sessions, "task-late", model, store, None, metrics, meta, True, baseline_champion=1)
    assert (number, promoted) == (3, False) and len(calls) == 2  # the first attempt rolled back, the second declined
    assert metrics["promotion"].startswith("not promoted: v2 became champion while this run was being compared with v1")
    with sessions() as session:
        assert [(v.number, v.status) for v in list_versions(session)] == [(3, "ready"), (v2, "champion"), (1, "ready")]
        verify(get_version(session, 3))
    assert len([p for p in store.iterdir() if p.name.startswith("v3-")]) == 2  # the rolled-back attempt left no file


def test_an_attempt_that_loses_the_promotion_race_leaves_no_files(env, data, monkeypatch):
    """Publishing writes the files, then the promotion loses a race (IntegrityError) and the transaction is rolled
    back: that attempt's files go with its row, and the retry publishes under a file name of its own."""
    from sqlalchemy.exc import IntegrityError

    import core.retrain

    sessions, store = env
    real_promote, calls = core.retrain.promote, []

    def racing(session, number, **kwargs):
        calls.append(number)
        if len(calls) == 1:
            raise IntegrityError("promote", {}, Exception("another champion committed first"))
        return real_promote(session, number, **kwargs)

    monkeypatch.setattr(core.retrain, "promote", racing)
    outcome = run_retrain("nightly-2024-01", request(data), sessions)
    assert outcome.version == 1 and outcome.promoted and calls == [1, 1]
    files = sorted(p.name for p in store.iterdir() if p.is_file())
    assert len(files) == 2 and files[1] == files[0].replace(".json", ".safetensors")
    # the task id's first 8 characters ("nightly-", shared by every nightly run) and a part no other attempt has
    assert re.fullmatch(r"v1-nightly--[0-9a-f]{8}\.json", files[0]), files
    with sessions() as session:
        verify(get_version(session, 1))


def test_a_run_compared_with_an_old_champion_is_not_promoted(env, data):
    """Another version became champion while the run was being compared: the new one stays ready, and says why."""
    from core.checkpoint import load_checkpoint
    from core.retrain import _publish, claim_run

    sessions, store = env
    run_retrain("task-base", request(data, force=True), sessions)  # v1, champion
    with sessions() as session:
        model, meta = load_checkpoint(get_version(session, 1).path)
    metrics = {"promotion": "promoted: validation sequence accuracy 1.0 >= 0.5 of the configured checkpoint"}
    assert claim_run(sessions, "task-late", request(data), "w")
    number, promoted = _publish(sessions, "task-late", model, store, None, metrics, meta, True, baseline_champion=None)
    assert (number, promoted) == (2, False)
    assert metrics["promotion"].startswith("not promoted: v1 became champion while this run was being compared with "
                                           "the configured checkpoint")
    with sessions() as session:
        assert champion(session).number == 1 and get_version(session, 2).status == "ready"
        run = session.scalar(sa.select(TrainingRun).where(TrainingRun.task_id == "task-late"))
        assert (run.status, run.version, run.promoted) == ("succeeded", 2, False)
    number, promoted = _publish(sessions, "task-late", model, store, None, dict(metrics), meta, True,
                                baseline_champion=1)  # fmt: skip
    assert (number, promoted) == (3, True)


def test_changed_metadata_is_refused_and_the_worker_keeps_its_model(env):
    """The JSON beside the weights is checked too: an edited decode setting would change what a version reads."""
    import json

    from worker.hot_reload import DetectorHolder

    sessions, store = env
    v1, v2 = publish_tiny(sessions, store, 2)
    with sessions() as session, session.begin():
        promote(session, v1)
    holder = DetectorHolder(sessions, "cpu", poll_interval=0.0, retry_after=0.0)
    assert holder.current().version == "v1"
    with sessions() as session:
        row = get_version(session, v2)
    meta_file = Path(row.path).with_suffix(".json")
    meta = json.loads(meta_file.read_text())
    meta["model_config"]["score_thresh"] = 0.01
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"v2: .*\.json does not match its recorded sha256"):
        verify(row)
    with pytest.raises(CheckpointError, match=r"v2: .*\.json does not match its recorded sha256"):
        load_version(row)
    with sessions() as session, pytest.raises(CheckpointError, match="sha256"):
        promote(session, v2)
    with sessions() as session, session.begin():  # promoted behind the check's back: the worker refuses it
        get_version(session, v1).status = "ready"
        session.flush()
        get_version(session, v2).status = "champion"
    assert holder.current().version == "v1"
    with sessions() as session:
        assert session.scalars(sa.select(WorkerEvent.event).order_by(WorkerEvent.id)).all() == ["load", "refused"]


def test_waiting_on_a_run_that_stays_queued_says_why_and_stops_on_ctrl_c(env, data, monkeypatch, capsys):
    """``retrain --wait`` on a run no worker takes: a hint after a while, and Ctrl-C ends the wait, not the run."""
    import time

    import typer

    from core import cli
    from core.retrain import create_run

    sessions, _ = env
    with sessions() as session, session.begin():
        create_run(session, "task-queued", request(data))
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", sleep)
    with pytest.raises(typer.Exit) as exc:
        cli._follow_run(sessions, "task-queued", poll=0.0, queued_hint_s=0.0, queue="gpu-train")
    assert exc.value.exit_code == 130
    err = capsys.readouterr().err
    assert err.count("still queued") == 1
    assert "consuming the 'gpu-train' queue (captcha-queue worker --queues gpu-train)" in err
    assert "(captcha-queue models cancel task-que withdraws it)" in err
    assert "stopped waiting; run task-que goes on" in err
    with sessions() as session:
        assert session.scalar(sa.select(TrainingRun.status).where(TrainingRun.task_id == "task-queued")) == "queued"


@pytest.mark.parametrize("task_id", ["../..", "/abs/victim", "a/../../b", "x" * 65])
def test_a_task_id_that_is_not_a_plain_name_is_refused_and_removes_nothing(env, data, tmp_path, task_id):
    """The id names the staging folder removed after the run: a path must never reach the file system."""
    from core.retrain import RetrainError

    sessions, store = env
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    given = task_id.replace("/abs/victim", str(victim))
    with pytest.raises(RetrainError, match="refusing task id"):
        run_retrain(given, request(data, images=str(tmp_path / "nowhere")), sessions, store=store)
    assert (victim / "keep.txt").exists() and tmp_path.exists()
    with sessions() as session:  # nor stored: a column of 64 characters would refuse a longer one on PostgreSQL
        assert session.scalar(sa.select(TrainingRun).where(TrainingRun.task_id == given)) is None
        assert list_versions(session) == []


def test_retraining_folders_outside_the_allowed_roots_are_refused(env, data, tmp_path, monkeypatch):
    from core.config import get_settings
    from core.retrain import RetrainError

    sessions, _ = env
    monkeypatch.setenv("CAPTCHA_ALLOWED_ROOTS", str(tmp_path / "elsewhere"))
    get_settings.cache_clear()
    with pytest.raises(RetrainError, match="'images' .* is outside the allowed roots"):
        run_retrain("task-roots", request(data), sessions)
    with sessions() as session:
        assert list_versions(session) == []
        run = session.scalar(sa.select(TrainingRun).where(TrainingRun.task_id == "task-roots"))
        assert run.status == "failed" and "allowed roots" in run.error
    monkeypatch.setenv("CAPTCHA_ALLOWED_ROOTS", str(data))
    get_settings.cache_clear()
    assert run_retrain("task-inside", request(data), sessions).status == "succeeded"
    with sessions() as session:  # the training read its files with the roots checked one by one
        (version,) = list_versions(session)
        assert read_metadata(version.path)["train_config"]["allowed_roots"] == [str(data)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_retrain_interrupted_while_sending_fails_its_run(data, sqlite_url, silent_broker_url, signum):
    """A broker that accepts connections and never answers holds ``send_task``; stopping the command then must not
    leave a run ``queued`` for ever with no message behind it."""
    from db.session import session_factory

    env = {**os.environ, "CAPTCHA_BROKER_URL": silent_broker_url, "CAPTCHA_DATABASE_URL": sqlite_url}
    args = [
        "retrain", "--images", str(data / "train" / "images"), "--labels", str(data / "train" / "labels"),
        "--scratch", "--model-config", json.dumps(TINY), "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "core.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip

    def queued() -> bool:
        try:
            with session_factory(sqlite_url)() as session:
                return session.scalars(sa.select(TrainingRun.status)).all() == ["queued"]
        except sa.exc.OperationalError:  # no database or no schema yet
            return False

    interrupt_when(proc, queued, signum)
    assert proc.returncode != 0
    with session_factory(sqlite_url)() as session:
        (run,) = session.scalars(sa.select(TrainingRun)).all()
        assert (run.status, run.error) == ("failed", "not sent: interrupted")


def test_a_run_without_a_device_trains_on_the_training_workers(data, monkeypatch):
    """``retrain`` without ``--device`` leaves the device to the worker that trains (its ``--device`` sets
    ``CAPTCHA_DEVICE``), so ``worker --queues train --device cpu`` keeps training off a GPU."""
    from core.config import get_settings
    from core.retrain import training_device

    monkeypatch.setenv("CAPTCHA_DEVICE", "cpu")
    get_settings.cache_clear()
    try:
        assert training_device(request(data, device=None)) == "cpu"
        assert training_device(request(data, device="cuda:1")) == "cuda:1"
        assert "device" not in request(data, device=None).as_json()  # older workers would hand None to PyTorch
        assert RetrainRequest.from_json(request(data, device=None).as_json()).device is None
    finally:
        get_settings.cache_clear()
