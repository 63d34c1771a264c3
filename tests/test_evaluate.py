"""Evaluation: edit distance, alignment, accuracy over a folder, and the ``captcha-queue eval --json`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from core.evaluate import GAP, align, character_accuracy, edit_distance, evaluate, score


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("", "", 0),
        ("abc", "", 3),
        ("", "abcd", 4),
        ("abc", "abc", 0),
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("03yl9s", "03y19s", 1),
        ("abcd", "bcda", 2),
    ],
)
def test_edit_distance(a: str, b: str, expected: int) -> None:
    assert edit_distance(a, b) == expected
    assert edit_distance(b, a) == expected


def test_character_accuracy_is_clipped_and_case_insensitive() -> None:
    assert character_accuracy("ABC", "abc") == 1.0
    assert character_accuracy("abx", "abc") == pytest.approx(2 / 3)
    assert character_accuracy("", "abcd") == 0.0
    assert character_accuracy("abcdefghij", "ab") == 0.0  # 8 edits for 2 characters: clipped at 0
    assert character_accuracy("", "") == 1.0


def test_align_marks_substitutions_and_gaps() -> None:
    assert align("abc", "abc") == [("a", "a"), ("b", "b"), ("c", "c")]
    assert align("abc", "axc") == [("a", "a"), ("b", "x"), ("c", "c")]
    assert align("abcd", "acd") == [("a", "a"), ("b", GAP), ("c", "c"), ("d", "d")]
    assert align("ab", "abz") == [("a", "a"), ("b", "b"), (GAP, "z")]


def test_score_skips_images_without_truth() -> None:
    s = score(["abc", "xyz", "abd", "zzz"], ["abc", None, "abc", "q"])
    assert s.scored == 3
    assert s.sequence_accuracy == pytest.approx(1 / 3)
    assert s.character_accuracy == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert s.confusions == Counter({("c", "d"): 1, ("q", "z"): 1, (GAP, "z"): 2})


def test_score_of_nothing_is_zero() -> None:
    s = score([], [])
    assert (s.scored, s.sequence_accuracy, s.character_accuracy) == (0, 0.0, 0.0)


class _Canned:
    """A detector double that answers a fixed text per image size."""

    def __init__(self, answers: dict[tuple[int, int], str]) -> None:
        self.answers = answers

    def predict(self, images, batch_size: int = 32):
        from core.detector import Prediction

        return [Prediction(text=self.answers[img.size], chars=(), score=0.0) for img in images]


def test_evaluate_scores_names_and_reports_unreadable(tmp_path: Path) -> None:
    from PIL import Image

    # the canned answers are keyed by image size: each file gets its own size
    files = {"abcd-0.png": ((40, 20), "abcd"), "abcd-1.png": ((41, 20), "abcx"), "noname.png": ((42, 20), "zz")}
    for name, (size, _) in files.items():
        Image.new("RGB", size, "white").save(tmp_path / name)
    (tmp_path / "broken-0.png").write_bytes(b"not an image")
    detector = _Canned({size: answer for size, answer in files.values()})
    seen: list[tuple[int, int]] = []
    report = evaluate(detector, tmp_path, batch_size=2, on_progress=lambda d, t: seen.append((d, t)))  # type: ignore[arg-type]
    assert report.images == 3  # the unreadable file is not decoded
    assert report.scored == 2  # "noname.png" has no text in its name
    assert report.sequence_accuracy == 0.5
    assert report.character_accuracy == pytest.approx((1.0 + 0.75) / 2)
    assert list(report.unreadable) == [str(tmp_path / "broken-0.png")]
    assert report.mistakes == [(str(tmp_path / "abcd-1.png"), "abcd", "abcx")]
    assert report.confusions == Counter({("d", "x"): 1})
    assert seen[-1] == (4, 4)
    d = report.as_dict()
    assert d["top_confusions"] == [["d", "x", 1]] and d["unreadable"] == 1


CLI = Path(sys.executable).with_name("captcha-queue")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained detector that reads some text in every image: score_thresh 0, and the last logit of the
    ``fast`` box head is the objectness (``core.models.fast.BoxHead``), raised so that proposals become characters."""
    import torch

    from core.checkpoint import save_checkpoint
    from core.models import build_model

    torch.manual_seed(2)
    tiny = {"widths": [8, 16, 16], "depths": [0, 0], "feature_width": 16, "head_width": 32, "score_thresh": 0.0,
            "detections_per_img": 6}  # fmt: skip
    model = build_model("fast", **tiny)
    with torch.no_grad():
        model.box_head.cls.bias[-1] += 8.0
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_eval_command_prints_one_json_object_with_the_right_accuracy(checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    from core.detector import Detector
    from core.synth import generate

    generate(tmp_path / "src", 5, seed=9, workers=1, progress=False)
    sources = sorted((tmp_path / "src" / "images").iterdir())
    predicted = [p.text for p in Detector.load(checkpoint).predict(sources)]
    assert predicted[0] and predicted[1]  # names are made from them
    folder = tmp_path / "eval"
    folder.mkdir()
    # two images named after what the detector reads (right by construction), two with their true text, one unnamed
    names = [f"{predicted[0]}-0.png", f"{predicted[1]}-1.png", sources[2].name, sources[3].name, "unnamed.png"]
    for src, name in zip(sources, names):
        shutil.copy(src, folder / name)
    truths = [predicted[0], predicted[1], sources[2].name.split("-")[0], sources[3].name.split("-")[0], None]
    expected = score(predicted, truths)
    assert expected.sequence_accuracy >= 0.5

    proc = subprocess.run(
        [str(CLI), "eval", "--images", str(folder), "--checkpoint", str(checkpoint), "--json", "--device", "cpu"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1
    report = json.loads(proc.stdout)
    assert {"images", "sequence_accuracy", "character_accuracy", "images_per_second", "checkpoint", "version"} <= set(report)
    assert report["images"] == 5 and report["scored"] == 4
    assert report["sequence_accuracy"] == pytest.approx(expected.sequence_accuracy)
    assert report["character_accuracy"] == pytest.approx(expected.character_accuracy)
    assert report["images_per_second"] > 0
    assert report["checkpoint"] == str(checkpoint.resolve())
    assert report["version"] == Detector.load(checkpoint).version
    assert report["precision"] == Detector.load(checkpoint, device="cpu").precision
    assert report["box_source"] == "detector"

    limited = subprocess.run(
        [str(CLI), "eval", "--images", str(folder), "--checkpoint", str(checkpoint), "--json", "--limit", "2",
         "--precision", "fp32"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert json.loads(limited.stdout)["images"] == 2
    assert json.loads(limited.stdout)["precision"] == "fp32"


def test_eval_command_says_when_there_is_nothing_to_measure(checkpoint: Path, tmp_path: Path) -> None:
    """An empty folder (or the one above ``images/``) is an error, not 0% accuracy; images whose names give no text
    are decoded with the accuracy reported as not measured; unreadable files are named."""
    def run(folder: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(CLI), "eval", "--images", str(folder), "--checkpoint", str(checkpoint), "--json", "--device", "cpu"],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip

    (tmp_path / "set" / "images").mkdir(parents=True)
    empty = run(tmp_path / "set")
    assert empty.returncode == 1 and empty.stdout == "" and "no image files in" in empty.stderr
    Image.new("RGB", (120, 80), "white").save(tmp_path / "set" / "images" / "unnamed.png")
    (tmp_path / "set" / "images" / "broken-0.png").write_bytes(b"not a png")
    unnamed = run(tmp_path / "set" / "images")
    assert unnamed.returncode == 0, unnamed.stderr
    report = json.loads(unnamed.stdout)
    assert (report["images"], report["scored"], report["unreadable"]) == (1, 0, 1)
    assert report["sequence_accuracy"] is None and report["character_accuracy"] is None
    assert "unreadable" in unnamed.stderr and "broken-0.png" in unnamed.stderr


def test_eval_command_reports_a_bad_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    proc = subprocess.run(
        [str(CLI), "eval", "--images", str(tmp_path / "imgs"), "--checkpoint", str(tmp_path / "none.safetensors"), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "checkpoint not found" in proc.stderr
