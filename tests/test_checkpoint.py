"""Checkpoints: safetensors + JSON round trip, integrity checks, atomic writes, pickle-free training state."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from core.charset import CHARS
from core.checkpoint import (
    DECODE_SETTINGS,
    FORMAT_VERSION,
    CheckpointError,
    default_checkpoint_path,
    load_checkpoint,
    load_training_state,
    metadata_path,
    read_metadata,
    reconfigure_checkpoint,
    save_checkpoint,
    save_training_state,
    sha256_file,
    state_paths,
)
from core.detector import image_to_tensor
from core.models import build_model
from core.synth import render_captcha
from sample_models import TINY as _TINY, eager_tiny_model

TINY = {**_TINY, "score_thresh": 0.0}


@pytest.fixture()
def model() -> torch.nn.Module:
    return eager_tiny_model(0).eval()


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    rng = random.Random(3)
    return [image_to_tensor(render_captcha(text, rng)[0]) for text in ("ab12", "x9y8z7", "qq0")]


def _detect(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    with torch.inference_mode():
        return model(images)


def test_round_trip_gives_identical_predictions(model, images, tmp_path: Path) -> None:
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"metrics": {"val_sequence_accuracy": 0.5}})
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    assert loaded.config == model.config
    before, after = _detect(model, images), _detect(loaded, images)
    assert sum(len(d["labels"]) for d in before) > 0  # something to compare
    for a, b in zip(before, after):
        assert torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["boxes"], b["boxes"])
        assert torch.equal(a["scores"], b["scores"])
    assert meta["metrics"] == {"val_sequence_accuracy": 0.5}


def test_json_has_the_documented_keys(model, tmp_path: Path) -> None:
    path = save_checkpoint(
        model,
        tmp_path / "m.safetensors",
        {"train_config": {"epochs": 3}, "data_summary": {"train_images": 10}, "version": "v7", "history": [1, 2]},
    )
    meta = json.loads(metadata_path(path).read_text())
    assert {"format_version", "arch", "model_config", "charset", "metrics", "train_config", "data_summary",
            "created_at", "sha256"} <= set(meta)  # fmt: skip
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["arch"] == "fast" and meta["model_config"] == model.config
    assert meta["charset"] == CHARS
    assert meta["sha256"] == sha256_file(path)
    assert meta["version"] == "v7" and meta["history"] == [1, 2]
    assert meta["train_config"] == {"epochs": 3} and meta["data_summary"] == {"train_images": 10}
    assert read_metadata(path) == meta


def test_save_leaves_no_temporary_files_and_overwrites(model, tmp_path: Path) -> None:
    save_checkpoint(model, tmp_path / "m.safetensors", {"version": "a"})
    save_checkpoint(model, tmp_path / "m.safetensors", {"version": "b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o666 & ~umask}  # not mkstemp's 0600
    assert read_metadata(tmp_path / "m.safetensors")["version"] == "b"
    previous = os.umask(0o027)  # the umask is read, never set to 0 for a moment (another thread may create files)
    try:
        save_checkpoint(model, tmp_path / "strict.safetensors")
        assert (tmp_path / "strict.safetensors").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)


def test_a_checkpoint_loaded_while_it_is_rewritten_loads_whole(tmp_path: Path) -> None:
    """``train --out`` onto the checkpoint a starting worker loads: the writer replaces the weights, then their
    metadata, so a reader between the two saw new weights under the old hash and refused them ("sha256 mismatch",
    about one load in twenty with a save a second, one in three with saves back to back; the worker then failed its
    whole message). A mismatch is now read again until the pair is whole."""
    import threading

    path = tmp_path / "served.safetensors"
    models = [eager_tiny_model(seed) for seed in range(2)]
    save_checkpoint(models[0], path, {"metrics": {"writer": 0}})
    stop, saves = threading.Event(), []

    def rewrite() -> None:
        while not stop.is_set():
            k = len(saves) % 2
            save_checkpoint(models[k], path, {"metrics": {"writer": k}})
            saves.append(k)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(100):
            loaded, meta = load_checkpoint(path)  # raised CheckpointError before
            expected = models[meta["metrics"]["writer"]].state_dict()
            assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())  # the weights and
            # the metadata are one save's
    finally:
        stop.set()
        writer.join()
    assert len(saves) > 10


def test_sha256_mismatch_is_refused(model, tmp_path: Path) -> None:
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(path)
    loaded, _ = load_checkpoint(path, verify_sha256=False)  # opt-out still loads the (altered) weights
    assert isinstance(loaded, torch.nn.Module)


def test_missing_and_corrupt_files_give_clear_errors(model, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nothing.safetensors")
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"m.json is a checkpoint's description; give its weights, .*m.safetensors"):
        load_checkpoint(metadata_path(path))  # the other file of the pair
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path, verify_sha256=False)
    metadata_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint metadata"):
        load_checkpoint(path)
    metadata_path(path).unlink()
    with pytest.raises(CheckpointError, match="metadata not found"):
        load_checkpoint(path)


def test_wrong_charset_and_wrong_architecture_are_refused(model, tmp_path: Path) -> None:
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    meta = json.loads(metadata_path(path).read_text())
    metadata_path(path).write_text(json.dumps({**meta, "charset": "0123456789"}))
    with pytest.raises(CheckpointError, match="charset"):
        load_checkpoint(path)
    metadata_path(path).write_text(json.dumps({**meta, "model_config": {**meta["model_config"], "head_width": 64}}))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path)


def test_loading_never_unpickles(model, tmp_path: Path, monkeypatch) -> None:
    path = save_checkpoint(model, tmp_path / "m.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    loaded, _ = load_checkpoint(path)
    assert loaded.config == model.config


def test_training_state_round_trip(model, images, tmp_path: Path) -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    targets = [{"boxes": torch.tensor([[5.0, 10.0, 30.0, 60.0]]), "labels": torch.tensor([3])} for _ in images]
    sum(model(images, targets).values()).backward()
    optimizer.step()
    out = tmp_path / "m.safetensors"
    torch.manual_seed(11)
    random.seed(11)
    save_training_state(out, model, optimizer, {"epoch": 4, "history": [{"epoch": 4}]})
    expected_torch, expected_py = torch.rand(3), random.random()
    assert all(p.exists() for p in state_paths(out))

    torch.manual_seed(0)
    fresh = build_model("fast", **TINY)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3, betas=(0.8, 0.95))
    state = load_training_state(out, fresh, fresh_opt)
    assert state == {"epoch": 4, "history": [{"epoch": 4}]}
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_py
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    saved, restored = optimizer.state_dict(), fresh_opt.state_dict()
    assert restored["param_groups"] == saved["param_groups"]
    assert isinstance(restored["param_groups"][0]["betas"], tuple)
    for i, entry in saved["state"].items():
        for name, value in entry.items():
            assert torch.equal(restored["state"][i][name], value)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_between_weights_and_json_waits_for_the_pair(model, tmp_path: Path, monkeypatch, signum) -> None:
    """Ctrl-C (or SIGTERM) arriving after the new weights are renamed into place but before their JSON is written
    used to leave weights their JSON refuses (sha256 mismatch): the checkpoint unloadable, the run impossible to
    resume. The signal now takes effect once the pair is whole, and the previous handler still gets it."""
    import core.checkpoint

    write = core.checkpoint._write_atomic

    def interrupted_before_json(path, data):
        if path.suffix == ".json":
            os.kill(os.getpid(), signum)  # between the two renames
        write(path, data)

    out = tmp_path / "m.safetensors"
    save_checkpoint(model, out, {"version": "old"})
    optimizer = torch.optim.AdamW(model.parameters())
    save_training_state(out, model, optimizer, {"epoch": 1})
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # new weights: the interrupted pair must not mix old and new
    class Interrupted(Exception):
        pass

    def stop(received, frame):  # as Python's Ctrl-C handler raises KeyboardInterrupt
        raise Interrupted(received)

    previous = signal.signal(signum, stop)
    try:
        monkeypatch.setattr(core.checkpoint, "_write_atomic", interrupted_before_json)
        with pytest.raises(Interrupted):
            save_checkpoint(model, out, {"version": "new"})
        with pytest.raises(Interrupted):
            save_training_state(out, model, optimizer, {"epoch": 2})
    finally:
        signal.signal(signum, previous)
    loaded, meta = load_checkpoint(out)
    assert meta["version"] == "new"
    assert torch.equal(next(loaded.parameters()), next(model.parameters()))
    assert load_training_state(out, model, optimizer) == {"epoch": 2}


def test_a_handler_set_outside_python_is_left_alone(model, tmp_path: Path, monkeypatch) -> None:
    """Embedded in another program, ``signal.getsignal`` answers None for a handler the host installed, and None
    cannot be put back: such a signal is not held, and the others still are and are restored."""
    real = signal.getsignal
    monkeypatch.setattr(signal, "getsignal", lambda signum: None if signum == signal.SIGTERM else real(signum))
    before = {signum: real(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    save_checkpoint(model, tmp_path / "m.safetensors")
    assert {signum: real(signum) for signum in before} == before
    load_checkpoint(tmp_path / "m.safetensors")


def test_training_state_for_another_model_is_refused(model, tmp_path: Path) -> None:
    optimizer = torch.optim.AdamW(model.parameters())
    save_training_state(tmp_path / "m.safetensors", model, optimizer, {"epoch": 1})
    other = build_model("fast", **{**TINY, "head_width": 16})
    with pytest.raises(CheckpointError, match="model_config"):
        load_training_state(tmp_path / "m.safetensors", other, torch.optim.AdamW(other.parameters()))
    with pytest.raises(CheckpointError, match="no training state"):
        load_training_state(tmp_path / "other.safetensors", model, optimizer)


def test_default_checkpoint_path_points_into_the_package() -> None:
    path = default_checkpoint_path()
    assert path.name == "fast.safetensors"
    assert path.parent.name == "default_checkpoint" and path.parent.parent.name == "core"


def test_reconfigure_changes_decode_settings_and_keeps_weights_and_metadata(images, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from core.cli import app

    torch.manual_seed(0)
    reader = build_model("fast", **TINY, reader_width=16, context_layers=1, context_width=16, context_heads=2).eval()
    src = save_checkpoint(reader, tmp_path / "plain.safetensors", {"metrics": {"val_sequence_accuracy": 0.5}})
    out = tmp_path / "views.safetensors"
    result = CliRunner().invoke(app, ["reconfigure", str(src), "--set", '{"reader_views": [0, 7, -7]}',
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "reader_views=[0, 7, -7]" in result.output
    loaded, meta = load_checkpoint(out)
    assert loaded.reader.views == (0.0, 7.0, -7.0) and meta["model_config"]["reader_views"] == [0.0, 7.0, -7.0]
    assert meta["metrics"] == {"val_sequence_accuracy": 0.5}
    assert meta["reconfigured_from"]["changes"] == {"reader_views": [0, 7, -7]}
    assert meta["reconfigured_from"]["sha256"] == read_metadata(src)["sha256"]
    for name, tensor in reader.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    # the same as a network built with those views: the setting, not the weights, changes what it reads
    torch.manual_seed(0)
    direct = build_model("fast", **TINY, reader_width=16, context_layers=1, context_width=16, context_heads=2,
                         reader_views=[0, 7, -7]).eval()
    for a, b in zip(_detect(direct, images), _detect(loaded, images)):
        assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["scores"], b["scores"])
    # weights cannot change without training: a setting that shapes the network is refused, and so is a bad value
    refused = CliRunner().invoke(app, ["reconfigure", str(src), "--set", '{"reader_width": 32}', "--out", str(out)])
    assert refused.exit_code == 1 and "reader_width" in refused.output
    with pytest.raises(CheckpointError, match="at least one angle"):
        reconfigure_checkpoint(src, out, {"reader_views": []})
    assert CliRunner().invoke(app, ["reconfigure", str(src), "--set", "[1]", "--out", str(out)]).exit_code == 1
    for bad, why in (({"score_thresh": "high"}, "from 0 to 1"), ({"score_thresh": 5}, "from 0 to 1"),
                     ({"nms_thresh": None}, "needs a value"), ({"reader_view_gate": 0}, "above 0"),
                     ({"detections_per_img": 2.5}, "whole number"), ({"rpn_post_nms_top_n_test": True}, "whole number"),
                     ({"reader_views": "0,7"}, "list of angles"), ({"box_source": 1}, "detector, colour or both")):
        with pytest.raises(CheckpointError, match=why):
            reconfigure_checkpoint(src, tmp_path / "bad.safetensors", bad)
    assert not (tmp_path / "bad.safetensors").exists()
    off = reconfigure_checkpoint(src, tmp_path / "off.safetensors", {"containment_thresh": None})
    assert read_metadata(off)["model_config"]["containment_thresh"] is None
    # a checkpoint without a glyph reader has no views to set
    plain = save_checkpoint(build_model("fast", **TINY).eval(), tmp_path / "noreader.safetensors")
    with pytest.raises(CheckpointError, match="needs a glyph reader"):
        reconfigure_checkpoint(plain, tmp_path / "noreader-views.safetensors", {"reader_views": [0, 7, -7]})
    assert not (tmp_path / "noreader-views.safetensors").exists()


def test_every_decode_setting_is_a_network_setting_that_leaves_the_weights_alone() -> None:
    """``reconfigure_checkpoint`` trusts DECODE_SETTINGS: each must be a real argument of the network, recorded in its
    model_config, and must not change a single tensor name, shape or value."""
    values = {"reader_views": [0.0, 5.0, -5.0], "reader_view_gate": 0.8, "score_thresh": 0.3, "nms_thresh": 0.2,
              "cross_class_nms_thresh": 0.4, "containment_thresh": 0.6, "detections_per_img": 5,
              "rpn_pre_nms_top_n_test": 50,
              "rpn_post_nms_top_n_test": 20, "box_source": "both", "both_gate": 0.5}
    needs = {"both_gate": {"box_source": "both"}}  # settings that only mean something with another one
    assert set(values) == DECODE_SETTINGS
    config = {**TINY, "reader_width": 8}
    torch.manual_seed(0)
    reference = build_model("fast", **config).state_dict()
    for key, value in values.items():
        torch.manual_seed(0)
        model = build_model("fast", **{**config, **needs.get(key, {}), key: value})
        assert model.config[key] == value, key
        state = model.state_dict()
        assert state.keys() == reference.keys(), key
        assert all(torch.equal(state[name], reference[name]) for name in state), key
    # a setting outside the list does change the weights, which is why reconfigure refuses it
    torch.manual_seed(0)
    assert build_model("fast", **{**config, "reader_width": 16}).state_dict()["reader.fc.weight"].shape != \
        reference["reader.fc.weight"].shape
