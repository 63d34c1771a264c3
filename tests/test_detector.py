"""The inference API: loading (explicit, from settings), version, predictions in input order from paths or images."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.checkpoint import read_metadata, reconfigure_checkpoint, save_checkpoint
from core.config import get_settings
from core.detector import Detector, Prediction, detect, image_to_tensor, resolve_device
from core.images import ImageError
from core.models import build_model, text_from_detections
from core.synth import render_captcha
from sample_models import TINY as _TINY, eager_tiny_model

TINY = {**_TINY, "score_thresh": 0.0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    return save_checkpoint(eager_tiny_model(1), out, {"metrics": {}})


@pytest.fixture(scope="module")
def captchas(tmp_path_factory) -> list[Path]:
    """Five synthetic CAPTCHAs of different widths, saved as PNG."""
    folder = tmp_path_factory.mktemp("imgs")
    rng = random.Random(7)
    paths = []
    for i, text in enumerate(("ab12", "x9y8z7q", "k3m", "p0p0p0p0", "zz9")):
        img, _ = render_captcha(text, rng)
        paths.append(folder / f"{text}-{i}.png")
        img.save(paths[-1])
    assert len({Image.open(p).width for p in paths}) >= 4
    return paths


def test_load_sets_version_device_and_eval_mode(checkpoint: Path) -> None:
    det = Detector.load(checkpoint, device="cpu")
    assert det.device == torch.device("cpu")
    assert det.checkpoint_path == checkpoint.resolve()
    assert det.version == "sha256:" + det.metadata["sha256"][:12]
    assert not det.model.training


def test_version_from_metadata(tmp_path: Path) -> None:
    path = save_checkpoint(build_model("fast", **TINY), tmp_path / "v.safetensors", {"version": "7"})
    assert Detector.load(path).version == "7"


def test_a_version_longer_than_the_database_holds_is_cut_to_a_unique_64(tmp_path: Path) -> None:
    """PostgreSQL refuses a version over 64 characters (SQLite stores it), which failed every image of the worker
    serving it; the version is cut to its start and a digest of the whole, and a reconfigured copy still differs."""
    given = "nightly-" + "x" * 71
    path = save_checkpoint(build_model("fast", **TINY), tmp_path / "v.safetensors", {"version": given})
    version = Detector.load(path).version
    assert len(version) == 64 and version.startswith("nightly-xxx") and version[47] == "~"
    other = save_checkpoint(build_model("fast", **TINY), tmp_path / "w.safetensors", {"version": given + "y"})
    assert Detector.load(other).version != version
    copy = reconfigure_checkpoint(path, tmp_path / "r.safetensors", {"score_thresh": 0.3})
    assert len(Detector.load(copy).version) == 64 and Detector.load(copy).version != version


def test_a_reconfigured_checkpoint_records_results_under_its_own_version(tmp_path: Path) -> None:
    """reconfigure keeps the weights (so their sha256) but changes what the network reads: results written with it
    must not share a model_version with its source's, and two different decode settings must not share one either."""
    torch.manual_seed(0)
    model = build_model("fast", **TINY, reader_width=8)
    for metadata in ({}, {"version": "7"}):
        src = save_checkpoint(model, tmp_path / "src.safetensors", metadata)
        views = reconfigure_checkpoint(src, tmp_path / "views.safetensors", {"reader_views": [0, 7, -7]})
        strict = reconfigure_checkpoint(src, tmp_path / "strict.safetensors", {"score_thresh": 0.5})
        assert read_metadata(views)["sha256"] == read_metadata(src)["sha256"]  # the very same weights
        versions = [Detector.load(path, device="cpu").version for path in (src, views, strict)]
        base = versions[0]
        assert base == (metadata.get("version") or "sha256:" + read_metadata(src)["sha256"][:12])
        assert len(set(versions)) == 3 and all(v.startswith(base + "+decode:") for v in versions[1:])
        assert all(len(v) <= 64 for v in versions)  # fits results.model_version
        # the same settings give the same version, wherever the file lies
        again = reconfigure_checkpoint(src, tmp_path / "again.safetensors", {"reader_views": [0, 7, -7]})
        assert Detector.load(again, device="cpu").version == versions[1]


def test_load_without_argument_uses_settings(checkpoint: Path, monkeypatch) -> None:
    monkeypatch.setenv("CAPTCHA_CHECKPOINT", str(checkpoint))
    get_settings.cache_clear()
    try:
        assert Detector.load().checkpoint_path == checkpoint.resolve()
    finally:
        get_settings.cache_clear()


def test_auto_device_is_cpu_without_cuda() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_predict_accepts_paths_and_images_and_keeps_order(checkpoint: Path, captchas: list[Path]) -> None:
    det = Detector.load(checkpoint)
    singles = [det.predict([p])[0] for p in captchas]  # one image per call: no batching involved
    assert sum(len(p.chars) for p in singles) > 0
    shuffled = [4, 1, 3, 0, 2]
    mixed: list[Image.Image | Path] = [Image.open(captchas[i]) if i % 2 else captchas[i] for i in shuffled]
    batched = det.predict(mixed, batch_size=1)  # width order differs from input order
    assert batched == [singles[i] for i in shuffled]
    together = det.predict([captchas[i] for i in shuffled], batch_size=8)  # one padded batch of mixed widths
    assert [len(p.chars) > 0 for p in together] == [len(singles[i].chars) > 0 for i in shuffled]


def test_batches_are_grouped_by_aspect_ratio(checkpoint: Path, captchas: list[Path]) -> None:
    det = Detector.load(checkpoint)
    seen: list[list[int]] = []
    forward = det.model.forward

    def recording(images, targets=None):
        seen.append([int(img.shape[-1]) for img in images])
        return forward(images, targets)

    det.model.forward = recording  # type: ignore[method-assign]
    det.predict(captchas, batch_size=2)
    widths = sorted(Image.open(p).width for p in captchas)
    assert seen == [widths[0:2], widths[2:4], widths[4:5]]

    # The network rescales every image to one height, so the narrowest image enlarged (both sides k times, wider
    # than the next one) is batched with the narrowest itself, the same aspect ratio, not by its width.
    narrowest, other = sorted((Image.open(p).convert("RGB") for p in captchas), key=lambda img: img.width)[:2]
    k = other.width // narrowest.width + 1
    enlarged = narrowest.resize((narrowest.width * k, narrowest.height * k))
    seen.clear()
    det.predict([other, enlarged, narrowest], batch_size=2)
    assert seen == [[narrowest.width, enlarged.width], [other.width]]


def test_a_network_that_keeps_the_image_size_batches_by_size() -> None:
    """``seed`` reads images at their own size, so images of one aspect ratio but different sizes would pad each
    other; it batches by width and height, ``fast`` (one input height) by aspect ratio."""
    from core.detector import aspect, batch_key, size

    assert batch_key(build_model("seed")) is size
    assert batch_key(build_model("fast", **TINY)) is aspect


def test_paths_are_decoded_a_window_at_a_time(checkpoint: Path, captchas: list[Path], monkeypatch) -> None:
    import core.detector as detector_module

    det = Detector.load(checkpoint)
    boxes = [[[2.0, 2.0, 30.0, 40.0], [40.0, 10.0, 60.0, 50.0]] for _ in captchas]
    whole, whole_read = det.predict(captchas, batch_size=1), det.read_boxes(captchas, boxes, batch_size=1)
    events: list[str | int] = []
    load = detector_module.load_image
    monkeypatch.setattr(detector_module, "load_image", lambda path: (events.append("load"), load(path))[1])
    forward, read = det.model.forward, det.model.read_boxes

    def recording(images, targets=None):
        events.append(len(images))
        return forward(images, targets)

    def recording_read(images, given):
        events.append(len(images))
        return read(images, given)

    det.model.forward, det.model.read_boxes = recording, recording_read  # type: ignore[method-assign]
    det.window = 2
    # two images decoded, both read, then the next two: never more than a window of them in memory
    assert det.predict(captchas, batch_size=1) == whole
    assert events == ["load", "load", 1, 1, "load", "load", 1, 1, "load", 1]
    events.clear()
    assert det.read_boxes(captchas, boxes, batch_size=1) == whole_read
    assert events == ["load", "load", 1, 1, "load", "load", 1, 1, "load", 1]
    det.window = 0
    with pytest.raises(ValueError, match="window"):
        det.predict(captchas)


def test_prediction_fields_match_the_detections(checkpoint: Path, captchas: list[Path]) -> None:
    det = Detector.load(checkpoint)
    tensors = [image_to_tensor(Image.open(p)) for p in captchas]
    raw = detect(det.model, tensors, batch_size=1, precision=det.precision)
    for p, d in zip(det.predict(captchas, batch_size=1), raw):
        assert isinstance(p, Prediction)
        assert p.text == text_from_detections(d)
        assert [c.index for c in p.chars] == list(range(len(p.text)))
        assert "".join(c.char for c in p.chars) == p.text
        assert [c.box for c in p.chars] == [tuple(b) for b in d["boxes"].tolist()]
        expected = sum(c.score for c in p.chars) / len(p.chars) if p.chars else 0.0
        assert p.score == pytest.approx(expected)


def test_empty_input_and_unreadable_path(checkpoint: Path, tmp_path: Path) -> None:
    det = Detector.load(checkpoint)
    assert det.predict([]) == []
    bad = tmp_path / "bad-0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ImageError):
        det.predict([bad])


def test_rgba_images_are_composited_on_white(checkpoint: Path, captchas: list[Path]) -> None:
    det = Detector.load(checkpoint)
    rgb = Image.open(captchas[0]).convert("RGB")
    rgba = rgb.convert("RGBA")
    assert det.predict([rgba]) == det.predict([rgb])


def test_shipped_checkpoint_reads_fresh_synthetic_captchas(monkeypatch) -> None:
    from core.charset import CHARS
    from core.checkpoint import default_checkpoint_path, read_metadata
    from core.evaluate import score

    path = default_checkpoint_path()
    assert path.stat().st_size <= 10 * 1024 * 1024
    monkeypatch.delenv("CAPTCHA_CHECKPOINT", raising=False)
    get_settings.cache_clear()
    try:
        det = Detector.load(device="cpu")
    finally:
        get_settings.cache_clear()
    assert det.checkpoint_path == path.resolve()
    meta = read_metadata(path)
    assert meta["arch"] == "fast"
    rng = random.Random(20240601)  # images no training run has seen
    texts = ["".join(rng.choice(CHARS) for _ in range(rng.randint(4, 8))) for _ in range(40)]
    images = [render_captcha(t, rng)[0] for t in texts]
    s = score([p.text for p in det.predict(images)], texts)
    # as good as the validation accuracy recorded at training time, give or take the sampling of 40 images
    assert s.sequence_accuracy >= meta["metrics"]["val_sequence_accuracy"] - 0.15
    assert s.character_accuracy >= meta["metrics"]["val_character_accuracy"] - 0.1


def test_read_boxes_reads_the_true_boxes_and_gives_back_predicts_own_text(tmp_path: Path) -> None:
    from core.charset import CHARS
    from core.checkpoint import default_checkpoint_path

    det = Detector.load(default_checkpoint_path(), device="cpu")
    rng = random.Random(20240602)
    texts = ["".join(rng.choice(CHARS) for _ in range(rng.randint(4, 8))) for _ in range(16)]
    rendered = [render_captcha(t, rng) for t in texts]
    images = [img for img, _ in rendered]
    read = det.read_boxes(images, [boxes for _, boxes in rendered], batch_size=5)
    assert [len(r) for r in read] == [len(t) for t in texts]  # one character per given box, in their order
    assert sum(r == t for r, t in zip(read, texts)) >= 12  # the shipped reader names most glyphs on true boxes
    # on the boxes predict found, the reading is predict's own
    predictions = det.predict(images)
    again = det.read_boxes(images, [[c.box for c in p.chars] for p in predictions])
    assert again == [p.text for p in predictions]
    with pytest.raises(ValueError, match="box lists"):
        det.read_boxes(images, [])
    seed = Detector.load(save_checkpoint(build_model("seed", num_classes=36), tmp_path / "seed.safetensors"))
    with pytest.raises(ValueError, match="cannot read given boxes"):
        seed.read_boxes(images[:1], [rendered[0][1]])


@pytest.mark.parametrize("source", ["colour", "both"])
def test_box_source_reads_the_colour_segments_and_detects_where_there_are_none(tmp_path: Path, source: str) -> None:
    from core.charset import CHARS
    from core.checkpoint import CheckpointError, default_checkpoint_path
    from core.segment import colour_segments

    plain = Detector.load(default_checkpoint_path(), device="cpu")
    path = reconfigure_checkpoint(default_checkpoint_path(), tmp_path / f"{source}.safetensors", {"box_source": source})
    det = Detector.load(path, device="cpu")
    assert (plain.box_source, det.box_source) == ("detector", source)
    assert det.version != plain.version  # results read another way are recorded under another version
    rng = random.Random(20240603)
    texts = ["".join(rng.choice(CHARS) for _ in range(rng.randint(4, 8))) for _ in range(16)]
    images = [render_captcha(t, rng)[0] for t in texts]
    blank = Image.new("RGB", (200, 80), "white")  # nothing to segment: the detector reads it
    got = det.predict(images + [blank], batch_size=5)
    own = plain.predict(images + [blank], batch_size=5)
    assert got[-1] == own[-1]
    segments = [colour_segments(img) for img in images]
    read = plain.read_boxes(images, segments)
    right = 0
    for i, (prediction, boxes) in enumerate(zip(got[:-1], segments)):
        by_colour = [c.box for c in prediction.chars] == list(boxes) and prediction.text == read[i]
        if source == "colour":
            assert by_colour
        elif not by_colour:  # "both" keeps the detections only where they disagree in length and score higher
            assert prediction == own[i] and len(own[i].chars) != len(boxes) and own[i].score > 0
        if by_colour:
            assert all(0.0 < c.score <= 1.0 for c in prediction.chars)
            assert prediction.score == pytest.approx(sum(c.score for c in prediction.chars) / len(boxes))
        right += prediction.text == texts[i]
    assert right >= 11  # each character has its own colour here, so the segments are the glyphs
    with pytest.raises(CheckpointError, match="box_source"):
        reconfigure_checkpoint(default_checkpoint_path(), tmp_path / "bad.safetensors", {"box_source": "magic"})


def test_both_gate_detects_only_where_the_colour_reading_is_unsure(tmp_path: Path) -> None:
    from core.charset import CHARS
    from core.checkpoint import CheckpointError, default_checkpoint_path

    rng = random.Random(20241202)
    texts = ["".join(rng.choice(CHARS) for _ in range(rng.randint(4, 8))) for _ in range(12)]
    images = [render_captcha(t, rng)[0] for t in texts]
    readers = {}
    for name, changes in (("colour", {"box_source": "colour"}), ("both", {"box_source": "both"}),
                          ("gated", {"box_source": "both", "both_gate": 0.9})):
        readers[name] = Detector.load(reconfigure_checkpoint(default_checkpoint_path(), tmp_path / f"{name}.safetensors",
                                                             changes), device="cpu")
    assert (readers["both"].both_gate, readers["gated"].both_gate) == (1.0, 0.9)
    assert readers["gated"].version != readers["both"].version
    calls: list[int] = []
    model = readers["gated"].model
    original = model.forward
    model.forward = lambda batch, *a, **k: calls.append(len(batch)) or original(batch, *a, **k)
    colour, both, gated = (readers[n].predict(images) for n in ("colour", "both", "gated"))
    unsure = [i for i, p in enumerate(colour) if min(c.score for c in p.chars) < 0.9]
    assert 0 < len(unsure) < len(images)  # the gate splits this set, so the test tells the two ways apart
    assert sum(calls) == len(unsure)  # the detector ran on the unsure images only
    for i in range(len(images)):
        assert gated[i] == (both[i] if i in unsure else colour[i])
    with pytest.raises(CheckpointError, match="both_gate"):
        reconfigure_checkpoint(default_checkpoint_path(), tmp_path / "bad.safetensors", {"both_gate": 0.5})
    with pytest.raises(CheckpointError, match="both_gate"):
        reconfigure_checkpoint(default_checkpoint_path(), tmp_path / "bad.safetensors",
                               {"box_source": "both", "both_gate": 0.0})


def test_devices_are_checked_with_a_readable_error():
    import torch

    from core.detector import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    for bad in ("tpu", "gpu", "mps"):
        with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")  # one past the last, or any on a machine without
