"""Autolabelling: text-constrained detections, the folder run (seed layout that training reads, stale labels removed,
reasons counted) and the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou
from typer.testing import CliRunner

from core.autolabel import SHARED_STEM, autolabel, match_text
from core.cli import app
from core.detector import Char, Prediction
from core.formats import LabelledFolder, list_images
from sample_data import truth


def prediction(*chars: tuple[str, tuple[float, float, float, float], float]) -> Prediction:
    return Prediction(
        text="".join(c for c, _, _ in chars),
        chars=tuple(Char(i, c, box, s) for i, (c, box, s) in enumerate(chars)),
        score=sum(s for _, _, s in chars) / max(1, len(chars)),
    )


def test_match_text_keeps_detections_that_read_the_text() -> None:
    a, b, c = (0, 0, 10, 20), (20, 0, 30, 20), (40, 0, 50, 20)
    exact = prediction(("a", a, 0.9), ("b", b, 0.8), ("c", c, 0.7))
    assert match_text(exact, "abc") == ([a, b, c], [0.9, 0.8, 0.7])
    assert match_text(exact, "abd") is None  # a character misread
    assert match_text(exact, "abcd") is None  # too few detections
    # a second reading of the middle glyph is dropped; the better-scoring one of the two "b" boxes is kept
    twice = prediction(("a", a, 0.9), ("b", (19, 0, 29, 20), 0.6), ("8", b, 0.55), ("b", (21, 0, 31, 20), 0.95),
                       ("c", c, 0.7))  # fmt: skip
    assert match_text(twice, "abc") == ([a, (21, 0, 31, 20), c], [0.9, 0.95, 0.7])
    # an extra glyph elsewhere means the reading is not trusted
    extra = prediction(("a", a, 0.9), ("b", b, 0.8), ("x", (60, 0, 70, 20), 0.9), ("c", c, 0.7))
    assert match_text(extra, "abc") is None
    assert match_text(prediction(), "a") is None


@pytest.fixture()
def folder(tmp_path: Path, synth: Path) -> Path:
    """12 synthetic images, one of them also as a JPEG of the same stem, one without a text in its name, one corrupt,
    and a stale label file."""
    images = tmp_path / "images"
    images.mkdir()
    for path in list_images(synth / "images")[:12]:
        (images / path.name).write_bytes(path.read_bytes())
    first = list_images(images)[0]
    Image.open(first).convert("RGB").save(first.with_suffix(".jpg"))  # ab-1.png and ab-1.jpg: one label file
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / f"{first.stem}.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    Image.new("RGB", (100, 40), "white").save(images / "noname.png")
    (images / "abc-0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "labels" / "abc-0.txt").write_text("0 0.5 0.5 0.1 0.1\n" * 3)
    return tmp_path


@pytest.mark.parametrize("workers", [1, 2])
def test_autolabel_writes_labels_that_training_reads(folder: Path, synth: Path, workers: int) -> None:
    report = autolabel(folder / "images", folder / "labels", workers=workers)
    assert report.images == 15
    assert report.unlabelled["no text in file name"] == 1 and report.unlabelled["unreadable image"] == 1
    assert report.unlabelled[SHARED_STEM] == 2
    assert len(report.labels) + sum(report.unlabelled.values()) == 15
    assert len(report.labels) >= 8 and report.labelled == {"colour": len(report.labels)}
    assert not (folder / "labels" / "abc-0.txt").exists()  # the stale label of an unlabelled image is gone
    shared = list_images(folder / "images")[0].stem
    assert not (folder / "labels" / f"{shared}.txt").exists()  # nor a label two images would share

    dataset = LabelledFolder(folder / "images", folder / "labels")
    assert len(dataset) == len(report.labels)
    assert dataset.skipped["label file shared by several images"] == 2
    assert set(dataset.skipped) == {"missing label file", "bad text", "unreadable image",
                                    "label file shared by several images"}  # fmt: skip
    for i in range(len(dataset)):
        item = dataset[i]
        path = Path(item["path"])
        assert item["labels"].tolist() == [int(c, 36) for c in item["text"]]
        iou = box_iou(item["boxes"], torch.tensor(truth(synth, path))).diagonal()
        assert (iou > 0.6).float().mean() >= 0.9


def test_autolabel_command_reports_json_and_draws_samples(folder: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["autolabel", str(folder / "images"), "--out", str(folder / "labels"), "--workers", "1", "--json",
         "--render-dir", str(folder / "pictures"), "--render", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 15 and summary["labelled"] == summary["by_source"]["colour"]
    assert summary["share"] == pytest.approx(summary["labelled"] / 15)
    pictures = sorted((folder / "pictures").iterdir())
    assert len(pictures) == 3 == len(summary["rendered"])
    assert all(p.name.startswith("colour-") and Image.open(p).height > 80 for p in pictures)

    result = CliRunner().invoke(app, ["autolabel", str(folder / "missing"), "--out", str(folder / "labels")])
    assert result.exit_code == 1 and "not a folder" in result.output


def test_autolabel_with_nothing_to_do_refuses_and_keeps_the_labels(folder: Path) -> None:
    """``--no-colour`` without ``--checkpoint`` labels nothing, so it must not delete the labels already there."""
    before = sorted(p.name for p in (folder / "labels").iterdir())
    assert before
    result = CliRunner().invoke(app, ["autolabel", str(folder / "images"), "--out", str(folder / "labels"),
                                      "--no-colour"])  # fmt: skip
    assert result.exit_code != 0 and "a checkpoint is needed" in result.output
    assert sorted(p.name for p in (folder / "labels").iterdir()) == before
    (folder / "no-images").mkdir()
    result = CliRunner().invoke(app, ["autolabel", str(folder / "no-images"), "--out", str(folder / "new")])
    assert result.exit_code == 1 and "no image files in" in result.output
    assert not (folder / "new").exists()
