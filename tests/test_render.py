"""Pictures of decoded CAPTCHAs: size, box pixels, title colour; the ``render`` command from stored results or a model."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from core.cli import app
from core.render import BOX_WIDTH, GREEN, LABEL_HEIGHT, PALETTE, RED, TITLE_HEIGHT, canvas_size, render_result
from core.synth import render_captcha
from db.repository import CharOutcome, ImageOutcome, create_job, record_outcomes, register_images
from db.session import dispose_engines, session_factory, upgrade

TOP = TITLE_HEIGHT + LABEL_HEIGHT


def chars_for(text: str, boxes) -> list[dict]:
    return [{"char": ch, "box": list(box), "score": 0.9} for ch, box in zip(text, boxes)]


def title_pixels(picture: Image.Image, colour: tuple[int, int, int]) -> int:
    band = np.asarray(picture)[:TITLE_HEIGHT].astype(int)
    return int((np.abs(band - np.array(colour)).sum(axis=2) < 60).sum())


def assert_box_drawn(picture: Image.Image, box, colour, scale: int = 2) -> None:
    x1, y1, x2, y2 = (int(v) * scale for v in box)
    mid_y, mid_x = TOP + (y1 + y2) // 2, (x1 + x2) // 2
    for xy in [(x1, mid_y), (x1 + BOX_WIDTH - 1, mid_y), (x2, mid_y), (mid_x, TOP + y1), (mid_x, TOP + y2)]:
        assert picture.getpixel(xy) == colour, xy


def test_render_draws_scaled_image_boxes_and_title():
    image, boxes = render_captcha("ab12", random.Random(3))
    picture = render_result(image, "ab12", chars_for("ab12", boxes), expected="ab12", score=0.9)
    assert picture.size == canvas_size(image.width, image.height) == (image.width * 2, TOP + image.height * 2)
    for i, box in enumerate(boxes):
        assert_box_drawn(picture, box, PALETTE[i])
    # the image itself is there, scaled: a glyph pixel well inside the first box is not white
    x1, y1, x2, y2 = (int(v) for v in boxes[0])
    region = np.asarray(picture)[TOP + 2 * y1 + 3 : TOP + 2 * y2 - 3, 2 * x1 + 3 : 2 * x2 - 3]
    assert (region < 200).any()
    # labels of each character in its colour in the label band
    labels = np.asarray(picture)[TITLE_HEIGHT:TOP].astype(int)
    for colour in PALETTE[:4]:
        assert (np.abs(labels - np.array(colour)).sum(axis=2) < 30).any()
    assert title_pixels(picture, GREEN) > 20 and title_pixels(picture, RED) == 0


def test_title_is_red_when_the_file_name_disagrees_and_small_images_get_room():
    image = Image.new("RGB", (40, 20), "white")
    picture = render_result(image, "x9", [{"char": "x", "box": (2, 2, 12, 18), "score": 0.5}], expected="x8", scale=3)
    assert picture.size == (240, TOP + 60)  # at least MIN_WIDTH wide for the title
    assert title_pixels(picture, RED) > 20 and title_pixels(picture, GREEN) == 0
    assert_box_drawn(picture, (2, 2, 12, 18), PALETTE[0], scale=3)


@pytest.fixture()
def stored(tmp_path, sqlite_url):
    """A CAPTCHA file with a stored result whose boxes are known."""
    image, boxes = render_captcha("k7mq", random.Random(5))
    path = tmp_path / "k7mq-0.png"
    image.save(path)
    upgrade(sqlite_url)
    with session_factory(sqlite_url)() as session:
        job = create_job(session, "render")
        [(image_id, _)] = register_images(session, job, [(str(path), path.stat().st_size, path.stat().st_mtime_ns)])
        chars = [CharOutcome(k, ch, tuple(b), 0.8) for k, (ch, b) in enumerate(zip("k7mq", boxes))]
        record_outcomes(session, [ImageOutcome(image_id=image_id, status="done", model_version="v7", text="k7mq",
                                               score=0.8, chars=chars, width=image.width, height=image.height)])
        session.commit()  # fmt: skip
    yield {"url": sqlite_url, "path": path, "boxes": boxes, "size": image.size}
    dispose_engines()


def test_render_command_uses_the_stored_result(stored, tmp_path):
    out = tmp_path / "pic.png"
    result = CliRunner().invoke(app, ["render", str(stored["path"]), "--out", str(out), "--database-url", stored["url"]])
    assert result.exit_code == 0, result.output
    assert "k7mq" in result.stdout and "stored result of model v7" in result.stdout
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.size == canvas_size(*stored["size"])
    picture = picture.convert("RGB")
    for i, box in enumerate(stored["boxes"]):
        assert_box_drawn(picture, box, PALETTE[i])
    assert title_pixels(picture, GREEN) > 20
    # --out-dir places the default name there
    folder = tmp_path / "pictures"
    result = CliRunner().invoke(app, ["render", str(stored["path"]), "--out-dir", str(folder),
                                      "--database-url", stored["url"]])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [p.name for p in folder.iterdir()] == [f"{Path(stored['path']).stem}.render.png"]


def test_render_finds_the_stored_result_of_a_file_whose_name_is_not_utf8(tmp_path, sqlite_url):
    from core.paths import path_to_text

    image, boxes = render_captcha("k7mq", random.Random(5))
    path = os.path.join(os.fsencode(tmp_path), b"k7mq\xe9-0.png")
    image.save(path)
    name = os.fsdecode(path)
    upgrade(sqlite_url)
    with session_factory(sqlite_url)() as session:
        job = create_job(session, "render")
        stat = os.stat(path)
        # registered as the producer registers it: the path's text form
        [(image_id, _)] = register_images(session, job, [(path_to_text(name), stat.st_size, stat.st_mtime_ns)])
        chars = [CharOutcome(k, ch, tuple(b), 0.8) for k, (ch, b) in enumerate(zip("k7mq", boxes))]
        record_outcomes(session, [ImageOutcome(image_id=image_id, status="done", model_version="v7", text="k7mq",
                                               score=0.8, chars=chars, width=image.width, height=image.height)])
        session.commit()  # fmt: skip
    out = tmp_path / "pic.png"
    try:
        result = CliRunner().invoke(app, ["render", name, "--out", str(out), "--database-url", sqlite_url])
    finally:
        dispose_engines()
    assert result.exit_code == 0, result.output
    assert "stored result of model v7" in result.stdout
    picture = Image.open(out).convert("RGB")
    for i, box in enumerate(boxes):
        assert_box_drawn(picture, box, PALETTE[i])

    # and by job: the stored text form is turned back into the file's own name
    out_dir = tmp_path / "renders"
    try:
        result = CliRunner().invoke(app, ["render", "--job", "render", "--out-dir", str(out_dir),
                                          "--database-url", sqlite_url])  # fmt: skip
    finally:
        dispose_engines()
    assert result.exit_code == 0, result.output
    assert [os.fsencode(p.name) for p in out_dir.iterdir()] == [f"{image_id}-".encode() + b"k7mq\xe9-0.png"]
    for i, box in enumerate(boxes):
        assert_box_drawn(Image.open(next(out_dir.iterdir())).convert("RGB"), box, PALETTE[i])


def test_render_job_dumps_pictures(stored, tmp_path):
    out_dir = tmp_path / "renders"
    result = CliRunner().invoke(
        app, ["render", "--job", "render", "--out-dir", str(out_dir), "--database-url", stored["url"]]
    )
    assert result.exit_code == 0, result.output
    assert [p.name for p in out_dir.iterdir()] == ["1-k7mq-0.png"]
    assert Image.open(out_dir / "1-k7mq-0.png").size == canvas_size(*stored["size"])


def test_render_command_runs_the_model_without_a_stored_result(tmp_path, monkeypatch):
    from core.checkpoint import save_checkpoint
    from core.models import build_model

    monkeypatch.chdir(tmp_path)
    checkpoint = save_checkpoint(
        build_model("fast", widths=(8, 16, 16), feature_width=16, head_width=32), tmp_path / "tiny.safetensors",
        {"version": "tiny-1"},
    )  # fmt: skip
    image, _ = render_captcha("zz7", random.Random(1))
    image.save(tmp_path / "zz7-0.png")
    result = CliRunner().invoke(
        app, ["render", "zz7-0.png", "--checkpoint", str(checkpoint), "--database-url", f"sqlite:///{tmp_path}/none.db"]
    )
    assert result.exit_code == 0, result.output
    assert "model tiny-1" in result.stdout
    assert Image.open(tmp_path / "zz7-0.render.png").size == canvas_size(*image.size)
    assert not (tmp_path / "none.db").exists()


def test_render_command_reports_unreadable_images(tmp_path, sqlite_url):
    bad = tmp_path / "ab-0.png"
    bad.write_bytes(b"not a png")
    result = CliRunner().invoke(app, ["render", str(bad), "--database-url", sqlite_url,
                                      "--checkpoint", str(tmp_path / "missing.safetensors")])  # fmt: skip
    assert result.exit_code == 1 and str(bad) in result.stderr and "not a recognised image" in result.stderr
    result = CliRunner().invoke(app, ["render", str(tmp_path / "gone.png"), "--database-url", sqlite_url])
    assert result.exit_code == 1 and "file not found" in result.stderr
    result = CliRunner().invoke(app, ["render"])
    assert result.exit_code == 2 and "either IMAGE or --job" in result.stderr
    assert os.listdir(tmp_path) == ["ab-0.png"]
