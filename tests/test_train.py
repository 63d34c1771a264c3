"""Training: width-bucketed batches, a tiny run that writes a loadable checkpoint, resume, the train command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.checkpoint import CheckpointError, load_checkpoint, read_metadata, state_paths
from core.detector import Detector
from core.synth import generate
from core.train import TrainConfig, WidthBucketSampler, lr_at, train_model

from sample_models import TINY
CLI = Path(sys.executable).with_name("captcha-queue")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 training and 4 validation CAPTCHAs (synthetic)."""
    root = tmp_path_factory.mktemp("data")
    generate(root / "train", 16, seed=0, workers=1, progress=False)
    generate(root / "val", 4, seed=1, workers=1, progress=False)
    return root


def _config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        images=data / "train" / "images", labels=data / "train" / "labels",
        val_images=data / "val" / "images", val_labels=data / "val" / "labels",
        out=out, model_config=TINY, epochs=2, batch_size=8, num_workers=0, seed=3,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_width_bucket_sampler_covers_everything_once_in_similar_widths() -> None:
    widths = [100 + (i * 37) % 500 for i in range(103)]
    sampler = WidthBucketSampler(widths, batch_size=8, seed=1, pool=4)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert all(len(b) <= 8 for b in batches)
    # within a pool of 32 samples sorted by width, a batch spans far less than the full range of widths
    spans = [max(widths[i] for i in b) - min(widths[i] for i in b) for b in batches]
    assert sum(spans) / len(spans) < 0.5 * (max(widths) - min(widths))
    sampler.set_epoch(2)
    assert list(sampler) != batches  # reshuffled per epoch
    sampler.set_epoch(1)
    assert list(sampler) == batches  # deterministic
    ordered = list(WidthBucketSampler(widths, batch_size=8, shuffle=False, pool=10**9))
    assert [i for b in ordered for i in b] == sorted(range(103), key=lambda i: widths[i])


def test_epoch_size_walks_through_reshuffled_passes() -> None:
    widths = list(range(10))
    sampler = WidthBucketSampler(widths, batch_size=3, seed=2, epoch_size=4)
    seen: list[int] = []
    for epoch in range(1, 6):  # 5 epochs of 4 samples: exactly two passes over 10 samples
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 2
        seen.extend(i for b in batches for i in b)
    assert sorted(seen) == sorted(list(range(10)) * 2)


def test_lr_schedule_warms_up_then_decays() -> None:
    lrs = [lr_at(s, 100, 1e-3, 10, 0.02) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, 100, 1e-3, 10, 0.02) == pytest.approx(2e-5)


def test_tiny_run_writes_a_loadable_checkpoint_with_metrics(data: Path, tmp_path: Path) -> None:
    events: list[dict] = []
    out = tmp_path / "run" / "tiny.safetensors"
    result = train_model(_config(data, out, version="t1"), events.append)
    assert result.checkpoint == out and out.exists()
    assert [r["epoch"] for r in result.history] == [1, 2]
    for record in result.history:
        assert {"rpn_cls", "rpn_reg", "cls", "loss", "images_per_second", "val_sequence_accuracy",
                "val_character_accuracy"} <= set(record)  # fmt: skip
        assert record["loss"] == pytest.approx(sum(record[k] for k in ("rpn_cls", "rpn_reg", "cls", "box_reg")))
        assert record["val_images"] == 4 and record["images_per_second"] > 0
    assert [e["event"] for e in events].count("step") == 2 * 2  # 16 images / batch 8, two epochs
    for record in result.history:  # an epoch's loss is the mean of its steps' losses, as each step reported it
        steps = [e["loss"] for e in events if e["event"] == "step" and e["epoch"] == record["epoch"]]
        assert record["loss"] == pytest.approx(sum(steps) / len(steps))
    assert events[0]["event"] == "start" and events[0]["train_images"] == 16
    meta = read_metadata(out)
    assert meta["version"] == "t1"
    assert meta["metrics"]["epoch"] == result.best_epoch
    assert meta["train_config"]["epochs"] == 2 and meta["train_config"]["model_config"] == TINY
    assert meta["data_summary"]["train_images"] == 16 and meta["data_summary"]["val_images"] == 4
    model, _ = load_checkpoint(out)
    assert model.config["widths"] == TINY["widths"]
    assert Detector.load(out).version == "t1"
    assert all(p.exists() for p in state_paths(out))


def test_validation_is_held_out_when_not_given(data: Path, tmp_path: Path) -> None:
    cfg = _config(data, tmp_path / "h.safetensors", val_images=None, val_labels=None, epochs=1, val_fraction=0.25)
    result = train_model(cfg)
    summary = read_metadata(cfg.out)["data_summary"]
    assert (summary["train_images"], summary["val_images"]) == (12, 4)
    assert result.history[0]["val_images"] == 4


class _Stop(Exception):
    pass


@pytest.mark.parametrize(("ema_decay", "workers"), [(None, 0), (0.9, 0), (None, 1)])
def test_resume_continues_from_the_saved_epoch(data: Path, tmp_path: Path, ema_decay: float | None,
                                               workers: int) -> None:
    """Interrupted after epoch 1 and resumed, a run ends where the uninterrupted one does, also with DataLoader
    processes (the default of ``train``: ``--workers 1``)."""
    straight = train_model(_config(data, tmp_path / "straight.safetensors", ema_decay=ema_decay, num_workers=workers))

    def stop_after_first_epoch(event: dict) -> None:
        if event["event"] == "epoch" and event["epoch"] == 1:
            raise _Stop

    out = tmp_path / "resumed.safetensors"
    with pytest.raises(_Stop):
        train_model(_config(data, out, ema_decay=ema_decay, num_workers=workers), stop_after_first_epoch)
    events: list[dict] = []
    resumed = train_model(_config(data, out, resume=True, ema_decay=ema_decay, num_workers=workers), events.append)
    assert events[0]["start_epoch"] == 2
    assert resumed.epochs_run == 1
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    # same seed, same data: the interrupted-and-resumed run ends where the uninterrupted one does
    for key in ("loss", "rpn_cls", "cls"):
        assert resumed.history[1][key] == pytest.approx(straight.history[1][key], rel=1e-4)
    a, _ = load_checkpoint(straight.checkpoint)
    b, _ = load_checkpoint(out)
    if straight.best_epoch == resumed.best_epoch:
        for x, y in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.allclose(x.float(), y.float(), atol=1e-5)
    # a finished run resumed again has nothing left to do
    again = train_model(_config(data, out, resume=True, ema_decay=ema_decay, num_workers=workers))
    assert again.epochs_run == 0 and again.best_epoch == resumed.best_epoch
    # resumed with another schedule or seed it would silently be another run
    with pytest.raises(ValueError, match=r"changed: epochs 2 -> 3, batch_size 8 -> 4, seed 3 -> 5"):
        train_model(_config(data, out, resume=True, ema_decay=ema_decay, num_workers=workers, epochs=3,
                            batch_size=4, seed=5))  # fmt: skip


def test_moving_average_is_what_gets_validated_and_saved(data: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "ema.safetensors"
    result = train_model(_config(data, out, ema_decay=0.5, epochs=1))
    saved, _ = load_checkpoint(out)
    state = load_file(str(state_paths(out)[0]))
    weights = {k: v for k, v in saved.state_dict().items() if v.is_floating_point()}
    assert weights
    for name, value in weights.items():
        assert torch.equal(value, state[f"average.module.{name}"]), name
    # 2 steps: the average is the mean of the weights after steps 1 and 2, not the raw weights after step 2
    assert any(not torch.equal(value, state[f"model.{name}"]) for name, value in weights.items())
    assert state["average.n_averaged"].item() == 2
    assert result.history[0]["val_images"] == 4
    # resuming with an average a run that kept none is refused clearly
    from core.checkpoint import CheckpointError

    plain = tmp_path / "plain.safetensors"
    train_model(_config(data, plain, epochs=1))
    with pytest.raises(CheckpointError, match="no moving average"):
        train_model(_config(data, plain, epochs=2, resume=True, ema_decay=0.5))


def test_resume_without_state_is_a_clear_error(data: Path, tmp_path: Path) -> None:
    from core.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no training state"):
        train_model(_config(data, tmp_path / "none.safetensors", resume=True))


def test_init_from_starts_from_the_given_weights(data: Path, tmp_path: Path) -> None:
    first = train_model(_config(data, tmp_path / "a.safetensors", epochs=1))
    second = train_model(_config(data, tmp_path / "b.safetensors", epochs=1, init_from=first.checkpoint))
    assert read_metadata(second.checkpoint)["data_summary"]["init_from"] == str(first.checkpoint)
    assert second.history[0]["loss"] < first.history[0]["loss"]


def test_init_from_grows_the_network_by_a_context_head(data: Path, tmp_path: Path) -> None:
    first = train_model(_config(data, tmp_path / "a.safetensors", epochs=1))
    grown = {**TINY, "context_layers": 1, "context_width": 16, "context_heads": 2}
    second = train_model(_config(data, tmp_path / "b.safetensors", epochs=1, init_from=first.checkpoint,
                                 model_config=grown))
    meta = read_metadata(second.checkpoint)
    assert meta["model_config"]["context_layers"] == 1 and meta["model_config"]["widths"] == TINY["widths"]
    assert meta["data_summary"]["fresh_tensors"] > 0  # the context head's, the rest carried over
    assert "context" in second.history[0]
    assert second.history[0]["cls"] < first.history[0]["cls"]


def test_train_parts_reader_fits_a_new_reader_and_leaves_the_detector_alone(data: Path, tmp_path: Path) -> None:
    first = train_model(_config(data, tmp_path / "a.safetensors", epochs=1,
                                model_config={**TINY, "context_layers": 1, "context_width": 16, "context_heads": 2}))
    grown = {"reader_width": 16}
    second = train_model(_config(data, tmp_path / "b.safetensors", epochs=2, init_from=first.checkpoint,
                                 model_config=grown, train_parts="reader", lr=3e-3))
    assert {"reader", "context"} <= set(second.history[0]) and "cls" not in second.history[0]
    assert second.history[-1]["reader"] < second.history[0]["reader"]
    old, _ = load_checkpoint(first.checkpoint)
    new, meta = load_checkpoint(second.checkpoint)
    assert meta["model_config"]["reader_width"] == 16
    old_state, new_state = old.state_dict(), new.state_dict()
    detector = [k for k in old_state if not k.startswith("context.")]
    assert detector and all(torch.equal(old_state[k], new_state[k]) for k in detector)
    # the context head read the box head's vectors; over a reader it starts again (the input width also changed)
    assert meta["data_summary"]["fresh_tensors"] > len([k for k in new_state if k.startswith("reader.")])
    with pytest.raises(ValueError, match="reader"):
        train_model(_config(data, tmp_path / "c.safetensors", epochs=1, train_parts="reader"))


def test_train_command(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.safetensors"
    proc = subprocess.run(
        [str(CLI), "train", "--images", str(data / "train" / "images"), "--labels", str(data / "train" / "labels"),
         "--epochs", "1", "--batch-size", "8", "--workers", "0", "--model-config", json.dumps(TINY), "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "best epoch 1" in proc.stdout and "epoch 1:" in proc.stdout
    assert "epoch 2" not in proc.stdout + proc.stderr  # the bar is gone after the last epoch, not reset for another
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["arch"] == "fast" and meta["model_config"]["widths"] == TINY["widths"]
    assert meta["metrics"]["epoch"] == 1
    assert meta["data_summary"]["val_images"] == 1  # 5% of 16, at least one


def test_train_command_reports_bad_input(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(CLI), "train", "--images", str(tmp_path / "missing"), "--labels", str(tmp_path), "--out",
         str(tmp_path / "x.safetensors")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "error" in proc.stderr and "missing" in proc.stderr
    assert "loss" not in proc.stderr  # no empty progress bar above the error
    assert not (tmp_path / "x.safetensors").exists()
    half = subprocess.run(
        [str(CLI), "train", "--images", str(tmp_path), "--labels", str(tmp_path), "--val-images", str(tmp_path),
         "--out", str(tmp_path / "x.safetensors")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert half.returncode == 2 and "give both --val-images and --val-labels" in half.stderr


def test_runs_that_cannot_work_are_refused_before_training(data: Path, tmp_path: Path) -> None:
    """An empty validation folder (or a single training image to hold out from) would score every epoch 0, each
    the best so far, and a retraining run would then compare 0 with 0 and promote; a setting the network's
    architecture owns, a version the database cannot hold, validation labels without their images."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable validation samples"):
        train_model(_config(data, tmp_path / "a.safetensors", val_labels=tmp_path / "empty"))
    one = tmp_path / "one"
    generate(one, 1, seed=9, workers=1, progress=False)
    with pytest.raises(ValueError, match="no sample to validate on"):
        train_model(_config(data, tmp_path / "b.safetensors", images=one / "images", labels=one / "labels",
                            val_images=None, val_labels=None))  # fmt: skip
    with pytest.raises(ValueError, match="model_config cannot set arch: it comes from --arch"):
        train_model(_config(data, tmp_path / "d.safetensors", model_config={**TINY, "arch": "seed"}))
    with pytest.raises(CheckpointError, match="cannot end in .json"):
        train_model(_config(data, tmp_path / "f.json"))
    with pytest.raises(ValueError, match="longer than 48 characters"):
        train_model(_config(data, tmp_path / "e.safetensors", version="v" * 49))
    with pytest.raises(ValueError, match="val_labels needs val_images"):
        train_model(_config(data, tmp_path / "c.safetensors", val_images=None))
    assert not any(tmp_path.glob("*.safetensors"))


def test_validation_decodes_as_the_detector_does_with_colour_boxes(data: Path) -> None:
    """A checkpoint set to read colour boxes is validated on them (what ``eval`` and the workers serve), not on its
    own detections: with the detector made to find nothing, validation still reads what ``predict`` reads."""
    from core.checkpoint import default_checkpoint_path
    from core.evaluate import score
    from core.formats import LabelledFolder
    from core.train import validate

    det = Detector.load(default_checkpoint_path(), device="cpu", precision="fp32")
    det.model.config.update(box_source="colour", score_thresh=1.01)  # no detection passes: colour boxes only
    images = data / "train" / "images"
    folder = LabelledFolder(images, data / "train" / "labels")
    paths = [folder[i]["path"] for i in range(len(folder))]
    served = score([p.text for p in det.predict(paths)], [folder[i]["text"] for i in range(len(folder))])
    assert served.sequence_accuracy > 0.5
    got = validate(det.model, folder, 8, det.device, precision="fp32")
    assert got["val_images"] == len(folder)
    assert got["val_sequence_accuracy"] == served.sequence_accuracy
    assert got["val_character_accuracy"] == served.character_accuracy
