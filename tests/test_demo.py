"""``captcha-queue demo``: the quick start's one command, end to end through a real Redis and a worker process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.cli import app
from processes import interrupt_when


@pytest.fixture()
def demo_env(redis_url, monkeypatch):
    from core.config import get_settings

    monkeypatch.setenv("CAPTCHA_BROKER_URL", redis_url)
    monkeypatch.delenv("CAPTCHA_CHECKPOINT", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_demo_decodes_synthetic_captchas_through_the_queue(demo_env, redis_url, tmp_path):
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--count", "6", "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    assert "6 done, 0 failed" in result.output and "sequence accuracy" in result.output
    assert "ready." in (workdir / "worker.log").read_text()
    assert_no_demo_queue_left(redis_url)


def assert_no_demo_queue_left(url: str) -> None:
    """The demo's queue, its priority lists and its binding are gone from the broker it used."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        assert [key for key in client.keys() if b"demo-" in key] == []
    finally:
        client.close()


def test_demo_fails_when_no_image_could_be_decoded(demo_env, redis_url, tmp_path, monkeypatch):
    """A checkpoint the worker cannot load: every image is a failed row with the reason, and the command fails."""
    from core.checkpoint import default_checkpoint_path
    from core.config import get_settings

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors at all")
    shutil.copy(default_checkpoint_path().with_suffix(".json"), broken.with_suffix(".json"))
    monkeypatch.setenv("CAPTCHA_CHECKPOINT", str(broken))
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["demo", "--count", "3", "--workdir", str(tmp_path / "demo")])
    assert result.exit_code == 1, result.output
    assert "0 done, 3 failed" in result.output and "no image was decoded" in result.output
    assert_no_demo_queue_left(redis_url)


def test_demo_stopped_by_sigterm_stops_its_worker_and_leaves_no_queue(demo_env, redis_url, tmp_path):
    """SIGTERM (a container stop, ``kill``) mid-run: the worker it started shuts down and its queue is deleted."""
    workdir = tmp_path / "demo"
    log = workdir / "worker.log"
    # small messages: the worker's warm shutdown finishes the one it holds, quickly even on a loaded machine
    env = dict(os.environ, CAPTCHA_PATHS_PER_MESSAGE="4")
    proc = subprocess.Popen([sys.executable, "-m", "core.cli", "demo", "--count", "60", "--workdir", str(workdir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    interrupt_when(proc, lambda: log.exists() and "ready." in log.read_text(), signal.SIGTERM, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Warm shutdown" in log.read_text()  # stopped by the demo, not left running
    assert "demo stopped" in proc.stderr.read()
    assert_no_demo_queue_left(redis_url)


def test_demo_refuses_a_workdir_holding_other_files(tmp_path, monkeypatch):
    """The folder is emptied on every run: only one that holds nothing but an earlier demo's files may be."""
    from producer.demo import DemoError, prepare_workdir

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    (precious / "worker.log").write_text("old")
    with pytest.raises(DemoError, match=r"holds files that the demo did not write \(notes.txt\)"):
        prepare_workdir(precious)
    assert (precious / "notes.txt").read_text() == "mine"
    monkeypatch.chdir(precious)
    with pytest.raises(DemoError, match="the current folder"):
        prepare_workdir(Path("."))
    with pytest.raises(DemoError, match="the current folder"):
        prepare_workdir(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DemoError, match="is a file"):
        prepare_workdir(tmp_path / "file")

    earlier = tmp_path / "earlier"  # what a run leaves: emptied
    (earlier / "captchas" / "images").mkdir(parents=True)
    (earlier / "demo.db").write_text("")
    (earlier / "worker.log").write_text("")
    assert prepare_workdir(earlier) == earlier.resolve() and list(earlier.iterdir()) == []
    assert prepare_workdir(tmp_path / "new" / "demo").is_dir()
    result = CliRunner().invoke(app, ["demo", "--count", "2", "--workdir", str(tmp_path / "file")])
    assert result.exit_code == 1 and "is a file" in result.output


def test_demo_refuses_worker_options_before_making_anything(tmp_path):
    """``--device gpu`` used to be refused by the worker only after the images were made and Redis started."""
    from producer.demo import DemoError, run_demo

    with pytest.raises(DemoError, match="--device 'gpu': expected auto, cpu, cuda or cuda:N"):
        run_demo(tmp_path / "demo", count=5, device="gpu")
    with pytest.raises(DemoError, match="one worker per GPU"):
        run_demo(tmp_path / "demo", count=5, device="cuda", concurrency=2)
    assert not (tmp_path / "demo").exists()
