"""File names, image listing, YOLO label files and the folder datasets."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.charset import encode
from core.formats import (
    LabelError,
    list_images,
    read_yolo_labels,
    text_from_filename,
    write_yolo_labels,
)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("03yl9s-0.png", "03yl9s"),
        ("03YL9s-1.png", "03yl9s"),
        ("ab12-0(1).png", "ab12"),
        ("/some/dir/zz-9.png", "zz"),
        ("x-y-z.png", "x"),
        ("nodash.png", None),
        ("-0.png", None),
        ("ab_c-0.png", None),
        ("héllo-0.png", None),
        ("\u212a1-0.png", None),  # the Kelvin sign lowercases to "k", but it is not a character of the charset
    ],
)
def test_text_from_filename(name: str, text: str | None) -> None:
    assert text_from_filename(name) == text


def test_module_imports_without_torch() -> None:
    code = (
        "import sys, core.formats as f; "
        "f.text_from_filename('ab-0.png'); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def _png(path: Path, size: tuple[int, int] = (40, 20), mode: str = "RGB", colour=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def test_list_images_filters_sorts_and_recurses(tmp_path: Path) -> None:
    for name in ("b-0.png", "a-0.PNG", "c-1.jpg", "notes.txt", ".hidden-0.png", "d-0(1).png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e-0.png").write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a-0.PNG", "b-0.png", "c-1.jpg", "d-0(1).png"]
    assert [p.name for p in list_images(tmp_path, recursive=True)][-1] == "e-0.png"
    assert [p.name for p in list_images(tmp_path, pattern="*-0.png")] == ["b-0.png"]
    with pytest.raises(NotADirectoryError):
        list_images(tmp_path / "missing")


def test_yolo_round_trip(tmp_path: Path) -> None:
    boxes = [[3.0, 4.5, 20.25, 30.0], [25.0, 0.0, 40.0, 17.0]]
    label_file = tmp_path / "ab-0.txt"
    write_yolo_labels(label_file, boxes, 50, 40, classes=encode("ab"))
    assert label_file.read_text().splitlines()[1].startswith("11 ")
    got, labels = read_yolo_labels(label_file, "AB", 50, 40)
    assert labels == [10, 11]
    np.testing.assert_allclose(got, boxes, atol=1e-4)


def test_yolo_reader_edge_cases(tmp_path: Path) -> None:
    f = tmp_path / "l.txt"
    f.write_text("7 0.5 0.5 0.2 0.5\n\n9 0.1 0.5 0.4 0.5\n")  # class column ignored, blank line skipped, clipped
    boxes, labels = read_yolo_labels(f, "xy", 100, 80)
    assert labels == encode("xy")
    np.testing.assert_allclose(boxes, [[40, 20, 60, 60], [0, 20, 30, 60]])
    with pytest.raises(LabelError) as exc:
        read_yolo_labels(f, "xyz", 100, 80)
    assert exc.value.reason == "count mismatch"
    with pytest.raises(LabelError) as exc:
        read_yolo_labels(tmp_path / "none.txt", "xy", 100, 80)
    assert exc.value.reason == "missing label file"
    with pytest.raises(LabelError) as exc:
        read_yolo_labels(f, "x!", 100, 80)
    assert exc.value.reason == "bad text"
    f.write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(LabelError) as exc:
        read_yolo_labels(f, "x", 100, 80)
    assert exc.value.reason == "bad label line"
    f.write_text("0 1.5 0.5 0.2 0.2\n")
    with pytest.raises(LabelError) as exc:
        read_yolo_labels(f, "x", 100, 80)
    assert exc.value.reason == "empty box"
    f.write_bytes(b"\xef\xbb\xbf\r\n0 0.5 0.5 0.2 0.5\r\n")  # a byte-order mark alone on the first line, CRLF
    assert read_yolo_labels(f, "x", 100, 80)[1] == encode("x")


def _labelled(root: Path, stem: str, text_len: int | None, n_boxes: int, **png) -> None:
    _png(root / "images" / f"{stem}.png", **png)
    if text_len is not None:
        w, h = png.get("size", (40, 20))
        boxes = [[2.0 + 4 * i, 2.0, 5.0 + 4 * i, 15.0] for i in range(n_boxes)]
        (root / "labels").mkdir(parents=True, exist_ok=True)
        write_yolo_labels(root / "labels" / f"{stem}.txt", boxes, w, h)


def test_labelled_folder_skips_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from core.formats import LabelledFolder

    _labelled(tmp_path, "ab3-0", 3, 3, size=(40, 20))
    _labelled(tmp_path, "Cd-0(1)", 2, 2, size=(60, 20))  # upper case name, "(1)" suffix
    _labelled(tmp_path, "xyz-1", 3, 2)  # count mismatch
    _labelled(tmp_path, "qq-0", None, 0)  # missing label file
    _labelled(tmp_path, "a_b-0", 3, 3)  # bad text
    _labelled(tmp_path, "ok-0", 2, 2, size=(30, 20), mode="RGBA", colour=(0, 0, 0, 0))
    _labelled(tmp_path, "gr-0", 2, 2, size=(30, 20), mode="L", colour=128)
    with caplog.at_level(logging.WARNING, logger="core.formats"):
        ds = LabelledFolder(tmp_path / "images", tmp_path / "labels")
    assert len(ds) == 4
    assert ds.skipped == {"count mismatch": 1, "missing label file": 1, "bad text": 1}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 3 of 7" in warnings[0].getMessage()
    by_text = {ds[i]["text"]: ds[i] for i in range(len(ds))}
    assert set(by_text) == {"ab3", "cd", "ok", "gr"}
    assert ds.widths == [60, 40, 30, 30]  # sorted by path: Cd, ab3, gr, ok
    item = by_text["ab3"]
    assert item["image"].shape == (3, 20, 40) and item["image"].dtype.is_floating_point
    assert item["labels"].tolist() == encode("ab3")
    assert item["boxes"].shape == (3, 4)
    assert abs(float(item["boxes"][1, 0]) - 6.0) < 1e-3
    assert item["path"].endswith("ab3-0.png")
    # a fully transparent RGBA image reads as white, not black
    assert float(by_text["ok"]["image"].min()) == 1.0
    gray = by_text["gr"]["image"]
    assert gray.shape == (3, 20, 30) and abs(float(gray.mean()) - 128 / 255) < 1e-6


def test_labelled_folder_with_roots_skips_files_linked_from_outside(tmp_path: Path) -> None:
    """A link inside an allowed folder must not let training read an image or a label file from elsewhere."""
    from core.formats import LabelledFolder
    from core.paths import resolve_roots

    root, outside = tmp_path / "root", tmp_path / "outside"
    _labelled(root, "in-0", 2, 2)
    _labelled(outside, "ab-0", 2, 2)
    _labelled(outside, "cd-0", 2, 2)
    _labelled(root, "cd-0", None, 0)  # the image inside, its label file linked from outside
    (root / "images" / "ab-0.png").symlink_to(outside / "images" / "ab-0.png")
    (root / "labels" / "ab-0.txt").symlink_to(outside / "labels" / "ab-0.txt")
    (root / "labels" / "cd-0.txt").symlink_to(outside / "labels" / "cd-0.txt")
    assert len(LabelledFolder(root / "images", root / "labels")) == 3  # no roots: links are followed
    ds = LabelledFolder(root / "images", root / "labels", resolve_roots([root]))
    assert [Path(p).name for p in ds.paths] == ["in-0.png"]
    assert ds.skipped == {"outside the allowed roots": 2}
    assert len(LabelledFolder(root / "images", root / "labels", resolve_roots([root, outside]))) == 3


def test_labelled_folder_reads_16_bit_and_palette(tmp_path: Path) -> None:
    from core.formats import LabelledFolder

    arr = np.full((20, 30), 40000, dtype=np.uint16)
    arr[:, :10] = 0
    (tmp_path / "images").mkdir()
    Image.fromarray(arr).save(tmp_path / "images" / "ab-0.png")
    Image.new("P", (30, 20), 3).save(tmp_path / "images" / "cd-0.png")
    for stem in ("ab-0", "cd-0"):
        _labelled_labels = [[1.0, 1.0, 5.0, 5.0], [6.0, 1.0, 9.0, 5.0]]
        (tmp_path / "labels").mkdir(exist_ok=True)
        write_yolo_labels(tmp_path / "labels" / f"{stem}.txt", _labelled_labels, 30, 20)
    ds = LabelledFolder(tmp_path / "images", tmp_path / "labels")
    assert ds.skipped == {}
    img16 = ds[0]["image"]
    assert float(img16[:, :, :10].max()) == 0.0  # 16-bit values scaled by the depth: 40000 of 65535 is 156 of 255
    assert torch.allclose(img16[:, :, 10:], torch.tensor(156 / 255))
    assert ds[1]["image"].shape == (3, 20, 30)


def test_image_folder(tmp_path: Path) -> None:
    from core.formats import ImageFolder

    _png(tmp_path / "abc-0.png", size=(45, 20))
    _png(tmp_path / "scan_001.png", size=(70, 20))
    (tmp_path / "broken-0.png").write_bytes(b"not an image")
    ds = ImageFolder(tmp_path)
    assert [ds[i]["text"] for i in range(len(ds))] == ["abc", None]
    assert ds.widths == [45, 70]
    assert ds.skipped == {"unreadable image": 1}
    assert ds[1]["image"].shape == (3, 20, 70)


def test_dataset_classes_are_torch_datasets(tmp_path: Path) -> None:
    import torch.utils.data

    from core import formats

    assert issubclass(formats.LabelledFolder, torch.utils.data.Dataset)
    assert issubclass(formats.ImageFolder, torch.utils.data.Dataset)
    assert formats.ImageFolder is formats.ImageFolder
