"""The command line's handling of mistakes in the user's setup: one readable line and status 1, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run(*args: str, cwd, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, **env})  # fmt: skip


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (["status"], {"CAPTCHA_MAX_IMAGE_WIDTH": "abc"}, "invalid setting CAPTCHA_MAX_IMAGE_WIDTH: Input should be"),
        (["status"], {"CAPTCHA_PRECISION": "fp16"}, "invalid setting CAPTCHA_PRECISION"),
        (["status"], {"CAPTCHA_DEVICE": "gpu"}, "invalid setting CAPTCHA_DEVICE: String should match pattern"),
        (["enqueue", "."], {"CAPTCHA_BROKER_URL": "http://x"}, "CAPTCHA_BROKER_URL: Value error, the broker must be Redis"),
        (["enqueue", "."], {"CAPTCHA_DATABASE_URL": "postgres://127.0.0.1/test"}, "unsupported database URL"),
        (["enqueue", "."], {"CAPTCHA_DATABASE_URL": "mysql://x@127.0.0.1/x"}, "no driver for this database URL"),
        (["enqueue", "."], {"CAPTCHA_DATABASE_URL": "notaurl"}, "not a database URL"),
        (
            ["enqueue", "."],
            {"CAPTCHA_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:9/x"},
            "cannot use the database: connection failed",
        ),
        (["synth", "/proc/no-such-folder", "--count", "1"], {}, "No such file or directory: '/proc/no-such-folder'"),
    ],
)
def test_setup_mistakes_are_one_line(tmp_path, args, env, expected):
    out = run(*args, cwd=tmp_path, **env)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("error: ") and expected in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback(tmp_path):
    out = run("status", cwd=tmp_path, CAPTCHA_PRECISION="fp16", CAPTCHA_DEBUG="1")
    assert out.returncode == 1 and "Traceback" in out.stderr and "ValidationError" in out.stderr


def test_a_database_behind_the_code_is_told_to_upgrade(tmp_path):
    """An older schema: upgrade first. A newer one (a later version migrated it) is used as it is."""
    import sqlalchemy as sa

    from db.session import dispose_engines, make_engine, upgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0002")
    dispose_engines()
    for command in (["status"], ["models"], ["results"]):
        out = run(*command, cwd=tmp_path, CAPTCHA_DATABASE_URL=url)
        assert out.returncode == 1 and "has schema revision 0002" in out.stderr, (command, out.stderr)
        assert "run `captcha-queue db upgrade`" in out.stderr
    upgrade(url)
    with make_engine(url).begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099_later'"))
    dispose_engines()
    out = run("status", cwd=tmp_path, CAPTCHA_DATABASE_URL=url)
    assert out.returncode == 0 and "total 0" in " ".join(out.stdout.split()), out.stderr


def test_only_setup_errors_lose_their_traceback():
    """A database that cannot be reached is the user's to fix; an SQL error or any other exception is a bug, and
    keeps its traceback (``_user_error`` gives None)."""
    import sqlite3

    import sqlalchemy as sa

    from core.cli import _user_error

    def operational(message: str) -> sa.exc.OperationalError:
        return sa.exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError(message))

    unreachable = _user_error(operational("unable to open database file"))
    assert unreachable == "cannot use the database: unable to open database file"
    assert _user_error(operational("attempt to write a readonly database")).endswith("readonly database")
    assert _user_error(operational("no such column: job_idd")) is None
    assert _user_error(RuntimeError("boom")) is None and _user_error(KeyError("x")) is None
    assert "No such file" in _user_error(FileNotFoundError(2, "No such file or directory", "/data/x"))


def test_the_training_bar_starts_each_epoch_afresh():
    """After the first epoch the bar used to stay "finished", showing 0:00:00 left for every later epoch."""
    import io

    from rich.console import Console

    from core.cli import TrainProgress

    shown = TrainProgress(Console(file=io.StringIO(), force_terminal=True), epochs=3)
    task = shown.progress.tasks[0]
    with shown.progress:  # drawn, so every field the columns show must be there
        shown({"event": "start", "start_epoch": 1, "steps_per_epoch": 4, "train_images": 8, "val_images": 2,
               "device": "cpu", "precision": "fp32"})  # fmt: skip
        for epoch in (1, 2):
            for step in range(1, 5 if epoch == 1 else 3):
                shown({"event": "step", "epoch": epoch, "step": step, "steps": 12, "loss": 1.0, "lr": 1e-3})
                shown.progress.refresh()
            if epoch == 1:
                assert task.finished
                shown({"event": "epoch", "epoch": 1, "best": True, "val_sequence_accuracy": 0.5,
                       "val_character_accuracy": 0.5, "images_per_second": 9.0, "loss": 1.0})  # fmt: skip
                assert task.completed == 0 and task.fields["epoch"] == 2
    assert not task.finished and task.completed == 2 and task.total == 4
    assert task.finished_time is None
    # a resumed run with no epoch left draws no bar
    done = TrainProgress(Console(file=io.StringIO(), force_terminal=False), epochs=3)
    done({"event": "start", "start_epoch": 4, "steps_per_epoch": 4, "train_images": 8, "val_images": 2,
          "device": "cpu", "precision": "fp32"})  # fmt: skip
    assert not done.progress.tasks[0].visible


def test_retrain_names_the_option_at_fault(tmp_path):
    bad_json = run("retrain", "--images", str(tmp_path), "--labels", str(tmp_path), "--model-config", "{bad",
                   cwd=tmp_path)  # fmt: skip
    assert bad_json.returncode == 2 and bad_json.stderr.startswith("error: --model-config: Expecting property name")
    half = run("retrain", "--images", str(tmp_path), "--labels", str(tmp_path), "--val-labels", str(tmp_path),
               cwd=tmp_path)  # fmt: skip
    assert half.returncode == 2 and "give both --val-images and --val-labels, or neither" in half.stderr


def test_a_mistyped_setting_is_named_not_silently_ignored(tmp_path):
    out = run("--help", cwd=tmp_path, CAPTCHA_BROKER="redis://elsewhere:6379/0", CAPTCHA_NOTHING_LIKE_IT="1")
    assert out.returncode == 0
    assert "warning: CAPTCHA_BROKER is not a setting and is ignored; did you mean CAPTCHA_BROKER_URL?" in out.stderr
    assert "warning: CAPTCHA_NOTHING_LIKE_IT is not a setting" in out.stderr
    quiet = run("--help", cwd=tmp_path, CAPTCHA_DATA="/data", CAPTCHA_BROKER_URL="redis://127.0.0.1:6379/0")
    assert "warning" not in quiet.stderr
    from core.config import unknown_variables  # settings are matched whatever the case of their names

    assert unknown_variables({"CAPTCHA_broker_url": "x", "captcha_device": "cpu", "CAPTCHA_Brokr": "y"}) == [
        ("CAPTCHA_Brokr", "CAPTCHA_BROKER_URL")]  # fmt: skip
